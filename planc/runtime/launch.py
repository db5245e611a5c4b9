"""Start N ranks through torch.distributed's elastic launcher (the machinery torchrun runs).

launch("pkg.module:function", args, nproc, timeout_s=...) starts nproc worker processes; each
initializes the default process group (gloo on CPU, NCCL on CUDA), imports `function` and calls
function(args). A worker may hand back one JSON value with write_result(obj); launch returns the
per-rank values (index = global rank) or None when no rank wrote one.

Faults end the run, and RunError names the rank at fault and its step and collective (each rank
records where it is, planc.runtime.status; planc.runtime.faults explains): a rank that raises or
dies ends it within about a second (the watchdog SIGKILLs the other ranks GRACE_S after the first
failure); a rank that stalls (stopped, stuck in a loop) ends it after collective_timeout_s, when its
peers' collectives time out (the process group's timeout; every rank also meets its peers in a
last barrier, so a rank that stalls after its last collective is caught too). The bound from the
fault to launch() returning is collective_timeout_s + about 2 s for a stall, about 2 s otherwise.
timeout_s is a hard wall-clock limit on the whole run: every worker carries a SIGALRM deadline
with the default action, which kills it even inside a C++ collective that never returns to Python.
Workers ignore SIGINT (a terminal's Ctrl-C reaches every process of its group: the launcher alone
decides) and die with the launcher (PR_SET_PDEATHSIG), so no rank outlives it.

Workers start with "spawn" (a fresh interpreter, as torchrun does), so they see the caller's
current environment, sys.path and stdout; call launch under `if __name__ == "__main__":`.

Inside a job that torchrun (or any elastic agent) launched, launch starts nothing: the process is
already one rank of the job (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE in its environment), so
it runs entry(args) as that rank and every rank returns every rank's values. The job's size is
torchrun's; rendezvous options are refused there (torchrun already made the rendezvous).
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import importlib
import importlib.util
import json
import logging
import os
import signal
import socket
import sys
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

from planc.codegen.replace import replace_file
from planc.errors import RunError
from planc.runtime import status
from planc.runtime.faults import Exit, Watchdog, explain, read_notes, read_statuses, short_error

RESULT_DIR_ENV = "PLANC_RESULT_DIR"
RDZV_KEYS = {"nnodes", "node_rank", "rdzv_endpoint", "rdzv_backend", "rdzv_id", "rdzv_conf"}
COLLECTIVE_TIMEOUT_S = 30.0  # a collective waiting this long for a peer gives up: the peer stalled
SHUTDOWN_S = 2  # the agent's SIGTERM-to-SIGKILL grace when it stops ranks
PORT_ATTEMPTS = 3  # fresh rendezvous ports tried when a probed free port was taken before the agent bound it
FRAMES = 3  # innermost frames of a raising rank's traceback in the message
AGENT_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing")


@dataclass(frozen=True)
class _Job:
    """What every worker needs; pickled into the spawned processes."""

    entry: str
    args: Any
    backend: str
    result_dir: str
    failure_dir: str
    status_dir: str
    deadline: float | None  # time.time() at which every worker is killed
    collective_timeout_s: float
    loopback: bool
    parent_pid: int


def launch(
    entry: str,
    args: list[str] | dict[str, Any],
    nproc: int,
    *,
    timeout_s: float | None,
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
    rdzv: dict[str, Any] | None = None,
    backend: str = "auto",
    result_dir: str | os.PathLike[str] | None = None,
) -> list[Any] | None:
    """Run entry(args) on nproc local ranks (x rdzv["nnodes"] machines); see the module docstring."""
    check_limits(nproc, timeout_s, collective_timeout_s)
    _check_entry(entry)
    rdzv = _check_rdzv(rdzv)
    if in_launched_job():
        return _run_as_rank(entry, args, nproc * rdzv.get("nnodes", 1), rdzv, backend, timeout_s, collective_timeout_s)
    _check_gpus(resolve_backend(backend), nproc)
    deadline = time.time() + timeout_s if timeout_s is not None else None
    with tempfile.TemporaryDirectory(prefix="planc-run-") as run_dir:
        results = Path(result_dir) if result_dir is not None else Path(run_dir, "results")
        job = _Job(
            entry=entry,
            args=args,
            backend=resolve_backend(backend),
            result_dir=str(results),
            failure_dir=str(Path(run_dir, "failures")),
            status_dir=str(Path(run_dir, "status")),
            deadline=deadline,
            collective_timeout_s=collective_timeout_s,
            loopback="rdzv_endpoint" not in rdzv,
            parent_pid=os.getpid(),
        )
        world_size = nproc * rdzv.get("nnodes", 1)
        _prepare_dirs(job, world_size)
        watchdog = Watchdog(Path(job.status_dir), Path(job.failure_dir))
        try:
            with _kept_signal_handlers(), _quiet_agent(), watchdog:
                _run_agent(job, nproc, rdzv, Path(run_dir, "logs"), timeout_s)
        except ChildFailedError as e:
            raise _run_error(e, job, world_size, timeout_s, watchdog) from None
        return _read_results(results, world_size)


def write_result(obj: Any) -> None:
    """Inside a worker: hand `obj` (JSON-serializable) back to the caller of launch()."""
    result_dir = os.environ.get(RESULT_DIR_ENV)
    if result_dir is None:
        raise RuntimeError("write_result() works only inside a worker started by planc.runtime.launch")
    replace_file(Path(result_dir, f"rank{os.environ['RANK']}.json"), json.dumps(obj))  # never read half-written


# -- caller side ------------------------------------------------------------------------------


JOB_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")  # what torchrun gives each rank


def in_launched_job() -> bool:
    """Whether this process is one rank of a job an elastic agent (torchrun) started, rather than
    a launcher of its own (planc's own workers carry RESULT_DIR_ENV and never launch)."""
    return all(k in os.environ for k in JOB_ENV) and RESULT_DIR_ENV not in os.environ


def _run_as_rank(entry: str, args: Any, world_size: int, rdzv: dict[str, Any], backend: str,
                 timeout_s: float | None, collective_timeout_s: float) -> list[Any] | None:
    """launch() inside torchrun's job: entry(args) on this rank; every rank's value, gathered."""
    rank, job_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rdzv:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(rdzv))
        raise RunError(f"already rank {rank} of a launched job of {job_size} (torchrun): its rendezvous is made, so "
                       f"{flags} cannot apply; pass them to torchrun instead")
    if world_size != job_size:
        raise RunError(f"rank {rank} of a launched job of {job_size} ranks (torchrun), but {world_size} ranks are "
                       f"needed; start torchrun with --nproc-per-node x --nnodes = {world_size}")
    owned = not dist.is_initialized()
    if owned:
        _init_process_group(resolve_backend(backend), collective_timeout_s)
    _arm_deadline(time.time() + timeout_s if timeout_s is not None else None)
    try:
        with tempfile.TemporaryDirectory(prefix="planc-rank-") as result_dir:
            os.environ[RESULT_DIR_ENV] = result_dir
            try:
                _import_entry(entry)(args)
            finally:
                del os.environ[RESULT_DIR_ENV]
            mine = Path(result_dir, f"rank{rank}.json")
            value = json.loads(mine.read_text()) if mine.exists() else None
        values: list[Any] = [None] * job_size
        dist.all_gather_object(values, value)
        if owned:  # every rank is past its last collective: close the group before the interpreter exits,
            dist.destroy_process_group()  # or gloo's threads may abort the process as it tears down
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return values if any(v is not None for v in values) else None


