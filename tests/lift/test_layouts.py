"""Decoder layouts beyond the bundled families, as a user brings them: what planc reads from the
modules (sliding windows, partial and interleaved rope), exactness against transformers on prompts
longer than the window, and a clear refusal (never a traceback, never a silently different model)
for what planc does not lift."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import transformers as T

from planc.codegen.artifact import program_file
from planc.driver import compile
from planc.errors import CompileError, ModelError
from planc.lift import lift
from planc.lift.check import block_weights, run_reference
from planc.lift.fused import split_fused
from planc.lift.glue import Scale, read_glue
from planc.lift.recognize import long_rope, recognize, rope_per_layer_type
from planc.lift.structure import representatives
from planc.models.registry import init_model
from planc.ops import Ops
from planc.plan import parse_plan_text
from planc.runtime.decode import generate
from planc.runtime.model import Model
from planc.runtime.threads import run_threads

COMMON = dict(vocab_size=260, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=256,
              bos_token_id=256, eos_token_id=257, pad_token_id=258, intermediate_size=128, num_key_value_heads=2)
WINDOW = 6


def configs() -> dict[str, T.PretrainedConfig]:
    return {
        # one window for every layer, from the config (the attention module holds none)
        "mistral_window": T.MistralConfig(**COMMON, sliding_window=WINDOW),
        # the config's window again, with LayerNorm norms (run as captured) and a c_fc / c_proj MLP (lifted as up / down)
        "starcoder2_window": T.Starcoder2Config(**COMMON, sliding_window=WINDOW),
        # a window on the layers from max_window_layers on (layer_types; the module holds it)
        "qwen2_some_windows": T.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        # rope on a quarter of each head, LayerNorm norms (run as captured)
        "stablelm_partial_rope": T.StableLmConfig(**COMMON, partial_rotary_factor=0.25),
        # interleaved pairs on half of each head; its fused gate_up MLP split into gate and up
        "glm_interleaved_partial_rope": T.GlmConfig(**COMMON, head_dim=16),
        # fused qkv_proj and gate_up_proj (Phi-3), rope on three quarters of each head (Phi-4-mini)
        "phi3_fused_partial_rope": T.Phi3Config(**COMMON, partial_rotary_factor=0.75),
        # longrope: short factors up to an original context of WINDOW positions, long ones past it
        "phi3_longrope": T.Phi3Config(**COMMON, original_max_position_embeddings=WINDOW, rope_scaling={
            "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0]}),
        # interleaved pairs on the whole head
        "helium_interleaved_rope": T.HeliumConfig(**COMMON, head_dim=16),
        # constants between the blocks: embeddings × 12, each residual branch × 0.22, logits ÷ 8
        "granite_multipliers": T.GraniteConfig(**COMMON, embedding_multiplier=12.0, residual_multiplier=0.22,
                                               attention_multiplier=0.0078125, logits_scaling=8.0),
        # norms scaling by 1 + weight in fp32, embeddings scaled by √hidden inside their module
        "gemma_offset_norms": T.GemmaConfig(**COMMON, head_dim=16),
        # pre-norms named attention_layernorm / feedforward_layernorm; an up/down xIELU MLP (run as captured)
        "apertus_named_norms": T.ApertusConfig(**COMMON, head_dim=16),
        # one rope per layer type (a theta for full attention, another for the windowed layers)
        "mellum_rope_per_layer_type": T.MellumConfig(**COMMON, head_dim=16, sliding_window=WINDOW, mlp_layer_types=["dense"] * 3,
                                                     layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
        # no rope on every other layer (NoPE; the attention's use_rope is 0 there)
        "smollm3_nope_layers": T.SmolLM3Config(**COMMON, no_rope_layer_interval=2),
        # the feed-forward block named block_sparse_moe, its router named router, and Granite's
        # constants between the blocks
        "granitemoe_block_sparse_moe": T.GraniteMoeConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                                          embedding_multiplier=12.0, residual_multiplier=0.22,
                                                          logits_scaling=8.0),
        # attention and MLP in parallel from one LayerNorm (run as captured), interleaved rope pairs
        # handed out each angle twice in a row, logits × logit_scale
        "cohere_parallel": T.CohereConfig(**COMMON),
        # rope on the windowed layers only, nothing in the attention module to say so (Cohere 2)
        "cohere2_rope_on_windowed_layers": T.Cohere2Config(**COMMON, sliding_window=WINDOW, layer_types=[
            "sliding_attention", "full_attention", "sliding_attention"]),
        # a learned sink logit per head in every softmax (split with the heads), windows on every other
        # layer, yarn rope; its MoE block: a router with a bias, transposed experts with biases and
        # interleaved gate/up columns, a clamped activation, router scores returned beside the output
        "gpt_oss_sinks": T.GptOssConfig(**COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention",
                                                                            "sliding_attention"]),
        # post-norms (a norm after the attention and after the MLP, none before), q/k norms over
        # the whole projection
        "olmo2_post_norms": T.Olmo2Config(**COMMON),
        # the same with windows on some layers and one rope per layer type
        "olmo3_post_norms_windows": T.Olmo3Config(**COMMON, sliding_window=WINDOW,
                                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
        # per-head q/k norms named query_layernorm / key_layernorm, normalizing the rotated heads
        "hunyuan_dense_norms_after_rope": T.HunYuanDenseV1Config(**COMMON, head_dim=16),
        # sandwich norms (before and after both blocks) scaling by 1 + weight, per-head q/k norms,
        # a tanh-approximated GELU, query_pre_attn_scalar, windows and a rope per layer type
        # sandwich norms named post_self_attn_layernorm (after attention), post_attention_layernorm
        # (before the MLP!) and post_mlp_layernorm; interleaved rope on half of each head; a fused gate_up_proj
        "glm4_sandwich_norms_named_otherwise": T.Glm4Config(**COMMON, head_dim=16),
        # sandwich norms named post_norm1 / post_norm2 (Peri-LN), the branches and logits scaled
        "hyperclovax_post_norms_named_otherwise": T.HyperCLOVAXConfig(**COMMON, head_dim=16, use_post_norm=True,
                                                                      residual_multiplier=0.3, embedding_multiplier=2.0,
                                                                      logits_scaling=0.5),
        # pre-norms alone, the MLP's named pre_feedforward_layernorm; Gemma's offset norms and GELU
        "vaultgemma_pre_feedforward_norm": T.VaultGemmaConfig(**COMMON, head_dim=16),
        "gemma3_sandwich_norms": T.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    }


def build(name: str, **changes) -> torch.nn.Module:
    config = configs()[name] if not changes else changes.pop("config")
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config).eval()


def _attention_of(model: torch.nn.Module) -> list:
    return [b.dims for b in recognize(model) if b.kind == "gqa_attention"]


def _attention(name: str) -> list:
    return _attention_of(build(name))


def test_windows_and_rope_layouts_are_read_from_the_model():
    assert [d.window for d in _attention("mistral_window")] == [WINDOW] * 3
    assert [d.window for d in _attention("qwen2_some_windows")] == [None, WINDOW, WINDOW]
    assert [d.window for d in _attention("starcoder2_window")] == [WINDOW] * 3
    stablelm = _attention("stablelm_partial_rope")[0]
    assert (stablelm.rope_dim, stablelm.rope_interleave, stablelm.window) == (4, False, None)
    glm = _attention("glm_interleaved_partial_rope")[0]
    assert (glm.rope_dim, glm.rope_interleave) == (8, True)
    helium = _attention("helium_interleaved_rope")[0]
    assert (helium.rope_dim, helium.rope_interleave) == (None, True)
    assert [d.rope_dim for d in _attention("smollm3_nope_layers")] == [None, 0, None]
    cohere2 = _attention("cohere2_rope_on_windowed_layers")
    assert [(d.rope_dim, d.window) for d in cohere2] == [(None, WINDOW), (0, None), (None, WINDOW)]
    with torch.device("meta"):  # asked on a probe with its own weights: the same answer on meta
        on_meta = T.AutoModelForCausalLM.from_config(configs()["cohere2_rope_on_windowed_layers"])
    assert _attention_of(on_meta) == cohere2
    assert [d.rope_dim for d in _attention("mistral_window") + _attention("qwen2_some_windows")] == [None] * 6
    mellum = build("mellum_rope_per_layer_type")
    rope_per_layer_type(mellum)
    assert [d.window for d in _attention_of(mellum)] == [None, WINDOW, WINDOW]
    thetas = [1 / layer.self_attn.rotary.inv_freq[1].item() ** (16 / 2) for layer in mellum.model.layers]
    assert [round(t) for t in thetas] == [500000, 10000, 10000]  # each layer its type's frequencies


def test_a_layer_with_a_window_is_a_structure_of_its_own():
    lifted = lift(build("qwen2_some_windows"), check=True)
    numeric = {c.fqn for c in lifted.checks if c.method == "numeric"}
    assert {"model.layers.0.self_attn", "model.layers.1.self_attn"} <= numeric  # layer 2 stands on layer 1
    assert "model.layers.2.self_attn" not in numeric


PLAN = """version: 1
mesh: {devices: 2}
rules:
  - match: "model.layers.*.self_attn"
    attention: {strategy: tp}
