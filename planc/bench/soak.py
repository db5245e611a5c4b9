"""`planc bench soak`: 2,000 decode steps of tiny-deepseek on 4 gloo ranks; each rank's resident memory
(RSS) after warm-up (decode step 100) and at the end (step 2,000), and the decode tokens/s.

plans/deepseek_mla_tp_ep.yaml retargeted to 4 devices, one prompt (batch 1), greedy, no EOS stop.
generate() allocates the KV cache for the prompt plus every new token before the prefill, and each
step attends over the whole cache (masked), so a step's work and memory are the same at step 100 as
at step 2,000: resident memory that grows in between is a leak (kept logits, counters, status
records, allocator fragmentation). It passes when no rank grows by more than GROWTH_BOUND.

Each rank runs the generate loop with a strategy that reads /proc/self/statm as it picks a token:
pick k follows k - 1 decode steps, so the sample at decode step s is taken at pick s + 1.
"""
from __future__ import annotations

import resource
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from planc.bench.decode import PLAN, rank_threads, retarget
from planc.driver import compile
from planc.models.tokenizer import artifact_tokenizer
from planc.runtime.artifact import open_artifact
from planc.runtime.comm import Comm
from planc.runtime.decode import Greedy, generate
from planc.runtime.launch import launch, write_result
from planc.runtime.model import Model
from planc.verify import default_prompt_ids

STEPS = 2000
PROBES = (100, 2000)  # the first after warm-up, the last at the end
EVERY = 100  # also sampled every EVERY steps, to show the curve
GROWTH_BOUND = 0.05
PROMPT = "def fibonacci(n):\n    return"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@dataclass
class RssProbe:
    """Greedy decoding that samples this process's RSS at the given decode steps."""

    steps: set[int]
    rss: dict[int, int] = field(default_factory=dict)
    picks: int = 0

    def pick(self, logits_BV: torch.Tensor) -> torch.Tensor:
        if self.picks in self.steps:  # self.picks decode steps have run
            self.rss[self.picks] = rss_bytes()
        self.picks += 1
        return Greedy().pick(logits_BV)


def rank_main(args: dict) -> None:
    comm = Comm()
    model = Model(args["artifact"], comm=comm)
    probe = RssProbe(set(args["sample_steps"]))
    out = generate(model, args["prompts"], args["steps"] + 1, probe, eos_id=None, pad_id=0)
    write_result({"rank": comm.rank, "rss": probe.rss, "decode_s": out.decode_s, "decode_steps": out.decode_steps,
                  "kv_slots": model.cache.capacity})


def measure(artifact: Path, ranks: int, *, steps: int = STEPS, probes: Sequence[int] = PROBES,
            every: int = EVERY, bound: float = GROWTH_BOUND) -> dict:
    """Launch the soak on `ranks` ranks of a compiled artifact; figures per rank (see the module docstring)."""
    first, last = probes
    sample_steps = sorted({*range(every, steps + 1, every), first, last})
    opened = open_artifact(artifact)
    prompts = default_prompt_ids(opened.manifest, artifact_tokenizer(opened.manifest, opened.tokenizer_dir()), (PROMPT,))
    args = {"artifact": str(Path(artifact).resolve()), "prompts": prompts, "steps": steps, "sample_steps": sample_steps}
    with rank_threads() as threads:
        results = launch("planc.bench.soak:rank_main", args, ranks, timeout_s=3600)
    mib = {str(r["rank"]): {int(s): b / 2**20 for s, b in r["rss"].items()} for r in results}
    growth = {rank: rss[last] / rss[first] - 1 for rank, rss in mib.items()}
    r0 = results[0]
    return {
        "case": "soak", "model": "tiny-deepseek", "plan": PLAN.name, "ranks": ranks, "threads_per_rank": threads,
        "batch": 1, "prompt_tokens": len(prompts[0]), "decode_steps": r0["decode_steps"], "kv_slots": r0["kv_slots"],
        "probes": [first, last],
        "rss_mib": {rank: {str(first): rss[first], str(last): rss[last]} for rank, rss in mib.items()},
        "growth": growth, "max_growth": max(growth.values()), "bound": bound,
        "passed": max(growth.values()) <= bound,
        "decode_tokens_per_s": r0["decode_steps"] / r0["decode_s"],
        "rss_curve_mib": {rank: {str(s): round(v, 2) for s, v in rss.items()} for rank, rss in mib.items()},
    }


def run(ranks: int = 4) -> dict:
    with tempfile.TemporaryDirectory(prefix="planc-bench-soak-") as tmp:
        artifact = compile(None, retarget(ranks), Path(tmp, f"ranks{ranks}")).path
        return measure(artifact, ranks)


def table(result: dict) -> str:
    first, last = result["probes"]
    rows = [f"soak: {result['model']}, {result['plan']} on {result['ranks']} ranks, batch {result['batch']}, "
            f"{result['decode_steps']} decode steps over a {result['kv_slots']}-slot KV cache allocated up front",
            f"{'rank':>4} {f'RSS @{first} MiB':>14} {f'RSS @{last} MiB':>15} {'growth':>8}"]
    for rank, rss in result["rss_mib"].items():
        rows.append(f"{rank:>4} {rss[str(first)]:>14.1f} {rss[str(last)]:>15.1f} {result['growth'][rank]:>+8.2%}")
    verdict = "passed" if result["passed"] else "FAILED"
    rows.append(f"decode {result['decode_tokens_per_s']:.1f} tokens/s (rank 0); {verdict}: every rank's growth "
                f"<= {result['bound']:.0%} (largest {result['max_growth']:+.2%})")
    return "\n".join(rows)
