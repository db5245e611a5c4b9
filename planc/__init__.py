"""planc: a declarative parallel-plan compiler for LLM inference."""
from __future__ import annotations

import os

# The Triton interpreter must be chosen before any kernel is decorated; without CUDA it is the
# only way Triton kernels run, so planc picks it unless the user already decided.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass

__version__ = "0.1.0"

__all__ = ["Artifact", "compile", "load_plan"]


def __getattr__(name: str):
    # Lazy: `import planc` stays cheap (kernels and the CLI import it first).
    if name in ("compile", "Artifact"):
        from planc import driver

        return getattr(driver, name)
    if name == "load_plan":
        from planc.plan import load_plan

        return load_plan
    raise AttributeError(f"module 'planc' has no attribute {name!r}")
