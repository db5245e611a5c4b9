"""A rank's tensors by full FQN, with cached per-block views (`W.scope("model.layers.0.mlp")`)."""
from __future__ import annotations

from planc.lazy import lazy

torch = lazy("torch")


Tensors = dict[str, "torch.Tensor"]
# The model's rotary tensors -> the names a rope op reads them by. A long-context rope
# (planc.lift.recognize.long_rope) adds its short set, which wins over inv_freq (transformers
# overwrites inv_freq with the set of the last forward), its long set and the position from which
# the long set applies.
ROTARY_TENSORS = {"model.rotary_emb.inv_freq": "rotary.inv_freq", "model.rotary_emb.short_inv_freq": "rotary.inv_freq",
                  "model.rotary_emb.long_inv_freq": "rotary.long_inv_freq",
                  "model.rotary_emb.long_after": "rotary.long_after"}
SPLIT = "_planc_split_into"  # on a fused linear the lift split (planc.lift.fused): the names of its parts


def named_tensors(module: torch.nn.Module, prefix: str = "") -> Tensors:
    """Every parameter and buffer by FQN (under `prefix`, the module's own FQN); a tied weight
    (lm_head = embed_tokens) under each name."""
    return (dict(module.named_parameters(prefix, remove_duplicate=False))
            | dict(module.named_buffers(prefix, remove_duplicate=False)))


def unfused_tensors(module: torch.nn.Module, prefix: str = "") -> Tensors:
    """named_tensors without the weights of fused linears the lift split: their parts hold the same rows."""
    fused = {f"{fqn}.{name}" for fqn, m in module.named_modules(prefix=prefix) if getattr(m, SPLIT, None)
             for name, _ in m.named_parameters(recurse=False)}
    return {name: t for name, t in named_tensors(module, prefix).items() if name not in fused}


def scoped(tensors: Tensors, fqn: str) -> Tensors:
    """The tensors under `fqn.`, keyed by the rest of their name."""
    prefix = fqn + "."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


class Weights(dict):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__(tensors)
        self._scopes: dict[str, dict[str, torch.Tensor]] = {}

    def scope(self, fqn: str) -> dict[str, torch.Tensor]:
        """The tensors under `fqn.`, keyed by the rest of their name (built once, then reused)."""
        if fqn not in self._scopes:
            self._scopes[fqn] = scoped(self, fqn)
        return self._scopes[fqn]
