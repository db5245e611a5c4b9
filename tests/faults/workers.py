"""Rank entries for the fault tests: planc's own rank entry with one injected fault."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from planc.runtime import worker
from planc.runtime.model import Model

FAULT_ENV = "PLANC_TEST_FAULT"  # "RANK:PATH": that rank raises in the first step that starts once PATH exists


def raise_in_decode(args: dict[str, Any]) -> None:
    rank, trigger = os.environ[FAULT_ENV].split(":", 1)
    if int(os.environ["RANK"]) == int(rank):
        forward = Model.forward

        def faulty(self: Model, ids_BS, step_at, **kwargs):
            if Path(trigger).exists():  # extend() has already recorded this step
                raise ValueError(f"injected fault in step {self.steps - 1}")
            return forward(self, ids_BS, step_at, **kwargs)

        Model.forward = faulty
    worker.main(args)
