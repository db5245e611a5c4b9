"""A model the caller passed comes back from a compile as it came.

The lift attaches what it reads to the model itself (planc.lift.fused's split parts and renamed
projections, longrope's second frequencies, one rope per layer, a router's correction bias on its
gate), and the compile reads them until the weights are partitioned. Afterwards the caller's
model would hold them still: extra state_dict keys (a fused projection's parts, copies of its
rows), children its own code never made. Every function that changes a module calls
`touch(module)` first; inside `restored(model)` that notes the module's own state (its children,
parameters, buffers and attributes) once, and on exit, whatever the compile did or raised, each
noted module gets it back. Tensors are not copied, only the tables that hold them; a module
nothing touched costs nothing, so restoring does not grow with the model's depth.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from torch import nn

TABLES = ("_modules", "_parameters", "_buffers")
_NOTED: ContextVar[dict[int, tuple] | None] = ContextVar("planc_restore_noted", default=None)


def touch(module: nn.Module) -> nn.Module:
    """Note `module`'s own state before it is changed, where a compile is to restore the model."""
    noted = _NOTED.get()
    if noted is not None and id(module) not in noted:
        noted[id(module)] = (module, {t: dict(getattr(module, t)) for t in TABLES},
                             set(module._non_persistent_buffers_set), dict(vars(module)))
    return module


@contextmanager
def restored(model: nn.Module) -> Iterator[nn.Module]:
    noted: dict[int, tuple] = {}
    token = _NOTED.set(noted)
    try:
        yield model
    finally:
        _NOTED.reset(token)
        for m, tables, non_persistent, attributes in noted.values():
            for name, table in tables.items():
                now = getattr(m, name)
                now.clear()
                now.update(table)
            m._non_persistent_buffers_set.clear()
            m._non_persistent_buffers_set.update(non_persistent)
            own = vars(m)
            for key in [k for k in own if k not in attributes]:
                del own[key]
            own.update(attributes)
