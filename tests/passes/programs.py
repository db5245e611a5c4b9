"""Run a whole parallel graph's program on N thread ranks (planc.runtime.threads): the code codegen
emits, every rank's weights from partition, the runtime's generate loop; no artifact, no processes."""
from __future__ import annotations

import torch
import torch.fx as fx

from planc.codegen.emit_program import emit_program
from planc.ops import Ops
from planc.report.report import cache_specs
from planc.runtime.decode import Generation, generate
from planc.runtime.kv_cache import KvCache
from planc.runtime.threads import run_threads
from planc.weights import Weights


class ProgramRank:
    """What generate() needs of a planc.runtime.model.Model, for one rank of an in-memory program."""

    def __init__(self, namespace: dict, weights: dict, comm, caches: dict, dtype: torch.dtype):
        self.namespace, self.comm, self.ops = namespace, comm, Ops()
        self.weights = Weights(weights)
        self.cache = KvCache(caches, dtype)

    @property
    def kv(self) -> dict:
        return self.cache.layers

    def allocate(self, batch: int, capacity: int) -> KvCache:
        self.cache.allocate(batch, capacity)
        return self.cache

    def extend(self, ids_BS: torch.Tensor, real_BS: torch.Tensor | None = None) -> torch.Tensor:
        real_BS = torch.ones(ids_BS.shape, dtype=torch.bool) if real_BS is None else real_BS
        logits = self.namespace["forward"](self, ids_BS, self.cache.step(real_BS))
        self.cache.advance(ids_BS.shape[1])
        return logits


def program_namespace(graph: fx.Graph, world: int) -> dict:
    namespace: dict = {}
    exec(compile(emit_program(graph, model="test", world_size=world, plan_hash="test"), "<program>", "exec"), namespace)
    return namespace


def generate_on_threads(graph: fx.Graph, ranks: list[dict], prompts: list[list[int]], max_new_tokens: int,
                        dtype: torch.dtype = torch.float32, namespace: dict | None = None) -> list[Generation]:
    """Every rank's greedy generation (with each step's logits) of the program of `graph`."""
    namespace = namespace or program_namespace(graph, len(ranks))
    caches = cache_specs(graph)

    def rank_fn(comm) -> Generation:
        model = ProgramRank(namespace, ranks[comm.rank], comm, caches, dtype)
        return generate(model, prompts, max_new_tokens, keep_logits=True)

    return run_threads(rank_fn, len(ranks))