def check_limits(nproc: int, timeout_s: float | None, collective_timeout_s: float) -> None:
    """launch()'s own checks of its numbers, for callers that do slow work before launching."""
    if not isinstance(nproc, int) or nproc < 1:
        raise RunError(f"nproc={nproc!r}: the number of ranks per machine must be a whole number >= 1")
    if timeout_s is not None and not timeout_s > 0:
        raise RunError(f"timeout_s={timeout_s!r}: the run's wall-clock limit must be > 0 seconds (or None)")
    if not collective_timeout_s > 0:
        raise RunError(f"collective_timeout_s={collective_timeout_s!r}: must be > 0 seconds")


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


def resolve_backend(backend: str) -> str:
    """A plan's mesh.backend as the ranks will use it: auto is NCCL where CUDA is, gloo elsewhere."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise RunError(f"backend={backend!r}: use 'auto', 'gloo' or 'nccl'")
    return backend


def _check_gpus(backend: str, nproc: int) -> None:
    """Under NCCL each local rank takes GPU LOCAL_RANK; fewer GPUs than ranks is refused here, before
    any rank starts, rather than as a CUDA error from one of them."""
    if backend != "nccl":
        return
    found = torch.cuda.device_count()
    if found < nproc:
        raise RunError(f"{nproc} ranks on this machine under NCCL need {nproc} GPUs, one each, and {found} "
                       f"{'is' if found == 1 else 'are'} visible; run fewer ranks per machine (--nproc with --nnodes "
                       f"machines), or on CPU ranks: recompile with mesh.backend: gloo")


def _prepare_dirs(job: _Job, world_size: int) -> None:
    Path(job.failure_dir).mkdir(parents=True)
    Path(job.status_dir).mkdir(parents=True)
    Path(job.result_dir).mkdir(parents=True, exist_ok=True)
    for rank in range(world_size):  # a reused result_dir must not hand back an older run's values
        Path(job.result_dir, f"rank{rank}.json").unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_agent(job: _Job, nproc: int, rdzv: dict[str, Any], log_dir: Path, timeout_s: float | None) -> None:
    """elastic_launch, on a fresh probed port again when another process took the probed one first."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        config = _launch_config(nproc, rdzv, log_dir, timeout_s)
        try:
            elastic_launch(config, _rank_main)(job)
            return
        except RendezvousError as e:
            raise RunError(f"rendezvous at {config.rdzv_endpoint} ({config.rdzv_backend}) failed: {e}") from None
        except dist.DistNetworkError as e:
            in_use = "EADDRINUSE" in str(e)
            if in_use and "rdzv_endpoint" not in rdzv and attempt < PORT_ATTEMPTS:
                continue
            raise RunError(_network_error(config.rdzv_endpoint, in_use, "rdzv_endpoint" in rdzv, str(e))) from None