"""


@pytest.mark.parametrize("name", list(configs()))
def test_two_ranks_give_transformers_logits_past_the_window(tmp_path, name):
    model = build(name)
    artifact = compile(model, parse_plan_text(PLAN, "plan.yaml"), tmp_path / "out").path
    prompt = torch.randint(0, 256, (17,), generator=torch.Generator().manual_seed(1)).tolist()  # ~3 windows
    steps = 6
    got = run_threads(lambda comm: generate(Model(str(artifact), comm=comm), [prompt], steps, keep_logits=True), 2)[0]
    ids = torch.tensor([prompt + got.tokens[0]])
    with torch.no_grad():
        want = model(ids, use_cache=False).logits[0, len(prompt) - 1:-1]
    diff = max((g[0] - w).abs().max().item() for g, w in zip(got.step_logits, want))
    assert len(got.tokens[0]) == steps
    assert diff <= 1e-4, diff  # fp32: the split GEMMs and all-reduce reorder additions


@pytest.mark.parametrize(("name", "post_norms"), [
    ("olmo2_post_norms", ("post_attention_layernorm", "post_feedforward_layernorm")),
    ("gemma3_sandwich_norms", ("post_attention_layernorm", "post_feedforward_layernorm")),
    ("glm4_sandwich_norms_named_otherwise", ("post_self_attn_layernorm", "post_mlp_layernorm")),
    ("hyperclovax_post_norms_named_otherwise", ("post_norm1", "post_norm2")),
])
def test_a_post_norm_reads_the_summed_output_of_its_split_block(tmp_path, name, post_norms):
    model = build(name)
    plan = PLAN + '  - match: "model.layers.*.mlp"\n    mlp: {strategy: tp}\n'
    art = compile(model, parse_plan_text(plan, "plan.yaml"), tmp_path / "out")
    nodes = {n["name"]: n for n in art.report["graph_nodes"]["dense_tp"]}
    posts = [n for n in nodes.values() if n["kind"] == "rmsnorm" and n["fqn"].endswith(post_norms)]
    assert len(posts) == 2 * 3
    for post in posts:  # o_proj / down_proj -> all_reduce -> post-norm -> residual add
        summed = nodes[post["args"][0]]
        assert summed["kind"] == "all_reduce" and nodes[summed["args"][0]]["kind"] == "linear"
    prompt = torch.randint(0, 256, (17,), generator=torch.Generator().manual_seed(1)).tolist()
    got = run_threads(lambda comm: generate(Model(str(art.path), comm=comm), [prompt], 6, keep_logits=True), 2)[0]
    with torch.no_grad():
        want = model(torch.tensor([prompt + got.tokens[0]]), use_cache=False).logits[0, len(prompt) - 1:-1]
    assert max((g[0] - w).abs().max().item() for g, w in zip(got.step_logits, want)) <= 1e-4


def test_capped_attention_scores_and_logits_match_transformers_where_the_caps_bite(tmp_path):
    """Gemma 2: scores -> 2 · tanh(scores / 2) before the softmax, logits -> 1.5 · tanh(logits / 1.5);
    q and k made large enough that both caps change the logits (by more than 100x the tolerance)."""
    config = _layer_config("Gemma2Config", head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=2.0,
                           final_logit_softcapping=1.5)
    model = build("", config=config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40.0)
            layer.self_attn.k_proj.weight.mul_(40.0)
        model.lm_head.weight.mul_(40.0)
    art = compile(model, parse_plan_text(PLAN, "plan.yaml"), tmp_path / "out")
    assert {d.softcap for d in _attention_of(model)} == {2.0}
    assert "ops.softcap(logits, 1.5)" in (art.path / program_file("target")).read_text()
    prompt = torch.randint(0, 256, (17,), generator=torch.Generator().manual_seed(1)).tolist()
    got = run_threads(lambda comm: generate(Model(str(art.path), comm=comm), [prompt], 6, keep_logits=True), 2)[0]
    ids = torch.tensor([prompt + got.tokens[0]])
    with torch.no_grad():
        want = model(ids, use_cache=False).logits[0, len(prompt) - 1:-1]
        for layer in model.model.layers:  # the same model without its attention cap
            layer.self_attn.attn_logit_softcapping = None
        uncapped = model(ids, use_cache=False).logits[0, len(prompt) - 1:-1]
    assert max((g[0] - w).abs().max().item() for g, w in zip(got.step_logits, want)) <= 1e-4
    assert (uncapped - want).abs().max() > 1e-2


def test_attention_sinks_match_transformers_where_they_take_most_of_the_softmax(tmp_path):
    """gpt-oss: sinks[h] joins every softmax's normalizer; at +4 it takes most of the mass, so a
    program leaving it out (or giving a rank another head's sink) would be far off."""
    model = build("gpt_oss_sinks")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.tensor([4.0, -1.0, 2.0, 0.5]))
    art = compile(model, parse_plan_text(PLAN, "plan.yaml"), tmp_path / "out")
    assert all(d.sinks for d in _attention_of(model))
    prompt = torch.randint(0, 256, (17,), generator=torch.Generator().manual_seed(1)).tolist()
    got = run_threads(lambda comm: generate(Model(str(art.path), comm=comm), [prompt], 6, keep_logits=True), 2)[0]
    ids = torch.tensor([prompt + got.tokens[0]])
    with torch.no_grad():
        want = model(ids, use_cache=False).logits[0, len(prompt) - 1:-1]
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-1e4)  # no sink
        sinkless = model(ids, use_cache=False).logits[0, len(prompt) - 1:-1]
    assert max((g[0] - w).abs().max().item() for g, w in zip(got.step_logits, want)) <= 1e-4
    assert (sinkless - want).abs().max() > 1e-2


