"""Calibration profiles: what passes learn from running the model on the calibration split.

A pass asks `ctx.profiles` for a profile; the first request runs the model over the corpus's
calibration windows with forward hooks that record it, later requests reuse it. Profiles:

    latents(fqns, tokens)         per MLA layer, the unit-RMS latent c/rms(c) of every token [N, C]
                                  (PCA transforms, slice scales)
    routing_counts(fqns, tokens)  per MoE layer, count[token id, expert] of the router's top-k
                                  choices, computed by planc's own router (expert placement)

On the meta device there is nothing to run: `available` is False and passes fall back (and say so).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from planc.ops import Ops
from planc.weights import named_tensors, scoped

Hook = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (module input, token ids) -> row values


class Profiles:
    def __init__(self, model: nn.Module | None, meta: bool = False):
        self.model = model
        self.available = model is not None and not meta
        self._cache: dict[tuple, torch.Tensor] = {}

    def latents(self, fqns: list[str], num_tokens: int) -> dict[str, torch.Tensor]:
        """c / rms(c) of each MLA layer's latent (kv_a_layernorm's input, unit weight), fp64 [N, C]."""
        def hook_for(fqn: str) -> tuple[str, Hook]:
            norm = self._module(f"{fqn}.kv_a_layernorm")
            eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))

            def record(c: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
                c = c.double().reshape(-1, c.shape[-1])
                return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
            return f"{fqn}.kv_a_layernorm", record

        return self._profile("latents", fqns, num_tokens, hook_for)

    def routing_counts(self, fqns: list[str], num_tokens: int, dims: dict) -> dict[str, torch.Tensor]:
        """count[token id, expert] per MoE layer: how often the router sends each token id to each expert."""
        vocab = self.model.get_input_embeddings().num_embeddings

        def hook_for(fqn: str) -> tuple[str, Hook]:
            gate = scoped(named_tensors(self._module(fqn)), "gate")
            router = dims[fqn]

            def record(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
                idx, _ = Ops().moe_route(x.reshape(-1, x.shape[-1]), gate, router)
                counts = torch.zeros(vocab, router.num_experts, dtype=torch.long)
                token = ids.reshape(-1, 1).expand_as(idx)
                return counts.index_put_((token.reshape(-1), idx.reshape(-1)), torch.ones(idx.numel(), dtype=torch.long),
                                         accumulate=True)[None]
            return fqn, record

        summed = self._profile("routing_counts", fqns, num_tokens, hook_for)
        return {f: c.sum(0) for f, c in summed.items()}

    # -- one forward over the calibration split, hooks recording what was asked -------------------

    def _module(self, fqn: str) -> nn.Module:
        if not hasattr(self, "_modules"):
            self._modules = dict(self.model.named_modules())
        return self._modules[fqn]

    def _profile(self, name: str, fqns: list[str], num_tokens: int, hook_for) -> dict[str, torch.Tensor]:
        if not self.available:
            raise RuntimeError(f"calibration profile {name!r} needs a model with weights (not meta)")
        missing = [f for f in fqns if (name, f, num_tokens) not in self._cache]
        if missing:
            self._run(name, missing, num_tokens, hook_for)
        return {f: self._cache[(name, f, num_tokens)] for f in fqns}

    def _run(self, name: str, fqns: list[str], num_tokens: int, hook_for) -> None:
        from planc.zoo.corpus import windows

        seq = min(256, num_tokens)
        ids = windows("calibration", max(1, num_tokens // seq), seq)
        seen: dict[str, list[torch.Tensor]] = {f: [] for f in fqns}
        hooks = []
        for fqn in fqns:
            module_fqn, record = hook_for(fqn)
            hooks.append(self._module(module_fqn).register_forward_hook(
                lambda _m, inputs, _out, f=fqn, rec=record: seen[f].append(rec(inputs[0], ids))))
        try:
            with torch.no_grad():
                self.model(ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        for fqn, parts in seen.items():
            self._cache[(name, fqn, num_tokens)] = torch.cat(parts)