def _network_error(endpoint: str, in_use: bool, chosen: bool, error: str) -> str:
    if in_use and chosen:
        return (f"rendezvous endpoint {endpoint} is in use by another process (EADDRINUSE); pass a free port "
                f"with --rdzv-endpoint HOST:PORT, or leave it out on one machine and planc picks one")
    if in_use:
        return f"no free rendezvous port on 127.0.0.1 after {PORT_ATTEMPTS} tries (EADDRINUSE each time)"
    return f"rendezvous at {endpoint} failed: {error.splitlines()[0]}"


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
        # Every machine must name the same run: a random id per launcher would keep them apart forever.
        run_id=rdzv.get("rdzv_id", "planc" if nnodes > 1 else uuid.uuid4().hex),
        rdzv_endpoint=rdzv.get("rdzv_endpoint", f"127.0.0.1:{_free_port()}"),
        rdzv_backend=backend,
        rdzv_configs=conf,
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
        shutdown_timeout=SHUTDOWN_S,
        # SIGINT and SIGTERM stay with the caller (the CLI turns them into exit 130 / 143); any
        # exception they raise inside the agent makes it stop every rank on its way out.
        signals_to_handle="SIGHUP,SIGQUIT",
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


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    """The agent logs every worker failure with its own traceback; planc reports failures itself."""
    manager = logging.Logger.manager
    loggers = [logging.getLogger(n) for n in list(manager.loggerDict) if n.startswith(AGENT_LOGGERS)]
    saved = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for logger, disabled in zip(loggers, saved):
            logger.disabled = disabled


