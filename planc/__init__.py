"""planc: a declarative parallel-plan compiler for LLM inference."""
from __future__ import annotations

import importlib.abc
import os
import sys

__version__ = "0.1.0"

__all__ = ["Artifact", "backend", "compile", "load_plan"]


class _TritonMode(importlib.abc.MetaPathFinder):
    """Chooses the Triton interpreter the moment `triton` is first imported, before any kernel can
    be decorated: without CUDA it is the only way Triton kernels run. Asking torch whether CUDA is
    there costs a second, so `import planc` (and so the CLI's help and usage errors) defers it."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "triton":
            _choose_triton_mode()
        return None  # the ordinary finders import triton


def _choose_triton_mode() -> None:
    while any(isinstance(f, _TritonMode) for f in sys.meta_path):
        sys.meta_path.remove(next(f for f in sys.meta_path if isinstance(f, _TritonMode)))
    if "TRITON_INTERPRET" in os.environ:  # the user already decided
        return
    import torch  # does not import triton

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


if "triton" in sys.modules:
    _choose_triton_mode()
elif "TRITON_INTERPRET" not in os.environ:
    sys.meta_path.insert(0, _TritonMode())


def __getattr__(name: str):
    # Lazy: `import planc` imports neither torch nor triton (the CLI answers --help at once).
    if name in ("compile", "Artifact"):
        from planc import driver

        return getattr(driver, name)
    if name == "load_plan":
        from planc.plan import load_plan

        return load_plan
    if name == "backend":
        from planc.torch_compile import backend

        return backend
    raise AttributeError(f"module 'planc' has no attribute {name!r}")