def test_a_parallel_layer_reads_one_norm_and_adds_both_outputs_to_its_input():
    model = build("cohere_parallel")
    nodes = {n.name: n for n in lift(model, check=True).graph.nodes}
    layer0 = [n for n in nodes.values() if "planc" in n.meta and n.meta["planc"].layer == 0]
    norm = next(n for n in layer0 if n.meta["planc"].fqn == "model.layers.0.input_layernorm")
    readers = {n.meta["planc"].fqn for n in norm.users}
    assert readers == {f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                         "mlp.gate_proj", "mlp.up_proj")}
    adds = [n for n in layer0 if n.meta["planc"].kind == "add"]
    assert len(adds) == 2 and adds[1].args[0] is adds[0] and adds[0].args[0] is norm.args[0]  # (h + a) + m


def test_a_parallel_layer_under_tp_sums_both_partials_with_one_all_reduce(tmp_path):
    """o_proj and down_proj both row-parallel: h + all_reduce(a) + m becomes h + all_reduce(a + m)."""
    model = build("cohere_parallel")
    plan = PLAN + '  - match: "model.layers.*.mlp"\n    mlp: {strategy: tp}\n'
    art = compile(model, parse_plan_text(plan, "plan.yaml"), tmp_path / "out")
    nodes = {n["name"]: n for n in art.report["graph_nodes"]["dense_tp"]}
    reduces = [n for n in nodes.values() if n["kind"] == "all_reduce"]
    assert len(reduces) == 3  # one per layer, not one per branch
    for reduce in reduces:
        both = nodes[reduce["args"][0]]
        assert both["kind"] == "add"
        assert {nodes[a]["fqn"].rsplit(".", 1)[-1] for a in both["args"]} == {"o_proj", "down_proj"}
    assert art.report["collectives_per_decode_step"]["all_reduce"]["calls"] == 3
    prompt = torch.randint(0, 256, (17,), generator=torch.Generator().manual_seed(1)).tolist()
    got = run_threads(lambda comm: generate(Model(str(art.path), comm=comm), [prompt], 6, keep_logits=True), 2)[0]
    with torch.no_grad():
        want = model(torch.tensor([prompt + got.tokens[0]]), use_cache=False).logits[0, len(prompt) - 1:-1]
    assert max((g[0] - w).abs().max().item() for g, w in zip(got.step_logits, want)) <= 1e-4
    # T3 has no single GEMM to fuse with the shared all-reduce, and says so
    overlap = plan + '  - match: "model.layers.*.self_attn.o_proj"\n    overlap: {kind: t3, required: true}\n'
    with pytest.raises(CompileError, match="summed with another partial"):
        compile(model, parse_plan_text(overlap, "plan.yaml"), tmp_path / "t3")


@pytest.mark.parametrize(("name", "norms", "says"), [
    # Cohere's children (one norm, parallel) wired in sequence: the MLP reads h + attention output
    ("cohere_parallel", ("input_layernorm", "input_layernorm"), r"lift declined for \d+ block\(s\)"),
    # Olmo2's children (post-norms) wired as a pre-norm layer
    ("olmo2_post_norms", ("post_attention_layernorm", "post_feedforward_layernorm"),
     r"lift declined .*\n  model.layers.0 \(residual\): residual wiring differs"),
])
def test_children_named_for_one_layout_but_wired_as_another_are_refused(name, norms, says):
    def pre_norm(self, hidden_states, position_embeddings=None, **kwargs):
        normed = getattr(self, norms[0])(hidden_states)
        h = hidden_states + self.self_attn(hidden_states=normed, position_embeddings=position_embeddings, **kwargs)[0]
        return h + self.mlp(getattr(self, norms[1])(h))

    model = build(name)
    for layer in model.model.layers:
        layer.__class__ = type("PreNormWired", (type(layer),), {"forward": pre_norm})
    with pytest.raises(CompileError, match=says):
        lift(model, check=True)


def _layer_config(cls: str, **kw) -> T.PretrainedConfig:
    return getattr(T, cls)(**COMMON, **kw)


@pytest.mark.parametrize(("config", "says"), [
    # a shared MLP beside the MoE block, outside it
    (_layer_config("GraniteMoeSharedConfig", num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=64),
     "children block_sparse_moe, input_layernorm, post_attention_layernorm, self_attn, shared_mlp are not a decoder "
     "layer layout"),
    # a norm between the attention and o_proj: recognized by its q/k/v/o children, but another op
    # q/k norms without a weight: not the q/k norm gqa_attention applies
    (_layer_config("NanoChatConfig"), "model.layers.0.self_attn (NanoChatAttention): q_norm (NanoChatRMSNorm) and "
                                      "k_norm are not RMSNorms scaling by a weight"),
    (_layer_config("BitNetConfig"), "model.layers.0.self_attn (BitNetAttention): attn_sub_norm holds weights that "
                                    "planc's gqa_attention does not read"),
    # value heads wider than the key heads
    (_layer_config("MiMoV2FlashConfig", head_dim=16, v_head_dim=32, mlp_layer_types=["dense"] * 3),
     "model.layers.0.self_attn (MiMoV2FlashAttention): v_proj has 64 outputs and k_proj 32: value heads of another "
     "width than the 16-wide key heads"),
])
def test_a_layout_planc_does_not_lift_is_refused_by_name(config, says):
    with pytest.raises(ModelError, match=says.replace("(", r"\(").replace(")", r"\)")):
        recognize(build("", config=config))


