"""A model the caller passed comes back from a compile as it came.

The lift attaches what it reads to the model itself (planc.lift.fused's split parts and renamed
projections, longrope's second frequencies, one rope per layer, a router's correction bias on its
gate), and the compile reads them until the weights are partitioned. Afterwards the caller's
model would hold them still: extra state_dict keys (a fused projection's parts, copies of its
rows), children its own code never made. `restored(model)` notes every module's own state on
entry (its children, parameters, buffers and attributes) and puts it back on exit, whatever the
compile did or raised; tensors are not copied, only the tables that hold them.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

TABLES = ("_modules", "_parameters", "_buffers")


@contextmanager
def restored(model: nn.Module) -> Iterator[nn.Module]:
    noted = [(m, {t: dict(getattr(m, t)) for t in TABLES}, set(m._non_persistent_buffers_set), dict(vars(m)))
             for m in model.modules()]
    try:
        yield model
    finally:
        for m, tables, non_persistent, attributes in noted:
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
