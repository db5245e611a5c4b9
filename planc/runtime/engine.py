"""One rank of a compiled artifact: its weights, program, KV cache, and the generate loop.

Batches are left-padded: every row's newest token sits in the same cache slot, so decode writes
one slot per step for the whole batch; padded slots are masked out of attention.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from planc.codegen.artifact import program_file, weights_file
from planc.errors import ArtifactError
from planc.dims import DTYPES
from planc.ops import GqaCache, MlaCache, Step
from planc.runtime.artifact import ArtifactDir
from planc.runtime.comm import Comm
from planc.runtime.kernel_ops import make_ops
from planc.weights import Weights


class Rank:
    """Everything one rank holds; the generated program reads rt.ops / rt.comm / rt.weights / rt.kv."""

    def __init__(self, artifact: Path, comm: Comm, kernels: str = "torch"):
        files = ArtifactDir(artifact)
        self.manifest = files.manifest
        if self.manifest.get("meta"):
            raise ArtifactError(f"{artifact}: compiled with --meta (no weights); recompile without --meta to run it")
        if comm.world_size != self.manifest["world_size"]:
            raise ArtifactError(f"{artifact}: compiled for {self.manifest['world_size']} devices (mesh.devices) but "
                                f"launched on {comm.world_size}; run with --nproc {self.manifest['world_size']}")
        self.comm = comm
        self.ops = make_ops(kernels, files)
        self.program = files.load_module(program_file("target"), "planc_artifact_program")
        self.weights = Weights(load_file(files.path(weights_file("target", comm.rank))))
        self.dtype = DTYPES[self.manifest["dtype"]]
        self.kv: dict = {}

    def allocate(self, batch: int, capacity: int) -> None:
        """Preallocate this rank's cache: [batch, capacity, width] per attention layer."""
        self.kv = {fqn: _cache(spec, batch, capacity, self.dtype) for fqn, spec in self.manifest["programs"]["target"]["caches"].items()}

    def forward(self, ids_BS: torch.Tensor, step: Step) -> torch.Tensor:
        return self.program.forward(self, ids_BS, step)


def _cache(spec: dict, batch: int, capacity: int, dtype: torch.dtype):
    if spec["kind"] == "mla":
        return MlaCache(torch.zeros(batch, capacity, spec["ckv"], dtype=dtype), torch.zeros(batch, capacity, spec["kpe"], dtype=dtype))
    shape = (batch, capacity, spec["kv_heads"], spec["head_dim"])
    return GqaCache(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    seed: int = 0


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt (stopped rows end at their EOS)
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [B, V] per generated token
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = True
    return ids, mask


def _pick(logits_BV: torch.Tensor, sampling: Sampling, gen: torch.Generator) -> torch.Tensor:
    if sampling.temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).flatten()


@torch.no_grad()
def generate(rank: Rank, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_id: int | None = None, pad_id: int = 0, keep_logits: bool = False) -> Generation:
    """Prefill all prompts at once, then decode one token per row per step (same on every rank)."""
    ids, mask = left_pad(prompts, pad_id)
    B, P = ids.shape
    rank.allocate(B, P + max_new_tokens)
    key_mask = torch.zeros(B, P + max_new_tokens, dtype=torch.bool)
    key_mask[:, :P] = mask
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    gen = torch.Generator().manual_seed(sampling.seed)  # same seed on every rank: same samples
    out = Generation([[] for _ in prompts])
    done = torch.zeros(B, dtype=torch.bool)

    t0 = time.perf_counter()
    with rank.comm.phase("prefill"):
        logits = rank.forward(ids, Step(0, pos, key_mask))[:, -1]
    out.prefill_s = time.perf_counter() - t0
    last = pos[:, -1]
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        token = _pick(logits, sampling, gen)
        if keep_logits:
            out.step_logits.append(logits.float().clone())
        for row in (~done).nonzero().flatten().tolist():
            out.tokens[row].append(int(token[row]))
        done |= token == eos_id if eos_id is not None else torch.zeros_like(done)
        if i == max_new_tokens - 1 or bool(done.all()):
            break
        slot, last = P + i, last + 1
        key_mask[:, slot] = True
        with rank.comm.phase("decode"):
            logits = rank.forward(token[:, None], Step(slot, last[:, None], key_mask))[:, -1]
        out.decode_steps += 1
    out.decode_s = time.perf_counter() - t0
    return out