def test_a_model_whose_layers_name_their_attention_otherwise_is_refused_before_its_rope_is_read():
    """ModernBERT's decoder: one rope per layer type, its layers' attention named `attn`."""
    config = T.ModernBertDecoderConfig(vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, pad_token_id=258, bos_token_id=256, eos_token_id=257)
    with pytest.raises(ModelError, match="ModernBertDecoderForCausalLM: not a decoder LM laid out as"):
        lift(build("", config=config), check=False)


def test_a_model_with_no_model_layers_is_refused_before_its_layers_are_compared():
    """GPT-2 keeps its blocks under transformer.h: the lift says what layout it lifts."""
    config = T.GPT2Config(vocab_size=260, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    with pytest.raises(ModelError, match="GPT2LMHeadModel: not a decoder LM laid out as"):
        lift(build("", config=config), check=False)


def test_fused_projections_lift_as_their_parts_and_ranks_get_only_the_parts(tmp_path):
    model = build("phi3_fused_partial_rope")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    plan = PLAN + '  - match: "model.layers.*.mlp"\n    mlp: {strategy: tp}\n'
    artifact = compile(model, parse_plan_text(plan, "plan.yaml"), tmp_path / "out").path
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "gate_proj")  # the caller's model comes back as it came
    split_fused(model)  # what the lift attaches while it compiles: the parts, copies of the fused rows
    q, k, v = attn.qkv_proj.weight.split([64, 32, 32])
    assert all(torch.equal(part, getattr(attn, f"{p}_proj").weight) for p, part in zip("qkv", (q, k, v)))
    assert torch.equal(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.gate_up_proj.weight)
    blocks = {b.kind for b in recognize(model)}
    assert {"gqa_attention", "mlp"} <= blocks and "captured" not in blocks
    from safetensors.torch import load_file
    for rank in range(2):
        names = load_file(artifact / "programs" / "target" / "weights" / f"rank{rank}.safetensors")
        assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)
        assert names["model.layers.0.self_attn.q_proj.weight"].shape == (32, 64)  # 2 of 4 heads of 16
        assert names["model.layers.0.mlp.gate_proj.weight"].shape == (64, 64)  # half of I = 128
    prompt = list(range(40, 57))
    got = run_threads(lambda comm: generate(Model(str(artifact), comm=comm), [prompt], 4, keep_logits=True), 2)[0]
    with torch.no_grad():
        want = model(torch.tensor([prompt + got.tokens[0]]), use_cache=False).logits[0, len(prompt) - 1:-1]
    assert max((g[0] - w).abs().max().item() for g, w in zip(got.step_logits, want)) <= 1e-4


@pytest.mark.parametrize("name", ["phi", "starcoder2"])
def test_projections_named_otherwise_lift_under_planc_names_and_split_at_two_ranks(tmp_path, name):
    """Phi: attention output `dense`, an fc1 / fc2 MLP (gelu_new asked of its activation_fn), the
    attention and MLP in parallel from one LayerNorm, the last norm `final_layernorm`. StarCoder2: a
    c_fc / c_proj MLP. Each projection is attached under planc's name sharing its weights, so a rank
    receives only those, split like any o_proj / up_proj / down_proj."""
    config = T.PhiConfig(**COMMON) if name == "phi" else T.Starcoder2Config(**COMMON, sliding_window=WINDOW)
    model = build("", config=config)
    plan = PLAN + '  - match: "model.layers.*.mlp"\n    mlp: {strategy: tp}\n'
    artifact = compile(model, parse_plan_text(plan, "plan.yaml"), tmp_path / "out").path
    from safetensors.torch import load_file
    rank1 = load_file(artifact / "programs" / "target" / "weights" / "rank1.safetensors")
    layer0 = {k.removeprefix("model.layers.0."): tuple(v.shape) for k, v in rank1.items()
              if k.startswith("model.layers.0.") and k.endswith("weight") and "proj" in k}
    assert layer0["self_attn.o_proj.weight"] == (64, 32) and layer0["mlp.up_proj.weight"] == (64, 64)
    assert layer0["mlp.down_proj.weight"] == (64, 64)
    assert not [k for k in rank1 if k.rsplit(".", 2)[-2] in ("dense", "fc1", "fc2", "c_fc", "c_proj")]  # only the parts
    assert _two_ranks_against_transformers(model, artifact, list(range(40, 57))) <= 1e-4


def test_a_fused_projection_packed_otherwise_is_declined_not_compiled_into_another_model():
    model = build("phi3_fused_partial_rope")
    mlp = model.model.layers[1].mlp

    def up_first(x):  # gate_up_proj's rows read as [up; gate]: not the split planc makes
        up, gate = mlp.gate_up_proj(x).chunk(2, dim=-1)
        return mlp.down_proj(up * mlp.activation_fn(gate))

    mlp.forward = up_first
    with pytest.raises(CompileError, match=r"lift declined for 1 block\(s\).*\n  model.layers.1.mlp: "):
        lift(model, check=True)


def test_longrope_turns_by_its_long_factors_from_the_step_that_passes_the_original_context(tmp_path):
    model = build("phi3_longrope")
    artifact = compile(model, parse_plan_text(PLAN, "plan.yaml"), tmp_path / "out").path
    rotary = model.model.rotary_emb
    long_rope(model)  # what the lift reads, made buffers (the compile took them off the model again)
    assert int(rotary.long_after) == WINDOW and not torch.equal(rotary.long_inv_freq, rotary.short_inv_freq)
    prompt, steps = [40, 41, 42, 43], 8  # positions 0-3 short; the decode step writing position 6 turns long
    got = run_threads(lambda comm: generate(Model(str(artifact), comm=comm), [prompt], steps, keep_logits=True), 2)[0]
    with torch.no_grad():  # transformers' generate re-reads the whole sequence with the long set at that step
        want = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=258)
    assert got.tokens[0] == want.sequences[0, len(prompt):].tolist()
    assert max((g[0] - w[0]).abs().max().item() for g, w in zip(got.step_logits, want.logits)) <= 1e-4
    # transformers decides that step by slots, planc by positions: with left padding the longest row has none
    rows = run_threads(lambda comm: generate(Model(str(artifact), comm=comm), [prompt, [50, 51]], steps,
                                             keep_logits=True, pad_id=258), 2)[0]
    ids = torch.tensor([prompt, [258, 258, 50, 51]])
    with torch.no_grad():
        both = model.generate(ids, attention_mask=(ids != 258).long(), max_new_tokens=steps, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=258)
    assert rows.tokens == both.sequences[:, len(prompt):].tolist()
    assert max((g - w).abs().max().item() for g, w in zip(rows.step_logits, both.logits)) <= 1e-4
    short_only = build("phi3_longrope")  # the same model turned by its short factors throughout differs
    short_only.model.rotary_emb.rope_type = "default"
    with torch.no_grad():
        other = short_only(want.sequences, use_cache=False).logits[0, -2]
    assert (other - want.logits[-1][0]).abs().max().item() > 1e-3


