"""`planc bench easyspec`: vanilla, standard speculative and EasySpec decoding side by side.

tiny-deepseek (target, plans/deepseek_easyspec.yaml's rules) with tiny-draft on 4 gloo ranks,
greedy, on prompts cut from the held-out split of the corpus the models never trained on:

    vanilla               the target alone (the standard artifact run with speculate=False)
    speculative           draft replicated on every rank, layer by layer (no communication)
    speculative_draft_tp  draft heads and MLP split over the 4 ranks (what vLLM and SGLang do:
                          the draft at the target's tensor parallelism; 2 all-reduces per layer)
    easyspec_2, _4        EasySpec, layer_parallel 2 and 4, calibrated

Two batch settings, measured in one run:

    configs               batch 1, each prompt decoded alone (`planc run --batch-size 1`), the way
                          speculative decoding is measured: 8 of the prompts, evenly spaced (one
                          prompt at a time costs the most wall time here), 3 rounds
    configs_batch_all     all prompts as one batch, 3 rounds: a batch runs until its slowest row
                          is done

Every round decodes the same prompts; rounds interleave the configurations so drift on this shared
machine hits each alike. tokens/s is the median of the rounds' (a round's decoded tokens over the
seconds of its decode loops, inside rank 0; tokens_per_s_pooled: over all rounds), and
speedup_vs_vanilla compares medians within one batch setting. Acceptance figures are derived from
the summed counts; draft and verify ms per round are rank 0's wall time in the draft's forwards
(catch-up or calibration included) and in the target's over all rounds.

The prediction is the cost model's (planc.cost: roofline per op, ring collectives, 10 us per
call) for DeepSeek-V3 on 8 x H100 (MLA heads and dense MLPs split 8 ways, experts 8 ways) with
a Llama-3.2-1B-shaped draft (16 layers, hidden 2048, 32 / 8 heads, MLP 8192, the target's
vocabulary), batch 1, 4096 tokens of context, G = 4, bf16. Acceptance is not something a roofline
knows: the prediction takes each configuration's acceptance rate measured here.
"""
from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from planc.bench.decode import NOTE, cores, rank_threads
from planc.cost import PROFILES, Collective, Op, Split, decode_step, gemm, kv_bytes_per_seq, mla_model, op_time
from planc.driver import compile
from planc.models.tokenizer import decode
from planc.plan import parse_plan_text
from planc.ring import all_to_all_bytes, ring_all_gather_bytes, ring_all_reduce_bytes
from planc.run import run as run_artifact
from planc.runtime.speculative import combined
from planc.zoo import corpus

PLAN = Path(__file__).resolve().parents[2] / "plans" / "deepseek_easyspec.yaml"
WORLD = 4
DRAFT_TP = [{"match": "model.layers.*.self_attn", "attention": {"strategy": "tp"}},
            {"match": "model.layers.*.mlp", "mlp": {"strategy": "tp"}}]
# configuration -> (the plan's draft section changes, speculate); None: the standard artifact, vanilla
CONFIGS = {"vanilla": (None, False), "speculative": ({"easyspec": None}, True),
           "speculative_draft_tp": ({"easyspec": None, "rules": DRAFT_TP}, True),
           "easyspec_2": ({"easyspec": {"layer_parallel": 2}}, True),
           "easyspec_4": ({"easyspec": {"layer_parallel": 4}}, True)}


def plan_text(changes: dict) -> str:
    """plans/deepseek_easyspec.yaml with draft fields replaced (None removes one)."""
    data = yaml.safe_load(PLAN.read_text())
    for key, value in changes.items():
        if value is None:
            data["draft"].pop(key, None)
        elif key == "easyspec":
            data["draft"]["easyspec"] = {**data["draft"]["easyspec"], **value}
        else:
            data["draft"][key] = value
    return yaml.safe_dump(data, sort_keys=False)


def heldout_prompts(count: int, length: int) -> list[str]:
    """`count` prompts of about `length` bytes, evenly spaced over the held-out split."""
    return [decode(w.tolist()) for w in corpus.windows("heldout", count, length)]


def measure(artifacts: dict[str, Path], rounds: list[list[str]], max_new_tokens: int,
            batch_size: int | None) -> dict[str, list]:
    """Every configuration on each round's prompts, batch_size at a time, the configurations
    interleaved round by round."""
    runs: dict[str, list] = {name: [] for name in CONFIGS}
    for prompts in rounds:
        for name, (_, speculate) in CONFIGS.items():
            artifact = artifacts["speculative" if name == "vanilla" else name]
            with rank_threads():
                runs[name].append(run_artifact(artifact, nproc=WORLD, prompts=prompts, max_new_tokens=max_new_tokens,
                                               speculate=speculate, batch_size=batch_size))
    return runs


