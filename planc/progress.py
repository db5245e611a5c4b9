"""Progress of the compiler's long steps, drawn on a terminal and nowhere else.

    for block in progress.track(blocks, "lift checks", "blocks"):   # a loop planc runs
    with progress.calls(model.model.layers, "calibrate"):           # a forward planc only watches
        model(ids)                                                  # (each layer's return advances it)
    with progress.bar("model deepseek-v3"):                         # one opaque call: spinner, time
        load_model(...)

A bar is drawn (by rich, on stderr) only while stderr is a terminal, only once its step has run
DELAY_S, and it is cleared when the step ends: pipes, tests, redirected logs and JSON output never
see one, and a short step never flashes. Off a terminal a step costs one isatty() call and
nothing is hooked. One bar at a time: a step inside another's bar adds none of its own.
"""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

DELAY_S = 0.5  # a step shorter than this shows nothing
T = TypeVar("T")

_drawing = threading.local()  # .active: a bar of this thread is open


def on_terminal() -> bool:
    """Whether bars are drawn: stderr (looked up now, a test may replace it) is a terminal that
    can redraw a line, and this process is not one of a torchrun job's other ranks (which share
    rank 0's terminal)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return (bool(isatty and isatty()) and os.environ.get("TERM") not in ("dumb", "unknown")
            and os.environ.get("RANK", "0") == "0")


def _ignore(n: int = 1) -> None:
    pass


@contextmanager
def bar(what: str, total: int | None = None, unit: str = "") -> Iterator[Callable[[int], None]]:
    """A step of `total` units of `unit` (None: of unknown length, a spinner and the elapsed time);
    yields advance(n=1)."""
    if getattr(_drawing, "active", False) or not on_terminal():
        yield _ignore
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    counted = () if total is None else (BarColumn(), MofNCompleteColumn(), TextColumn(unit))
    shown = Progress(SpinnerColumn(), TextColumn("{task.description}"), *counted, TimeElapsedColumn(),
                     console=Console(file=sys.stderr), transient=True)
    task = shown.add_task(what, total=total)
    start = threading.Timer(DELAY_S, shown.start)
    start.daemon = True
    _drawing.active = True
    start.start()
    try:
        yield lambda n=1: shown.advance(task, n)
    finally:
        start.cancel()
        start.join()
        shown.stop()
        _drawing.active = False


def track(items: Iterable[T], what: str, unit: str = "", total: int | None = None) -> Iterator[T]:
    """`items`, one unit of a bar each (total: len(items) unless given)."""
    with bar(what, len(items) if total is None else total, unit) as advance:
        for item in items:
            yield item
            advance(1)


@contextmanager
def calls(modules: Sequence[Any], what: str, unit: str = "layers") -> Iterator[None]:
    """A bar advanced each time one of `modules` (torch modules) returns from a forward; the
    forward hooks that advance it exist only while a bar can be drawn."""
    with bar(what, len(modules), unit) as advance:
        if advance is _ignore:
            yield
            return
        hooks = [m.register_forward_hook(lambda *_: advance(1)) for m in modules]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
