"""`planc bench`: side-by-side measurements. Each case is a module here with `run() -> dict` and
`table(result) -> str`; with --json each case prints one JSON object on its own line."""
from __future__ import annotations

import importlib
import json

CASES = {"compile": "planc.bench.compile", "decode": "planc.bench.decode", "zoo": "planc.bench.zoo",
         "tpla": "planc.bench.tpla", "t3": "planc.bench.t3", "soak": "planc.bench.soak",
         "moe": "planc.bench.moe", "easyspec": "planc.bench.easyspec",
         "kernels": "planc.bench.kernels"}


def run_cases(names: list[str], *, as_json: bool, list_only: bool) -> int:
    if list_only or not names:
        print("cases: " + ", ".join(CASES))
        return 0
    unknown = [n for n in names if n not in CASES]
    if unknown:
        from planc.errors import PlancError

        raise PlancError(f"unknown bench case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    for name in names:
        case = importlib.import_module(CASES[name])
        result = case.run()
        print(json.dumps(result) if as_json else case.table(result))
    return 0