def summarize(runs: dict[str, list], batch_size: int, how: str) -> dict:
    """One batch setting: per configuration, tokens/s the median of its rounds' (each round's decoded
    tokens over its decode seconds; tokens_per_s_pooled: over all rounds), the speculation's counts
    summed and its rates derived from the sums."""
    configs = {name: _pooled(rs, runs["vanilla"]) for name, rs in runs.items()}
    for c in configs.values():
        c["speedup_vs_vanilla"] = c["tokens_per_s"] / configs["vanilla"]["tokens_per_s"]
    standard = configs["speculative"]
    for name in ("easyspec_2", "easyspec_4"):
        c = configs[name]
        c["acceptance_vs_speculative"] = c["acceptance_rate"] / standard["acceptance_rate"]
        c["depth_vs_sequential"] = c["draft_sequential_depth"] / c["sequential_depth"]
        c["drafting_speedup_vs_speculative"] = standard["draft_ms_per_round"] / c["draft_ms_per_round"]
        c["drafting_speedup_vs_draft_tp"] = configs["speculative_draft_tp"]["draft_ms_per_round"] / c["draft_ms_per_round"]
    return {"batch_size": batch_size, "rounds": len(runs["vanilla"]), "how": how, "configs": configs}


def _pooled(rs: list[dict], vanilla: list[dict]) -> dict:
    entry = {"tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in rs),
             "tokens_per_s_pooled": sum(r["decode_tokens"] for r in rs) / sum(r["decode_s"] for r in rs),
             "same_tokens_as_vanilla": all(r["tokens"] == v["tokens"] for r, v in zip(rs, vanilla)),
             "samples_tokens_per_s": [r["decode_tokens_per_s"] for r in rs]}
    if rs[0]["speculation"] is None:
        return entry
    spec = combined([r["speculation"] for r in rs])
    return entry | {k: spec[k] for k in ("acceptance_rate", "mean_accepted_length", "draft_sequential_depth",
                                         "sequential_depth", "rounds", "drafted", "accepted")} | {
        "draft_ms_per_round": spec["draft_s"] / spec["rounds"] * 1e3,
        "verify_ms_per_round": spec["verify_s"] / spec["rounds"] * 1e3,
        "draft_work_per_rank": rs[0]["speculation"]["draft_work_per_rank"],  # the first round's
        "collectives_per_round": rs[0]["speculation"]["collectives_per_round"]}


