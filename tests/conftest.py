"""Shared fixtures: plans written for a given world size, compiled artifacts cached per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import planc  # noqa: F401  (sets TRITON_INTERPRET before any kernel is decorated)

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "plans"


def plan_for(tmp: Path, name: str, devices: int, **changes) -> Path:
    """A copy of plans/NAME with mesh.devices (and top-level keys) replaced."""
    text = (PLANS / name).read_text()
    data = yaml.safe_load(text)
    path = tmp / f"{Path(name).stem}_{devices}.yaml"
    if data["mesh"]["devices"] == devices and not changes:
        path.write_text(text)  # as written, comments and all
        return path
    data["mesh"]["devices"] = devices
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """compiled(plan_name, devices, model=None) -> artifact path, compiled once per session."""
    from planc.driver import compile

    cache: dict = {}
    root = tmp_path_factory.mktemp("artifacts")

    def get(plan_name: str, devices: int, model: str | None = None) -> Path:
        key = (plan_name, devices, model)
        if key not in cache:
            plan = plan_for(root, plan_name, devices)
            out = root / f"{Path(plan_name).stem}_{devices}_{abs(hash(model)) % 10**6}"
            cache[key] = compile(model, plan, out).path
        return cache[key]

    return get