def _run_error(e: ChildFailedError, job: _Job, world_size: int, timeout_s: float | None,
               watchdog: Watchdog) -> RunError:
    statuses = read_statuses(Path(job.status_dir))
    failed_at = watchdog.failed_at
    if job.deadline is not None and time.time() >= job.deadline and (failed_at is None or failed_at >= job.deadline):
        places = "; ".join(f"rank {r} {status.where(statuses[r], now=job.deadline)}" for r in sorted(statuses))
        return RunError(f"{job.entry} on {world_size} ranks exceeded timeout_s={timeout_s} s ({places}); "
                        f"every rank was stopped")
    agent_exits = {r: _agent_exit(f) for r, f in e.failures.items()}
    message = explain(read_notes(Path(job.failure_dir)), statuses, watchdog, agent_exits, job.collective_timeout_s)
    if not message:
        rank = min(e.failures, key=lambda r: e.failures[r].timestamp)
        message = f"rank {rank} failed: {_describe(e.failures[rank])}"
    return RunError(f"{message} ({job.entry} on {world_size} ranks; every rank was stopped)")


def _agent_exit(failure: ProcessFailure) -> Exit:
    code = failure.exitcode
    return Exit(float(failure.timestamp), None, -code) if code < 0 else Exit(float(failure.timestamp), code)


def _describe(failure: ProcessFailure) -> str:
    if not isinstance(failure.message, dict):  # no error file: killed by a signal or os._exit
        return f"exit code {failure.exitcode}: {failure.message}"
    return short_error(failure.message.get("message", ""))


def _read_results(result_dir: Path, world_size: int) -> list[Any] | None:
    paths = [result_dir / f"rank{r}.json" for r in range(world_size)]
    if not any(p.exists() for p in paths):
        return None
    return [json.loads(p.read_text()) if p.exists() else None for p in paths]


# -- worker side ------------------------------------------------------------------------------


def _rank_main(job: _Job) -> None:
    """Entry of every spawned rank. A rank that failed leaves at once, once its failure is written
    (its note, and @record's error file for the agent): a normal interpreter exit would destroy a
    process group whose background threads still run, and C++ aborts on that with a stray "terminate
    called without an active exception" on the user's terminal."""
    try:
        _worker(job)
    except BaseException:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(1)


@record
def _worker(job: _Job) -> None:
    """@record writes the exception for the agent to report."""
    _die_with_parent(job.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rank_status = status.install(Path(job.status_dir, f"rank{os.environ['RANK']}"))
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
        _init_process_group(job.backend, job.collective_timeout_s)
        function(job.args)
        dist.barrier()  # a rank that stalls after its last collective times its peers out here
    except BaseException as error:
        _note_failure(job.failure_dir, error, rank_status)
        raise
    rank_status.finish("done")
    # Only after success: tearing down a group whose peers died can block (NCCL).
    dist.destroy_process_group()


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this rank when the launching process dies, however it dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the launcher died before the line above
        os._exit(1)


def _note_failure(failure_dir: str, error: BaseException, rank_status: status.RankStatus) -> None:
    """Write when and how this rank failed, before its exit can break a peer's collective."""
    rank_status.finish("failed")
    frames = traceback.extract_tb(error.__traceback__)[-FRAMES:]
    note = {
        "time": time.time(),
        "error": f"{type(error).__name__}: {error}",
        "blocked": rank_status.blocked,  # raised inside a collective: most likely a peer's failure
        "frames": " <- ".join(f"{_short_path(f.filename)}:{f.lineno} in {f.name}" for f in reversed(frames)),
    }
    replace_file(Path(failure_dir, f"rank{os.environ['RANK']}.json"), json.dumps(note))


def _arm_deadline(deadline: float | None) -> None:
    if deadline is None:
        return
    # SIG_DFL for SIGALRM terminates the process from the kernel, GIL or not.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, max(deadline - time.time(), 1e-3))


def _import_entry(entry: str) -> Callable[[Any], Any]:
    module, _, function = entry.partition(":")
    return getattr(importlib.import_module(module), function)


def _short_path(filename: str) -> str:
    """A frame's file relative to the directory above its top-level package (planc/..., tests/...)."""
    path = Path(filename)
    for parent in path.parents:
        if not (parent / "__init__.py").exists():
            return str(path.relative_to(parent))
    return filename


def _init_process_group(backend: str, collective_timeout_s: float) -> None:
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    if backend == "nccl":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