def test_a_rope_rescaled_at_every_length_is_refused_by_name():
    model = build("", config=_layer_config("LlamaConfig", rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ModelError, match="rope_type 'dynamic' rescales the rotary frequencies"):
        lift(model, check=False)


def test_an_mlp_with_weights_beyond_gate_up_down_is_not_lifted_as_one():
    from planc.lift.recognize import _is_mlp

    bitnet = build("", config=_layer_config("BitNetConfig"))
    assert not _is_mlp(bitnet.model.layers[0].mlp)  # its ffn_sub_norm: the block runs as captured instead
    assert _is_mlp(build("mistral_window").model.layers[0].mlp)


def test_an_mlp_without_a_gate_splits_up_and_down_and_is_exact_at_two_ranks(tmp_path):
    """Arcee: down(relu(up(x))²), its activation asked of its act_fn; under tp up is column-parallel
    and down row-parallel, as a gated MLP's are."""
    model = build("", config=T.ArceeConfig(**COMMON, head_dim=16))
    assert {(b.attrs["act"], b.attrs.get("gated")) for b in recognize(model) if b.kind == "mlp"} == {("relu2", False)}
    plan = PLAN + '  - match: "model.layers.*.mlp"\n    mlp: {strategy: tp}\n'
    artifact = compile(model, parse_plan_text(plan, "plan.yaml"), tmp_path / "out").path
    from safetensors.torch import load_file
    rank1 = load_file(artifact / "programs" / "target" / "weights" / "rank1.safetensors")
    assert {k.rsplit(".", 2)[-2]: tuple(v.shape) for k, v in rank1.items() if k.startswith("model.layers.0.mlp.")} == {
        "up_proj": (64, 64), "down_proj": (64, 64)}  # I = 128, half per rank
    assert "ops.act(" in (artifact / program_file("target")).read_text()
    assert _two_ranks_against_transformers(model, artifact, list(range(40, 57))) <= 1e-4


def test_scales_between_blocks_are_read_from_the_captured_graph():
    graph = lift(build("granite_multipliers"), check=True).graph
    nodes = [n.meta["planc"] for n in graph.nodes if "planc" in n.meta]
    assert next(m for m in nodes if m.kind == "embedding").dims.scale == Scale("mul", 12.0)
    assert {m.dims for m in nodes if m.kind == "add"} == {Scale("mul", 0.22)}  # both branches of every layer
    assert [m.dims for m in nodes if m.kind == "scale"] == [Scale("div", 8.0)]  # the logits


def test_offset_norms_and_a_scaled_embedding_are_read_from_the_modules():
    blocks = recognize(build("gemma_offset_norms"))
    assert {b.attrs["offset"] for b in blocks if b.kind == "rmsnorm"} == {1.0}
    assert blocks[0].attrs["scale"] == Scale("mul", 8.0)  # √64
    assert {b.attrs["offset"] for b in recognize(build("mistral_window")) if b.kind == "rmsnorm"} == {0.0}


def _two_ranks_against_transformers(model: torch.nn.Module, artifact, prompt: list[int], steps: int = 4) -> float:
    """The largest logit difference over `steps` greedy steps of the artifact on 2 thread ranks
    against the model's own forward over the same tokens."""
    got = run_threads(lambda comm: generate(Model(str(artifact), comm=comm), [prompt], steps, keep_logits=True), 2)[0]
    with torch.no_grad():
        want = model(torch.tensor([prompt + got.tokens[0]]), use_cache=False).logits[0, len(prompt) - 1:-1]
    assert len(got.step_logits) == steps
    return max((g[0] - w).abs().max().item() for g, w in zip(got.step_logits, want))


def minicpm3() -> torch.nn.Module:
    """MLA with constants between its blocks: embeddings × scale_emb inside their module, each
    residual branch × scale_depth / √layers, the final norm's output ÷ logits_scaling before lm_head."""
    config = T.MiniCPM3Config(**{**COMMON, "num_key_value_heads": 4}, kv_lora_rank=16, q_lora_rank=32,
                              qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, scale_emb=12.0,
                              scale_depth=1.4, dim_model_base=16, tie_word_embeddings=False)
    return build("", config=config)


MLA_PLAN = PLAN.replace("strategy: tp", "strategy: mla_tp")


def test_a_scale_between_the_final_norm_and_lm_head_is_read_and_exact_at_two_ranks(tmp_path):
    model = minicpm3()
    graph = lift(model, check=True).graph
    nodes = [n.meta["planc"] for n in graph.nodes if "planc" in n.meta]
    assert [m.dims for m in nodes if m.kind == "scale"] == [Scale("div", 4.0)]  # hidden 64 / dim_model_base 16
    assert nodes[-1].fqn == "lm_head" and nodes[-2].kind == "scale"  # before lm_head, not after
    assert {m.dims for m in nodes if m.kind == "add"} == {Scale("mul", 1.4 / 3 ** 0.5)}
    artifact = compile(model, parse_plan_text(MLA_PLAN, "plan.yaml"), tmp_path / "out").path
    assert _two_ranks_against_transformers(model, artifact, list(range(40, 57))) <= 1e-4


def test_an_moe_block_planc_does_not_lift_runs_as_captured_with_aten_experts(tmp_path):
    """PhiMoE's sparsemixer router is not one planc lifts: the block runs as captured, its experts
    exported through transformers' batched_mm (aten) rather than the grouped_mm kernel pinned for
    capture, which rank processes could not import; the model keeps its own setting."""
    config = T.PhimoeConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "grouped_mm"
    model = build("", config=config)
    artifact = compile(model, parse_plan_text(PLAN, "plan.yaml"), tmp_path / "out").path
    assert model.config._experts_implementation == "grouped_mm"
    program = (artifact / program_file("target")).read_text()
    assert "torch.ops.transformers" not in program and "def captured_L0_mlp" in program
    assert _two_ranks_against_transformers(model, artifact, list(range(30, 47))) <= 1e-4


MOE_PLAN = PLAN + """  - match: "model.layers.*.mlp"
    moe: {strategy: ep}
"""


@pytest.mark.parametrize("config", [
    # sigmoid scores, a correction bias the MoE block holds and hands to its gate, renormalized
    T.MiniMaxM2Config(**COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=2),
    # the same with a shared expert and a scaling factor (router_scaling_factor)
    T.HYV3Config(**{**COMMON, "num_hidden_layers": 2}, head_dim=16, num_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=32, router_scaling_factor=2.5, mlp_layer_types=["sparse", "sparse"]),
], ids=["minimax_m2", "hy_v3"])
def test_a_correction_bias_held_by_the_moe_block_routes_as_transformers_does_at_two_ranks(tmp_path, config):
    config._experts_implementation = "grouped_mm"
    model = build("", config=config)
    with torch.no_grad():  # a bias that changes the choice: zeros (the initial value) would not show a missing one
        for layer in model.model.layers:
            layer.mlp.e_score_correction_bias.copy_(torch.randn(4, generator=torch.Generator().manual_seed(3)))
    artifact = compile(model, parse_plan_text(MOE_PLAN, "plan.yaml"), tmp_path / "out").path
    assert _two_ranks_against_transformers(model, artifact, list(range(50, 67))) <= 1e-4


def test_afmoe_gated_heads_rope_on_windowed_layers_and_a_held_expert_bias_are_exact_at_two_ranks(tmp_path):
    """AFMoE: each head's output scaled by sigmoid(gate_proj(x)) before o_proj (gate_proj split with
    q's heads), rope on the windowed layers only, sandwich norms named pre_/post_mlp_layernorm, a
    sigmoid router handed the block's `expert_bias` and scaling by route_scale, a shared expert."""
    config = T.AfmoeConfig(**COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           num_dense_layers=1, route_scale=2.5, sliding_window=WINDOW,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    model = build("", config=config)
    with torch.no_grad():  # a bias that changes the choice: zeros (the initial value) would not show a missing one
        for layer in model.model.layers[1:]:
            layer.mlp.expert_bias.copy_(torch.randn(4, generator=torch.Generator().manual_seed(3)))
    attention = _attention_of(model)
    assert [(d.rope_dim, d.output_gate) for d in attention] == [(None, True), (0, True), (None, True)]
    plan = PLAN + """  - match: "model.layers.0.mlp"
    mlp: {strategy: tp}
  - match: "model.layers.*.mlp"
    moe: {strategy: ep}
"""
    artifact = compile(model, parse_plan_text(plan, "plan.yaml"), tmp_path / "out").path
    program = (artifact / program_file("target")).read_text()
    assert "self_attn.gate_proj" in program and "ops.sigmoid_scale(" in program
    assert _two_ranks_against_transformers(model, artifact, list(range(50, 67))) <= 1e-4


def test_a_clamped_glu_in_experts_shared_expert_and_dense_mlp_is_exact_at_two_ranks(tmp_path):
    """MiniMax-M3: gpt-oss's clamped GLU (named swiglu_limit / swiglu_alpha) in its experts (common
    layout, halves), its shared expert and its dense layer's MLP; the experts' sum scaled by the
    MoE block's routed_scaling_factor. A limit of 0.5 bites on these activations."""
    config = T.MiniMaxM3VLTextConfig(**COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                     dense_intermediate_size=128, shared_intermediate_size=64, swiglu_limit=0.5,
                                     routed_scaling_factor=2.0, mlp_layer_types=["dense", "sparse", "sparse"])
    model = build("", config=config)
    split_fused(model)  # its MLPs' gate_up_proj: gate_proj and up_proj, as the lift splits them
    blocks = recognize(model)
    dense, moe = [b for b in blocks if b.kind == "mlp"], [b for b in blocks if b.kind == "moe"]
    assert [(b.attrs["act"], b.attrs["limit"], b.attrs["alpha"]) for b in dense] == [("clamped_glu", 0.5, 1.702)]
    assert {(b.attrs["layout"].limit, b.attrs["layout"].alpha, b.dims.scaling) for b in moe} == {(0.5, 1.702, 2.0)}
    plan = PLAN + """  - match: "model.layers.0.mlp"
    mlp: {strategy: tp}
  - match: "model.layers.*.mlp"
    moe: {strategy: tp}
"""
    artifact = compile(model, parse_plan_text(plan, "plan.yaml"), tmp_path / "out").path
    assert "ops.gated_act(g, u, 'clamped_glu', 0.5, 1.702)" in (artifact / program_file("target")).read_text()
    assert _two_ranks_against_transformers(model, artifact, list(range(40, 57))) <= 1e-4


def _gpt_oss_with_biases_that_bite() -> torch.nn.Module:
    """gpt-oss whose router and expert biases are not zero (their initial value would not show a
    missing one) and whose clamp (swiglu_limit) cuts the activations on these weights."""
    config = configs()["gpt_oss_sinks"]  # a fresh config
    config.swiglu_limit = 0.05
    model = build("", config=config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            mlp.router.bias.copy_(torch.randn(4, generator=g))
            mlp.experts.gate_up_proj_bias.copy_(0.1 * torch.randn(mlp.experts.gate_up_proj_bias.shape, generator=g))
            mlp.experts.down_proj_bias.copy_(0.1 * torch.randn(mlp.experts.down_proj_bias.shape, generator=g))
    return model


@pytest.mark.parametrize("strategy", ["ep", "tp"])
@pytest.mark.parametrize("name", ["granitemoe_block_sparse_moe", "gpt_oss"])
def test_moe_blocks_with_a_router_named_router_split_their_experts_at_two_ranks(tmp_path, name, strategy):
    """GraniteMoE: router `router`, common experts. gpt-oss: router with a bias; experts transposed
    ([E, D, 2I], x @ W), gate and up columns interleaved, biases, the clamped GLU. ep: 2 of the 4
    experts per rank; tp: half of every expert's intermediate dim per rank."""
    model = _gpt_oss_with_biases_that_bite() if name == "gpt_oss" else build(name)
    ffn = "mlp" if name == "gpt_oss" else "block_sparse_moe"
    moe = [b for b in recognize(model) if b.kind == "moe"]
    assert len(moe) == 3 and moe[0].dims.module == "router" and moe[0].dims.bias == (name == "gpt_oss")
    layout = moe[0].attrs["layout"]
    windows = [0, 1, 0] if name == "gpt_oss" else [0, 0, 0]  # gpt-oss: a window on every other layer
    assert list(representatives(model.model.layers, recognize(model)).values()) == windows  # one capture per structure
    assert (layout.transposed, layout.interleaved, layout.bias, layout.limit) == (
        (True, True, True, 0.05) if name == "gpt_oss" else (False, False, False, None))
    if name == "gpt_oss":  # the clamp bites on these weights: without it the block's output differs
        x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(2))
        W = {k: v.detach() for k, v in model.model.layers[0].mlp.state_dict().items()}
        ops, args = Ops(), (moe[0].dims, moe[0].attrs["act"], None, None)
        unclamped = dataclasses.replace(layout, limit=1e9)
        assert (ops.moe(x, W, *args, layout) - ops.moe(x, W, *args, unclamped)).abs().max() > 1e-3
    plan = PLAN + f'  - match: "model.layers.*.{ffn}"\n    moe: {{strategy: {strategy}}}\n'
    artifact = compile(model, parse_plan_text(plan, "plan.yaml"), tmp_path / "out").path
    from safetensors.torch import load_file
    rank1 = load_file(artifact / "programs" / "target" / "weights" / "rank1.safetensors")
    experts = {k.rsplit(".", 1)[-1]: v.shape for k, v in rank1.items() if k.startswith(f"model.layers.0.{ffn}.experts.")}
    assert len(experts) == (4 if name == "gpt_oss" else 2)
    if strategy == "ep":
        assert {k: v[0] for k, v in experts.items()} == dict.fromkeys(experts, 2)  # 2 of 4 experts, biases too
    elif name == "gpt_oss":  # E = 4, D = 64, I = 128: 64 of I per rank (gate and up: 2 x 64), down's bias whole
        assert experts == {"gate_up_proj": (4, 64, 128), "down_proj": (4, 64, 64), "gate_up_proj_bias": (4, 128),
                           "down_proj_bias": (4, 64)}
    else:
        assert experts == {"gate_up_proj": (4, 128, 64), "down_proj": (4, 64, 64)}
    assert _two_ranks_against_transformers(model, artifact, list(range(40, 57))) <= 1e-4


@pytest.mark.parametrize("strategy", ["ep", "tp"])
def test_a_router_whose_logits_gemm_is_its_child_beside_a_shared_mlp_splits_at_two_ranks(tmp_path, strategy):
    """HunYuan-MoE: the router's weight lives in its one Linear child (`gate.wg`, kept in fp32 in a
    bf16 model: its logits are fp32 there) and the shared expert MLP is named shared_mlp."""
    config = T.HunYuanMoEV1Config(**COMMON, head_dim=16, num_experts=4, moe_topk=2)
    config._experts_implementation = "grouped_mm"
    model = build("", config=config)
    moe = [b for b in recognize(model) if b.kind == "moe"]
    assert len(moe) == 3 and (moe[0].dims.module, moe[0].attrs["shared"]) == ("gate.wg", "shared_mlp")
    meta = [b.dims for b in recognize(init_model(config, torch.bfloat16, meta=True)) if b.kind == "moe"]
    assert meta == [dataclasses.replace(moe[0].dims, fp32_logits=True)] * 3
    plan = PLAN + f'  - match: "model.layers.*.mlp"\n    moe: {{strategy: {strategy}}}\n'
    artifact = compile(model, parse_plan_text(plan, "plan.yaml"), tmp_path / "out").path
    assert _two_ranks_against_transformers(model, artifact, list(range(40, 57))) <= 1e-4


def test_a_sigmoid_gated_shared_expert_and_the_routed_experts_split_share_one_all_reduce(tmp_path):
    """Qwen2-MoE: shared = sigmoid(shared_expert_gate(x)) · shared_expert(x), the gate computed
    alike on every rank, so all_reduce(routed) + gate · all_reduce(down) is
    all_reduce(routed + gate · down)."""
    config = T.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                              shared_expert_intermediate_size=64)
    config._experts_implementation = "grouped_mm"
    model = build("", config=config)
    plan = (PLAN + '  - match: "model.layers.*.mlp.shared_expert"\n    mlp: {strategy: tp}\n'
            '  - match: "model.layers.*.mlp"\n    moe: {strategy: tp}\n')
    art = compile(model, parse_plan_text(plan, "plan.yaml"), tmp_path / "out")
    nodes = {n["name"]: n for n in list(art.report["graph_nodes"].values())[-1]}
    in_moe = [n for n in nodes.values() if n["kind"] == "all_reduce" and n["block"].endswith(".mlp")]
    assert len(in_moe) == 3  # one per MoE layer
    summed = [nodes[a]["kind"] for n in in_moe for a in nodes[n["args"][0]]["args"]]
    assert summed == ["moe", "sigmoid_scale"] * 3
    assert _two_ranks_against_transformers(model, art.path, list(range(40, 57))) <= 1e-4


def test_transposed_experts_holding_gate_and_up_as_halves_are_told_from_interleaved_ones_on_a_probe(tmp_path):
    """Aria's experts are transposed as gpt-oss's are ([E, D, 2I], x @ W), but gate and up are the two
    halves of the columns, not alternating ones: asked of the experts on a probe with random weights,
    so a model on meta reads the same; exact at 2 ranks with 2 of the 4 experts each."""
    config = T.AriaTextConfig(**COMMON, head_dim=16, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1)
    model = build("", config=config)
    layouts = {b.attrs["layout"] for b in recognize(model) if b.kind == "moe"}
    assert {(layout.transposed, layout.interleaved) for layout in layouts} == {(True, False)}
    with torch.device("meta"):
        on_meta = T.AutoModelForCausalLM.from_config(config)
    assert {b.attrs["layout"] for b in recognize(on_meta) if b.kind == "moe"} == layouts
    artifact = compile(model, parse_plan_text(MOE_PLAN, "plan.yaml"), tmp_path / "out").path
    assert _two_ranks_against_transformers(model, artifact, list(range(40, 57))) <= 1e-4


@pytest.mark.parametrize(("name", "narrowed"), [("granitemoe_block_sparse_moe", True), ("gpt_oss_sinks", True),
                                                 ("mixtral", False)])
def test_whether_router_weights_come_back_in_the_model_dtype_is_asked_of_the_router(name, narrowed):
    """In bfloat16 GraniteMoE and gpt-oss round their k weights to the model dtype before they
    scale the experts; Mixtral keeps them in fp32. (In fp32 both are the same.)"""
    config = T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2) if name == "mixtral" else configs()[name]
    model = build("", config=config).to(torch.bfloat16)
    routers = [b.dims for b in recognize(model) if b.kind == "moe"]
    assert {r.weights_in_model_dtype for r in routers} == {narrowed}


