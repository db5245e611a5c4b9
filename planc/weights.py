"""A rank's tensors by full FQN, with cached per-block views (`W.scope("model.layers.0.mlp")`)."""
from __future__ import annotations

from planc.lazy import lazy

torch = lazy("torch")


Tensors = dict[str, "torch.Tensor"]


def named_tensors(module: torch.nn.Module) -> Tensors:
    """Every parameter and buffer by FQN; a tied weight (lm_head = embed_tokens) under each name."""
    return dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))


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
