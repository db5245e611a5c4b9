"""Start N ranks through torch.distributed's elastic launcher (the machinery torchrun runs).

launch("pkg.module:function", args, nproc, timeout_s=...) starts nproc worker processes; each
initializes the default process group (gloo on CPU, NCCL on CUDA), imports `function` and calls
function(args). A worker may hand back one JSON value with write_result(obj); launch returns the
per-rank values (index = global rank) or None when no rank wrote one.

Failure: the first rank to raise ends the run (the agent kills ranks blocked in collectives) and
launch raises RunError with that rank's exception and traceback tail. timeout_s is a hard
wall-clock limit: every worker carries a SIGALRM deadline with the default action, which kills it
even inside a C++ collective that never returns to Python.

Workers start with "spawn" (a fresh interpreter, as torchrun does), so they see the caller's
current environment, sys.path and stdout; call launch under `if __name__ == "__main__":`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import signal
import socket
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure, record
from torch.distributed.elastic.rendezvous import RendezvousError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from planc.errors import RunError

RESULT_DIR_ENV = "PLANC_RESULT_DIR"
RDZV_KEYS = {"nnodes", "node_rank", "rdzv_endpoint", "rdzv_backend", "rdzv_id", "rdzv_conf"}
TRACEBACK_TAIL_LINES = 8


@dataclass(frozen=True)
class _Job:
    """What every worker needs; pickled into the spawned processes."""

    entry: str
    args: Any
    backend: str
    result_dir: str
    failure_dir: str
    deadline: float | None  # time.time() at which every worker is killed
    loopback: bool


def launch(
    entry: str,
    args: list[str] | dict[str, Any],
    nproc: int,
    *,
    timeout_s: float | None,
    rdzv: dict[str, Any] | None = None,
    backend: str = "auto",
    result_dir: str | os.PathLike[str] | None = None,
) -> list[Any] | None:
    """Run entry(args) on nproc local ranks (x rdzv["nnodes"] machines); see the module docstring."""
    _check_entry(entry)
    rdzv = _check_rdzv(rdzv)
    deadline = time.time() + timeout_s if timeout_s is not None else None
    with tempfile.TemporaryDirectory(prefix="planc-run-") as run_dir:
        results = Path(result_dir) if result_dir is not None else Path(run_dir, "results")
        job = _Job(
            entry=entry,
            args=args,
            backend=_resolve_backend(backend),
            result_dir=str(results),
            failure_dir=str(Path(run_dir, "failures")),
            deadline=deadline,
            loopback="rdzv_endpoint" not in rdzv,
        )
        world_size = nproc * rdzv.get("nnodes", 1)
        _prepare_dirs(job, world_size)
        config = _launch_config(nproc, rdzv, Path(run_dir, "logs"), timeout_s)
        try:
            with _kept_signal_handlers():
                elastic_launch(config, _worker)(job)
        except ChildFailedError as e:
            raise _run_error(e, job, world_size, timeout_s) from None
        except RendezvousError as e:
            raise RunError(f"rendezvous at {config.rdzv_endpoint} ({config.rdzv_backend}) failed: {e}") from e
        return _read_results(results, world_size)


def write_result(obj: Any) -> None:
    """Inside a worker: hand `obj` (JSON-serializable) back to the caller of launch()."""
    result_dir = os.environ.get(RESULT_DIR_ENV)
    if result_dir is None:
        raise RuntimeError("write_result() works only inside a worker started by planc.runtime.launch")
    path = Path(result_dir, f"rank{os.environ['RANK']}.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)  # atomic: the caller never reads half a file


# -- caller side ------------------------------------------------------------------------------


def _check_entry(entry: str) -> None:
    module, _, function = entry.partition(":")
    if not module or not function.isidentifier():
        raise RunError(f"entry {entry!r} must be 'package.module:function', e.g. 'planc.runtime.worker:main'")
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package raises instead of returning None
        found = False
    if not found:
        raise RunError(f"entry {entry!r}: module {module!r} is not importable from sys.path")


def _check_rdzv(rdzv: dict[str, Any] | None) -> dict[str, Any]:
    rdzv = dict(rdzv or {})
    unknown = set(rdzv) - RDZV_KEYS
    if unknown:
        raise RunError(f"rdzv has unknown keys {sorted(unknown)}; valid keys are {sorted(RDZV_KEYS)}")
    if rdzv.get("nnodes", 1) > 1 and "rdzv_endpoint" not in rdzv:
        raise RunError(f"rdzv: nnodes={rdzv['nnodes']} needs rdzv_endpoint='host:port' of node 0")
    return rdzv


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise RunError(f"backend={backend!r}: use 'auto', 'gloo' or 'nccl'")
    return backend


def _prepare_dirs(job: _Job, world_size: int) -> None:
    Path(job.failure_dir).mkdir(parents=True)
    Path(job.result_dir).mkdir(parents=True, exist_ok=True)
    for rank in range(world_size):  # a reused result_dir must not hand back an older run's values
        Path(job.result_dir, f"rank{rank}.json").unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_config(nproc: int, rdzv: dict[str, Any], log_dir: Path, timeout_s: float | None) -> LaunchConfig:
    nnodes = rdzv.get("nnodes", 1)
    backend = rdzv.get("rdzv_backend", "static")
    conf = dict(rdzv.get("rdzv_conf", {}))
    if backend == "static":
        conf["rank"] = rdzv.get("node_rank", 0)  # as torchrun does for --node-rank
    if timeout_s is not None:  # waiting for other machines counts against the same wall clock
        conf.setdefault("timeout" if backend == "static" else "join_timeout", max(1, int(timeout_s)))
    return LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc,
        run_id=rdzv.get("rdzv_id", uuid.uuid4().hex),
        rdzv_endpoint=rdzv.get("rdzv_endpoint", f"127.0.0.1:{_free_port()}"),
        rdzv_backend=backend,
        rdzv_configs=conf,
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
        # Local rank 0's stdout reaches the user untouched; the others' goes to run-dir logs.
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir), redirects={r: Std.OUT for r in range(1, nproc)}),
    )


@contextlib.contextmanager
def _kept_signal_handlers() -> Iterator[None]:
    """The elastic agent installs SIGTERM/SIGINT/... handlers and never restores them."""
    if threading.current_thread() is not threading.main_thread():
        yield  # the agent installs handlers only from the main thread
        return
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
    saved = {s: signal.getsignal(s) for s in signals}
    try:
        yield
    finally:
        for s, handler in saved.items():
            if handler is not None:
                signal.signal(s, handler)


def _run_error(e: ChildFailedError, job: _Job, world_size: int, timeout_s: float | None) -> RunError:
    notes = _failure_notes(job.failure_dir)
    # The agent reports the ranks it saw exit with an error; the rank that raised may still have
    # been shutting down (and been killed) when a peer's broken collective aborted first. The
    # workers' own sub-second notes decide which rank failed first.
    if notes:
        rank = min(notes, key=lambda r: notes[r]["time"])
        failed_at: float | None = notes[rank]["time"]
        description = f"{notes[rank]['error']}\ntraceback (last lines):\n{notes[rank]['traceback']}"
    else:  # no rank raised in Python: killed by a signal, os._exit, or the deadline
        rank = min(e.failures, key=lambda r: e.failures[r].timestamp)
        failed_at = None
        description = _describe(e.failures[rank])
    if job.deadline is not None and time.time() >= job.deadline and (failed_at is None or failed_at >= job.deadline):
        return RunError(
            f"{job.entry} on {world_size} ranks exceeded timeout_s={timeout_s} s; all workers were stopped"
        )
    return RunError(f"rank {rank} failed first ({job.entry} on {world_size} ranks): {description}")


def _failure_notes(failure_dir: str) -> dict[int, dict[str, Any]]:
    notes = {}
    for path in Path(failure_dir).glob("rank*.json"):
        notes[int(path.stem.removeprefix("rank"))] = json.loads(path.read_text())
    return notes


def _describe(failure: ProcessFailure) -> str:
    if not isinstance(failure.message, dict):  # no error file: killed by a signal or os._exit
        return f"exit code {failure.exitcode}: {failure.message}"
    stack = failure.message.get("extraInfo", {}).get("py_callstack", "")
    tail = "\n".join(stack.rstrip().splitlines()[-TRACEBACK_TAIL_LINES:])
    return f"{failure.message.get('message', '')}\ntraceback (last lines):\n{tail}"


def _read_results(result_dir: Path, world_size: int) -> list[Any] | None:
    paths = [result_dir / f"rank{r}.json" for r in range(world_size)]
    if not any(p.exists() for p in paths):
        return None
    return [json.loads(p.read_text()) if p.exists() else None for p in paths]


# -- worker side ------------------------------------------------------------------------------


@record
def _worker(job: _Job) -> None:
    """Entry of every spawned rank; @record writes the exception for the agent to report."""
    _arm_deadline(job.deadline)
    os.environ[RESULT_DIR_ENV] = job.result_dir
    if job.loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun's default: one intra-op thread per rank. Ranks sharing cores with torch's
        # default (a thread per core each) spin against each other and decode 10-50x slower.
        torch.set_num_threads(1)
    try:
        function = _import_entry(job.entry)
        _init_process_group(job.backend)
        function(job.args)
    except BaseException as error:
        _note_failure(job.failure_dir, error)
        raise
    # Only after success: tearing down a group whose peers died can block (NCCL).
    dist.destroy_process_group()


def _note_failure(failure_dir: str, error: BaseException) -> None:
    """Write when and how this rank failed, before its exit can break a peer's collective."""
    at = time.time()
    frames = traceback.format_exception(error)
    note = {
        "time": at,
        "error": f"{type(error).__name__}: {error}",
        "traceback": "\n".join("".join(frames).rstrip().splitlines()[-TRACEBACK_TAIL_LINES:]),
    }
    path = Path(failure_dir, f"rank{os.environ['RANK']}.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(note))
    os.replace(tmp, path)


def _arm_deadline(deadline: float | None) -> None:
    if deadline is None:
        return
    # SIG_DFL for SIGALRM terminates the process from the kernel, GIL or not.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, max(deadline - time.time(), 1e-3))


def _import_entry(entry: str) -> Callable[[Any], Any]:
    module, _, function = entry.partition(":")
    return getattr(importlib.import_module(module), function)


def _init_process_group(backend: str) -> None:
    if backend == "nccl":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group(backend)
