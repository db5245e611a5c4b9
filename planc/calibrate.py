"""Calibration profiles: what passes learn from running the model on the calibration split.

A pass asks `ctx.profiles` for a profile; the first request runs the model over the corpus's
calibration windows with forward hooks that record it, later requests reuse it. Profiles:

    latents(fqns, tokens)         per MLA layer, the unit-RMS latent c/rms(c) of every token [N, C]
                                  (PCA transforms, slice scales)
    routing(fqns, tokens)         per MoE layer, the router's top-k experts of every calibration
                                  token [T, K], with the token ids [T], computed by planc's own router;
                                  counts[token id, expert], co-activation and token frequencies
                                  follow from it (planc.placement)
    routing_counts(fqns, tokens)  count[token id, expert] of the same choices

`stored()` is every routing profile recorded, as JSON-able data: the compile keeps it in
report.json ("profiles"), and a later compile reads it back (`routing(..., artifact=DIR)`) instead
of running the model, which works on the meta device too. Otherwise, on the meta device there is
nothing to run: `available` is False and passes fall back (and say so).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from planc import progress
from planc.errors import PlanError
from planc.ops import Ops
from planc.placement import counts
from planc.weights import named_tensors, scoped

Hook = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (module input, token ids) -> row values
WINDOW = 256  # calibration tokens come in windows of this many (a profile: whole windows, in order)


def windows_of(num_tokens: int) -> tuple[int, int]:
    """(windows, tokens per window) of a profile of `num_tokens`: whole windows of WINDOW tokens, or
    one of them all when they are fewer."""
    seq = min(WINDOW, num_tokens)
    return max(1, num_tokens // seq), seq


class Profiles:
    def __init__(self, model: nn.Module | None, meta: bool = False):
        self.model = model
        self.available = model is not None and not meta
        self._cache: dict[tuple, torch.Tensor] = {}
        self._ids: dict[int, torch.Tensor] = {}  # calibration windows by profile size
        self._routing: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

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

    def routing(self, fqns: list[str], num_tokens: int, dims: dict, artifact: str | None = None
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(ids [T], experts [T, K]) per MoE layer: the router's choices for every calibration token;
        read from `artifact`'s report.json when given."""
        if artifact is not None:
            return self._stored_routing(Path(artifact), fqns, num_tokens, dims)

        def hook_for(fqn: str) -> tuple[str, Hook]:
            gate = scoped(named_tensors(self._module(fqn)), dims[fqn].module)

            def record(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
                return Ops().moe_route(x.reshape(-1, x.shape[-1]), gate, dims[fqn])[0]
            return fqn, record

        choices = self._profile("routing", fqns, num_tokens, hook_for)
        ids = self._ids[num_tokens].reshape(-1)
        self._routing.update({(f, num_tokens): (ids, choices[f]) for f in fqns})
        return {f: (ids, choices[f]) for f in fqns}

    def routing_counts(self, fqns: list[str], num_tokens: int, dims: dict) -> dict[str, torch.Tensor]:
        """count[token id, expert] per MoE layer: how often the router sends each token id to each expert."""
        vocab = self.model.get_input_embeddings().num_embeddings
        return {f: counts(ids, experts, vocab, dims[f].num_experts)
                for f, (ids, experts) in self.routing(fqns, num_tokens, dims).items()}

    def stored(self) -> dict:
        """Every routing profile recorded by this compile, as report.json keeps it."""
        return {"routing": {fqn: {"tokens": tokens, "ids": ids.tolist(), "experts": experts.tolist()}
                            for (fqn, tokens), (ids, experts) in self._routing.items()}}

    def _stored_routing(self, artifact: Path, fqns: list[str], num_tokens: int, dims: dict
                        ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        from planc.runtime.artifact import ArtifactDir

        report = json.loads(ArtifactDir(artifact).path("report.json").read_text())
        stored = report.get("profiles", {}).get("routing", {})
        out = {}
        for fqn in fqns:
            entry = stored.get(fqn)
            if entry is None or entry["tokens"] < num_tokens:
                have = f"{entry['tokens']} tokens" if entry else "none"
                raise PlanError(f"{artifact}/report.json holds no routing profile of {num_tokens} tokens for {fqn} "
                                f"({have}); compile that artifact with profile.tokens >= {num_tokens}, or leave out "
                                f"profile.artifact to profile now")
            count, seq = windows_of(num_tokens)  # whole windows, as a profile run now would read them
            kept = count * seq
            ids = torch.tensor(entry["ids"][:kept])
            experts = torch.tensor(entry["experts"][:kept]).reshape(len(ids), -1)
            if experts.shape[1] != dims[fqn].top_k or int(experts.max()) >= dims[fqn].num_experts:
                raise PlanError(f"{artifact}/report.json: the routing profile of {fqn} has top-{experts.shape[1]} "
                                f"choices among {int(experts.max()) + 1}+ experts; this model routes top-"
                                f"{dims[fqn].top_k} of {dims[fqn].num_experts}: profile this model instead")
            out[fqn] = (ids, experts)
        self._routing.update({(f, num_tokens): v for f, v in out.items()})
        return out

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

        ids = self._ids.setdefault(num_tokens, windows("calibration", *windows_of(num_tokens)))
        seen: dict[str, list[torch.Tensor]] = {f: [] for f in fqns}
        hooks = []
        for fqn in fqns:
            module_fqn, record = hook_for(fqn)
            hooks.append(self._module(module_fqn).register_forward_hook(
                lambda _m, inputs, _out, f=fqn, rec=record: seen[f].append(rec(inputs[0], ids))))
        try:
            with torch.no_grad(), progress.calls(self.model.model.layers, f"calibrate {name}"):
                self.model(ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        for fqn, parts in seen.items():
            self._cache[(name, fqn, num_tokens)] = torch.cat(parts)