@pytest.mark.parametrize("name", ["granitemoe_block_sparse_moe", "gpt_oss_sinks", "phimoe"])
def test_a_router_is_asked_on_a_probe_so_a_model_on_meta_reads_as_on_weights(name):
    """The probe holds its own random weights: on meta a router reads as it does on real weights,
    and PhiMoE's sparsemixer (not the softmax top-k its attributes would suggest) is refused both
    ways, its block run as captured."""
    config = (T.PhimoeConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2) if name == "phimoe"
              else configs()[name])
    def ffn_blocks(model):
        return [(b.kind, b.dims if b.kind == "moe" else None) for b in recognize(model)
                if b.fqn.endswith((".mlp", ".block_sparse_moe"))]

    real, meta = ffn_blocks(build("", config=config)), ffn_blocks(init_model(config, torch.bfloat16, meta=True))
    assert {kind for kind, _ in real + meta} == {"captured" if name == "phimoe" else "moe"} and len(meta) == 3
    narrowed = [dataclasses.replace(dims, weights_in_model_dtype=True) if dims else None for _, dims in real]
    assert [dims for _, dims in meta] == narrowed  # bf16 on meta: the weights come back in bf16


def test_per_head_qk_norms_after_rope_are_read_and_exact_at_two_ranks(tmp_path):
    """HunYuan normalizes each head after rope. With norm weights that are not all one the order
    shows (rope turns pairs, so with a uniform weight it would not), and the lift reads it."""
    model = build("hunyuan_dense_norms_after_rope")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("query_layernorm", "key_layernorm"):
                getattr(layer.self_attn, name).weight.normal_(1.0, 0.5, generator=g)
    dims = _attention_of(model)
    assert {(d.qk_norm, d.qk_norm_names, d.qk_norm_after_rope) for d in dims} == {
        ("head", ("query_layernorm", "key_layernorm"), True)}
    block = next(b for b in recognize(model) if b.kind == "gqa_attention")
    x = torch.randn(1, 6, 64, generator=g)
    W = block_weights(model, block.fqn)
    before = dataclasses.replace(block, dims=dataclasses.replace(block.dims, qk_norm_after_rope=False))
    assert (run_reference(block, x, W) - run_reference(before, x, W)).abs().max() > 1e-3
    artifact = compile(model, parse_plan_text(PLAN, "plan.yaml"), tmp_path / "out").path
    assert _two_ranks_against_transformers(model, artifact, list(range(80, 97))) <= 1e-4


