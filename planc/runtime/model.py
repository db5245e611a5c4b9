"""One program of an artifact on one rank: the object the generated program runs against.

program.py's `forward(rt, ids, step)` reads rt.ops, rt.comm, rt.weights and rt.kv (the per-layer
caches of this model's KvCache); a Model is that `rt`. An artifact may hold several programs
(a target and its draft), each loaded as its own Model with its own cache. A draft compiled with
EasySpec also has `forward_layer_parallel`, whose cache writes are fuzzy (KvCache.fuzzy_T); code
it calls counts its work per rank in rt.work. A Model given a Tracer runs its program with `forward`
stamping every node (`planc run --trace`, planc.runtime.trace).

A Model lives on its rank's device (Comm.device: the rank's GPU under NCCL, else the CPU): weights and
caches are loaded there and token ids and steps moved there; `forward` and `extend` return logits
on the CPU, where the decode strategies pick tokens from one seeded stream on every rank.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from planc.codegen.artifact import program_file, weights_file
from planc.dims import DTYPES
from planc.errors import ArtifactError, RunError
from planc.ops import GqaCache, MlaCache, Step
from planc.runtime import status
from planc.runtime.artifact import ArtifactDir
from planc.runtime.comm import Comm
from planc.runtime.kernel_ops import make_ops
from planc.runtime.kv_cache import KvCache
from planc.weights import Weights

if TYPE_CHECKING:
    from planc.runtime.trace import Tracer


class Model:
    """Program, weights, ops, comm and KV cache of one program on one rank."""

    def __init__(self, artifact: ArtifactDir | str | Path, program: str = "target", *,
                 comm: Comm | None = None, kernels: str = "torch", tracer: Tracer | None = None):
        artifact = artifact if isinstance(artifact, ArtifactDir) else ArtifactDir(artifact)
        comm = comm or Comm.single()
        _check_runnable(artifact, comm)
        spec = artifact.program(program)
        self.name = program
        self.manifest = artifact.manifest
        self.comm = comm
        self.device = comm.device
        _check_kernels(kernels, self.device)
        self.ops = make_ops(kernels, artifact)
        load = artifact.load_module if tracer is None else partial(tracer.load, artifact)
        self.program = load(program_file(program), f"planc_artifact_program_{program}")
        self.weights = Weights(load_file(artifact.path(weights_file(program, comm.rank)), device=str(self.device)))
        self.cache = KvCache(spec["caches"], DTYPES[spec.get("dtype", self.manifest["dtype"])], comm.rank,
                             device=self.device)
        self.steps = 0  # extend() calls since allocate(): step 0 is the prefill
        # a longrope model's original context: the first step past it re-reads the cached tokens
        self.long_after = next((int(t) for k, t in self.weights.items() if k.endswith(".rotary.long_after")), None)
        self.work: Counter[str] = Counter()  # forwards run, by kind, and what they ran on this rank

    def fingerprint(self) -> bytes:
        """sha256 of what this rank runs: the manifest (which holds every file's sha256) and the program."""
        return hashlib.sha256(json.dumps([self.manifest, self.name], sort_keys=True).encode()).digest()

    @property
    def kv(self) -> dict[str, MlaCache | GqaCache]:
        return self.cache.layers

    def allocate(self, batch: int, capacity: int) -> KvCache:
        self.cache.allocate(batch, capacity)
        self.steps = 0
        return self.cache

    @property
    def layer_parallel(self) -> bool:
        """Whether the program has a layer-parallel forward (an EasySpec draft)."""
        return hasattr(self.program, "forward_layer_parallel")

    def forward(self, ids_BS: torch.Tensor, step: Step, *, layer_parallel: bool = False) -> torch.Tensor:
        """The program's forward at an explicit Step; the cache's length is left as it was."""
        self.work["layer_parallel_forwards" if layer_parallel else "forwards"] += 1
        run = self.program.forward_layer_parallel if layer_parallel else self.program.forward
        step = Step(step.start, step.pos_BS.to(self.device), step.key_mask_BT.to(self.device))
        return run(self, ids_BS.to(self.device), step).cpu()

    def extend(self, ids_BS: torch.Tensor, real_BS: torch.Tensor | None = None, *,
               layer_parallel: bool = False, fuzzy: bool = False) -> torch.Tensor:
        """Run the next S tokens (real_BS: False for padding) and keep them in the cache; [B, S, V] logits.
        layer_parallel: through forward_layer_parallel; fuzzy: mark the slots it writes as fuzzy."""
        real_BS = torch.ones(ids_BS.shape, dtype=torch.bool) if real_BS is None else real_BS.cpu()
        status.current().at_step(self.name, self.steps, self.comm.current_phase)
        self.steps += 1
        start, S = self.cache.length, ids_BS.shape[1]
        if self._passes_long_context(real_BS):
            # transformers drops its cache here and reads the whole sequence again with the long
            # frequencies (Phi3ForCausalLM.prepare_inputs_for_generation): every layer's cached
            # keys and values change, not only the rotation of the keys
            ids = torch.cat([self.cache.ids_BT[:, :start], ids_BS.cpu()], dim=1)
            real = torch.cat([self.cache.key_mask_BT[:, :start].cpu(), real_BS], dim=1)
            self.cache.truncate(0)
            logits = self.forward(ids, self.cache.step(real), layer_parallel=layer_parallel)[:, start:]
            self.cache.advance(start + S)
        else:
            logits = self.forward(ids_BS, self.cache.step(real_BS), layer_parallel=layer_parallel)
            self.cache.advance(S)
        self.cache.ids_BT[:, start:start + S] = ids_BS.cpu()
        self.cache.fuzzy_T[start:start + S] = fuzzy
        return logits

    def _passes_long_context(self, real_BS: torch.Tensor) -> bool:
        """Whether this step writes the first position at or past a longrope model's original context."""
        if self.long_after is None or self.cache.length == 0:
            return False
        seen_B = self.cache.next_pos_B().cpu()  # real tokens cached per row: their positions are 0 .. seen - 1
        return int(seen_B.max()) - 1 < self.long_after <= int((seen_B + real_BS.sum(-1)).max()) - 1


def _check_kernels(kernels: str, device: torch.device) -> None:
    if kernels == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RunError("--kernels triton on CPU ranks (the gloo backend keeps every rank on the CPU) needs "
                       "TRITON_INTERPRET=1 in the environment before planc starts, or use --kernels torch")
    if kernels == "cpu" and device.type != "cpu":
        raise RunError(f"--kernels cpu runs on CPU ranks, and this rank runs on {device}; use --kernels triton "
                       "(or torch), or the gloo backend (mesh.backend: gloo) for CPU ranks")


def _check_runnable(artifact: ArtifactDir, comm: Comm) -> None:
    manifest = artifact.manifest
    if manifest.get("meta"):
        raise ArtifactError(f"{artifact.root}: compiled with --meta (no weights); recompile without --meta to run it")
    if comm.world_size != manifest["world_size"]:
        raise ArtifactError(f"{artifact.root}: compiled for {manifest['world_size']} devices (mesh.devices) but "
                            f"launched on {comm.world_size}; run with --nproc {manifest['world_size']}")