def run(prompts: int = 24, prompt_bytes: int = 64, max_new_tokens: int = 48, repeats: int = 3,
        alone_prompts: int = 8) -> dict:
    """Batch 1: alone_prompts of the prompts, evenly spaced, each decoded alone (one prompt at a
    time costs the most wall time here). Whole batch: all prompts together. Both `repeats` rounds
    of the same prompts."""
    texts = heldout_prompts(prompts, prompt_bytes)
    alone_texts = texts[::prompts // alone_prompts][:alone_prompts]
    with tempfile.TemporaryDirectory(prefix="planc-bench-easyspec-") as tmp:
        artifacts = {name: compile(None, parse_plan_text(plan_text(changes), f"{PLAN.name} ({name})"),
                                   Path(tmp, name)).path
                     for name, (changes, _) in CONFIGS.items() if changes is not None}
        alone = summarize(measure(artifacts, [alone_texts] * repeats, max_new_tokens, 1), 1,
                          f"each prompt alone: {len(alone_texts)} of the {len(texts)} prompts, evenly spaced, "
                          f"{repeats} interleaved rounds of the same prompts")
        together = summarize(measure(artifacts, [texts] * repeats, max_new_tokens, None), len(texts),
                             f"all {len(texts)} prompts as one batch, {repeats} interleaved rounds of the same prompts")
    return {"case": "easyspec", "target": "tiny-deepseek", "draft": "tiny-draft", "ranks": WORLD,
            "plan": PLAN.name, "decoding": "greedy", "prompts": len(texts), "prompt_bytes": len(texts[0].encode()),
            "split": "heldout", "max_new_tokens": max_new_tokens,
            "configs": alone["configs"], "configs_batch_all": together["configs"],
            "batches": {"configs": {k: v for k, v in alone.items() if k != "configs"},
                        "configs_batch_all": {k: v for k, v in together.items() if k != "configs"}},
            "prediction": predict({n: c.get("acceptance_rate") for n, c in alone["configs"].items()}),
            "note": f"{NOTE.format(cores=cores())}. configs: batch 1, {alone['how']}; configs_batch_all: "
                    f"{together['how']}"}


# -- the cost model's prediction: DeepSeek-V3 + a 1B-class draft on 8 x H100 ---------------------


@dataclass(frozen=True)
class Llama:
    layers: int = 16
    D: int = 2048
    H: int = 32
    KV: int = 8
    Dh: int = 64
    I: int = 8192


def _draft_attention(d: Llama, tp: int, b: int, context: int, e: int) -> list[Op]:
    heads, kv = d.H // tp, max(1, d.KV // tp)
    return [gemm("qkv", b, d.D, (heads + 2 * kv) * d.Dh, e),
            Op("attention", 4 * b * heads * context * d.Dh, 2 * b * context * kv * d.Dh * e),
            gemm("o_proj", b, heads * d.Dh, d.D, e)]


def draft_forward_s(d: Llama, vocab: int, hw, *, tp: int, groups: list[int], b: int, context: int, e: int) -> float:
    """One draft forward at batch b (one token each) with its MLPs split tp ways; groups: the sizes
    of the layer-parallel groups (empty: every attention split tp ways, layer by layer). A group's
    attentions run whole, at once, on different GPUs (the critical path holds one), then one
    all-gather; the other layers' attentions end in an all-reduce."""
    split = d.layers - sum(groups)
    reduce = Collective("all_reduce", ring_all_reduce_bytes(b * d.D * e, tp))
    mlp = [gemm("gate_up", b, d.D, 2 * d.I // tp, e), gemm("down", b, d.I // tp, d.D, e), reduce]
    path = d.layers * mlp + split * (_draft_attention(d, tp, b, context, e) + [reduce])
    for n in groups:
        path += _draft_attention(d, 1, b, context, e) + [Collective("all_gather", ring_all_gather_bytes(n * b * d.D * e, tp))]
    path += [gemm("lm_head", b, d.D, vocab // tp, e), Collective("all_gather", ring_all_gather_bytes(b * vocab * e, tp))]
    return sum(op_time(op, hw) for op in path)


def target_step_s(hw, *, tokens: int, b: int, context: int, e: int, tp: int = 8) -> float:
    """DeepSeek-V3, one step of `tokens` per sequence: MLA heads and dense MLPs split tp ways (the
    cost model's MLA step, KV read once per sequence), plus the MoE layers it leaves out: the
    routed experts a rank's share of the tokens touches (uniform routing), its shard of the shared
    expert, dispatch and combine all-to-alls."""
    m, cfg = mla_model("deepseek-v3"), _v3()
    s = Split("mla_tp", tp, m.H // tp, m.C)
    n = b * tokens
    ops: list = decode_step(m, s, n, 0, e) + [Op("kv", 0.0, b * kv_bytes_per_seq(m, s, context, e))]
    local = cfg.n_routed_experts // tp
    touched = local * (1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** n)
    expert = 3 * m.D * cfg.moe_intermediate_size * e
    row = m.D * e
    sends = [math.ceil(n * cfg.num_experts_per_tok / tp)] * tp
    for _ in range(m.layers - m.dense_layers):
        ops += [Op("experts", 2 * n * cfg.num_experts_per_tok * expert / e / tp, touched * expert, touched * expert),
                gemm("shared", n, m.D, 3 * cfg.moe_intermediate_size // tp, e),
                Collective("all_to_all", all_to_all_bytes(sends, 0, row)),
                Collective("all_to_all", all_to_all_bytes(sends, 0, row))]
    return sum(op_time(op, hw) for op in ops)


def _v3():
    from planc.models.registry import bundled_config

    return bundled_config("deepseek-v3")


def predict(acceptance: dict[str, float | None], gamma: int = 4, batch: int = 1, context: int = 4096,
            hw: str = "H100") -> dict:
    """Per configuration: tokens/s and speedup over vanilla at the acceptance rates measured here."""
    profile, e, d, vocab = PROFILES[hw], 2, Llama(), mla_model("deepseek-v3").vocab
    vanilla_s = target_step_s(profile, tokens=1, b=batch, context=context, e=e)
    verify_s = target_step_s(profile, tokens=gamma + 1, b=batch, context=context, e=e)
    middle = d.layers - 2
    drafts = {"speculative": ([], 1), "speculative_draft_tp": ([], 8),
              **{f"easyspec_{n}": ([n] * (middle // n) + ([middle % n] if middle % n else []), 8) for n in (2, 4)}}
    out = {"vanilla": {"tokens_per_s": batch / vanilla_s, "speedup_vs_vanilla": 1.0, "step_ms": vanilla_s * 1e3}}
    exact = {tp: draft_forward_s(d, vocab, profile, tp=tp, groups=[], b=batch, context=context, e=e) for tp in (1, 8)}
    for name, (groups, tp) in drafts.items():
        alpha = acceptance.get(name)
        forward = draft_forward_s(d, vocab, profile, tp=tp, groups=groups, b=batch, context=context, e=e)
        draft_s = forward * gamma if not groups else exact[tp] + forward * (gamma - 1)  # calibration, then drafting
        emitted = (1 - alpha ** (gamma + 1)) / (1 - alpha) if alpha is not None and alpha < 1 else gamma + 1
        round_s = draft_s + verify_s
        out[name] = {"acceptance_rate": alpha, "mean_accepted_length": emitted,
                     "draft_sequential_depth": (d.layers + (gamma - 1) * (2 + len(groups))) / gamma if groups else d.layers,
                     "draft_ms_per_round": draft_s * 1e3, "verify_ms": verify_s * 1e3,
                     "tokens_per_s": batch * emitted / round_s, "speedup_vs_vanilla": vanilla_s * emitted / round_s}
    return {"hardware": f"8x{hw}", "target": "deepseek-v3 (MLA heads and dense MLPs tp 8, experts ep 8)",
            "draft": "Llama-3.2-1B-shaped (16 layers, hidden 2048, MLP 8192, 32/8 heads), MLP tp 8 except "
                     "'speculative' (replicated)", "batch": batch, "context": context, "tokens": gamma,
            "dtype": "bfloat16", "configs": out,
            "assumes": "acceptance rates measured on the tiny pair; mean accepted length (1 - a^(G+1)) / (1 - a) "
                       "for i.i.d. acceptance; uniform expert routing; no overlap, no kernel launch cost"}


def table(result: dict) -> str:
    rows = [f"easyspec: {result['target']} + {result['draft']} on {result['ranks']} gloo ranks, greedy, "
            f"{result['prompts']} held-out prompts of {result['prompt_bytes']} bytes, {result['max_new_tokens']} new "
            f"tokens"]
    for key in ("configs", "configs_batch_all"):
        rows += ["", f"batch {result['batches'][key]['batch_size']} ({result['batches'][key]['how']}):"]
        rows += _measured(result[key])
    p = result["prediction"]
    rows += ["", f"predicted, deepseek-v3 + 1B-class draft on {p['hardware']}, batch {p['batch']}, "
                 f"context {p['context']}, G = {p['tokens']}:"]
    for name, c in p["configs"].items():
        rows.append(f"{name:<21} {_f(c.get('acceptance_rate'), '.3f'):>6} {_f(c.get('mean_accepted_length'), '.2f'):>8} "
                    f"{_f(c.get('draft_sequential_depth'), '.2f'):>5} {_f(c.get('draft_ms_per_round'), '.2f'):>11} "
                    f"{_f(c.get('verify_ms'), '.2f'):>12} {c['tokens_per_s']:>8.1f} {c['speedup_vs_vanilla']:>9.2f}x")
    return "\n".join(rows + [f"note: {result['note']}"])


def _measured(configs: dict) -> list[str]:
    rows = [f"{'config':<21} {'accept':>6} {'mean len':>8} {'depth':>5} {'draft ms/rd':>11} {'verify ms/rd':>12} "
            f"{'tokens/s':>8} {'vs vanilla':>10} {'same':>5}"]
    for name, c in configs.items():
        rows.append(f"{name:<21} {_f(c.get('acceptance_rate'), '.3f'):>6} {_f(c.get('mean_accepted_length'), '.2f'):>8} "
                    f"{_f(c.get('draft_sequential_depth'), '.2f'):>5} {_f(c.get('draft_ms_per_round'), '.1f'):>11} "
                    f"{_f(c.get('verify_ms_per_round'), '.1f'):>12} {c['tokens_per_s']:>8.1f} "
                    f"{c['speedup_vs_vanilla']:>9.2f}x {str(c['same_tokens_as_vanilla']):>5}")
    return rows


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