def test_per_head_qk_norms_scaling_by_one_plus_weight_are_exact_at_two_ranks(tmp_path):
    """MiniMax-M3's q/k norms are Gemma's (x̂ · (1 + w) in fp32): here in a Qwen3, whose own are x̂ · w."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    model = build("", config=T.Qwen3Config(**COMMON, head_dim=16))
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("q_norm", "k_norm"):
                norm = GemmaRMSNorm(16, eps=1e-6)
                norm.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
                setattr(layer.self_attn, name, norm)
    assert {b.dims.qk_offset for b in recognize(model) if b.kind == "gqa_attention"} == {1.0}
    artifact = compile(model, parse_plan_text(PLAN, "plan.yaml"), tmp_path / "out").path
    assert _two_ranks_against_transformers(model, artifact, list(range(60, 77))) <= 1e-4


def test_an_moe_block_with_weights_the_moe_op_does_not_read_runs_as_captured(tmp_path):
    """A.X-K1: DeepSeek-V3's MoE with a norm on the block's output (post_mlp_layernorm)."""
    config = T.AXK1Config(**{**COMMON, "num_key_value_heads": 4}, head_dim=8, kv_lora_rank=16, q_lora_rank=32,
                          qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_shared_experts=1,
                          n_group=2, topk_group=1)
    config._experts_implementation = "grouped_mm"
    model = build("", config=config)
    moe = [b for b in recognize(model) if b.fqn.endswith(".mlp")][1:]
    assert {b.kind for b in moe} == {"captured"}
    assert "post_mlp_layernorm holds weights that planc's moe does not read" in moe[0].attrs["why"]
    artifact = compile(model, parse_plan_text(MLA_PLAN, "plan.yaml"), tmp_path / "out").path
    assert _two_ranks_against_transformers(model, artifact, list(range(70, 87))) <= 1e-4


def test_what_enters_lm_head_is_checked_against_the_final_norms_output(monkeypatch):
    import planc.lift

    def unscaled(found):  # as if the glue reader had missed MiniCPM3's ÷ before lm_head
        return dataclasses.replace(read_glue(found), head_input=None)

    monkeypatch.setattr(planc.lift, "read_glue", unscaled)
    with pytest.raises(CompileError, match=r"model.norm \(glue\): the final norm's output as lm_head's input differs"):
        lift(minicpm3(), check=True)


@pytest.mark.parametrize(("attention", "mlp", "says"), [
    (2.0, 1.0, "model.layers.0.self_attn (glue): model.layers.0.input_layernorm's output as model.layers.0.self_attn's input"),
    (1.0, 3.0, "model.layers.0.mlp (glue): model.layers.0.post_attention_layernorm's output as model.layers.0.mlp's input"),
])
def test_a_layer_that_scales_a_norms_output_before_its_block_is_refused(attention, mlp, says):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class Scaled(LlamaDecoderLayer):  # every block checks alone; only the junction differs
        def forward(self, hidden_states, position_embeddings=None, **kwargs):
            h = self.input_layernorm(hidden_states) * attention
            h = hidden_states + self.self_attn(hidden_states=h, position_embeddings=position_embeddings, **kwargs)[0]
            return h + self.mlp(self.post_attention_layernorm(h) * mlp)

    model = build("", config=_layer_config("LlamaConfig"))
    for layer in model.model.layers:
        layer.__class__ = Scaled
    with pytest.raises(CompileError, match=re.escape(says) + " differs"):
        lift(model, check=True)


def test_a_junction_planc_cannot_reproduce_is_a_lift_error_not_a_different_model():
    model = build("", config=_layer_config("LlamaConfig"))
    model.model.layers[0].register_forward_hook(lambda _m, _i, out: out * 1.5 + 1.0)  # between layers 0 and 1
    with pytest.raises(CompileError, match=r"model.layers.0 \(glue\): h \+ the feed-forward branch's output as "
                                           r"model.layers.1.input_layernorm's input differs"):
        lift(model, check=True)


@pytest.mark.parametrize("name", ["granite_multipliers", "mistral_window", "minicpm3"])
def test_the_torch_compile_backend_lifts_the_same_layouts_from_dynamos_graph(tmp_path, name):
    torch._dynamo.reset()
    strategy = "mla_tp" if name == "minicpm3" else "tp"
    (tmp_path / "plan.yaml").write_text('version: 1\nmesh: {devices: 1}\nrules:\n  - match: "model.layers.*.self_attn"\n'
                                        f'    attention: {{strategy: {strategy}}}\n')
    model = minicpm3() if name == "minicpm3" else build(name)
    compiled = torch.compile(model, backend="planc", options={"plan": str(tmp_path / "plan.yaml")})
    ids = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    assert (compiled(ids, use_cache=False).logits - want).abs().max().item() <= 1e-4


def test_a_linear_attention_with_qkvo_projections_is_refused_as_no_softmax_attention():
    """Kimi Linear's delta-rule layers hold q/k/v/o projections but no head width or score scale."""
    config = T.KimiLinearConfig(**{**COMMON, "num_hidden_layers": 2})
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ModelError, match=r"model.layers.0.self_attn \(KimiLinearDeltaAttention\): not a recognized "
                                         "attention block"):
        lift(model, check=False)
