"""`planc` command line: argument parsing and printing only; the work lives in the library."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from planc.errors import Interrupted, PlancError
from planc.runtime import KERNELS


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", choices=KERNELS, default=None,
                   help="op implementations (default: torch on CPU, triton on CUDA); cpu: MLA decode "
                        "attention fused in C for CPU ranks (needs a C compiler)")
    p.add_argument("--timeout", type=float, default=900.0, help="wall-clock limit of the run in seconds")
    p.add_argument("--collective-timeout", type=float, default=30.0,
                   help="seconds a rank waits in a collective for a peer before the run fails naming the rank "
                        "that stalled (raise it when ranks load large weights at different speeds)")
    for flag in ("--nnodes", "--node-rank"):
        p.add_argument(flag, type=int, default=None, help="forwarded to torch.distributed's launcher")
    for flag in ("--rdzv-endpoint", "--rdzv-backend", "--rdzv-id"):
        p.add_argument(flag, default=None, help="forwarded to torch.distributed's launcher")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="planc", description="declarative parallel-plan compiler for LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("schema", help="print the plan format's JSON Schema")

    p = sub.add_parser("validate", help="check a plan (and, with --model, that it fits the model)")
    p.add_argument("plan")
    p.add_argument("--model", default=None)
    p.add_argument("--meta", action="store_true", help="build the model on the meta device (no weights)")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                   help="a declined rewrite is an error (as `planc compile --strict`)")

    p = sub.add_parser("compile", help="compile MODEL under PLAN into an artifact directory")
    p.add_argument("model", help="bundled name, checkpoint dir, config.json or package.module:factory")
    p.add_argument("plan")
    p.add_argument("-o", "--out", required=True, help="artifact directory to write")
    p.add_argument("--meta", action="store_true", help="weightless dry run: report only, no weights")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                   help="fail on any declined rewrite (default: record and print declines; `required: true` "
                        "on a rule fails on that rule's)")
    p.add_argument("--graph", action="store_true", help="print the parallel graph the passes produced")

    p = sub.add_parser("run", help="launch an artifact on N ranks and generate")
    p.add_argument("artifact")
    p.add_argument("--nproc", type=int, default=None, help="ranks on this machine (default: the plan's mesh.devices)")
    p.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable: one batch row each)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_run_options(p)

    p = sub.add_parser("verify", help="compare an artifact on N ranks with the single-device model; exit "
                                      "status 1 when it differs beyond the dtype's tolerance")
    p.add_argument("artifact")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", action="store_true")
    _add_run_options(p)

    p = sub.add_parser("inspect", help="write a self-contained HTML page showing what a compile decided")
    p.add_argument("artifact")
    p.add_argument("-o", "--out", default="plan.html")

    p = sub.add_parser("eval", help="held-out bits per byte of a model, alone or as a compiled artifact on N ranks")
    p.add_argument("model", help="bundled name, checkpoint dir, config.json or package.module:factory")
    p.add_argument("--artifact", default=None, help="evaluate this compiled artifact (run on its ranks) instead")
    p.add_argument("--max-bytes", type=int, default=None, help="evaluate on fewer held-out bytes")
    p.add_argument("--kernels", choices=KERNELS, default="torch")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="side-by-side measurements (see `planc bench --list`)")
    p.add_argument("cases", nargs="*")
    p.add_argument("--json", action="store_true")
    p.add_argument("--list", action="store_true")
    return parser


STUCK_S = 3.0  # a main thread that has not run its signal handler by then is blocked in C++


class Stop(BaseException):
    """SIGINT or SIGTERM arrived: unwinds the command like KeyboardInterrupt, which no `except
    Exception` on the way (torch's agent has some) can swallow; ranks and partial artifacts are
    removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _signals_interrupt(args.command):
            return COMMANDS[args.command](args) or 0
    except Stop as stop:
        print(_interrupted_line(args.command, stop.signum), file=sys.stderr)
        return 128 + stop.signum
    except Interrupted as exc:  # raised by planc itself where no handler of the CLI's was installed
        print(f"planc {args.command}: {exc}", file=sys.stderr)
        return exc.exit_status
    except PlancError as exc:
        print(f"planc {args.command}: error: {exc}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _signals_interrupt(command: str) -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM raise Stop once; a repeat while it unwinds is ignored.

    Python runs a signal handler only between bytecodes: a main thread blocked in C++ (a rendezvous
    waiting for other machines) would not see it for minutes. A thread woken through the signal
    wakeup fd exits with the same line and status when the handler has not run within STUCK_S
    (unless another handler has taken the signal over meanwhile, as an artifact's swap does until
    it is complete); the ranks die with the launcher (PR_SET_PDEATHSIG, planc.runtime.launch)."""
    handled = threading.Event()

    def first(signum: int, frame: object) -> None:
        handled.set()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise Stop(signum)

    try:
        saved = {s: signal.signal(s, first) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_exit_if_stuck, args=(command, read_fd, handled, first), daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        os.close(write_fd)  # the watcher reads end-of-file and returns
        watcher.join()
        os.close(read_fd)
        for s, handler in saved.items():
            signal.signal(s, handler)


def _exit_if_stuck(command: str, read_fd: int, handled: threading.Event, handler: Callable) -> None:
    while True:
        woken_by = os.read(read_fd, 64)
        if not woken_by:
            return
        stops = [s for s in woken_by if s in (signal.SIGINT, signal.SIGTERM)]
        if stops:
            break
    if not handled.wait(STUCK_S) and signal.getsignal(stops[0]) is handler:
        print(_interrupted_line(command, stops[0]), file=sys.stderr, flush=True)
        os._exit(128 + stops[0])


def _interrupted_line(command: str, signum: int) -> str:
    return (f"planc {command}: interrupted by {signal.Signals(signum).name}; stopped, leaving no rank it started "
            f"and no partial artifact")


def cmd_schema(args) -> int:
    from planc.plan import plan_json_schema

    print(json.dumps(plan_json_schema(), indent=2))


def cmd_validate(args) -> int:
    from planc.driver import validate

    print(validate(args.plan, args.model, meta=args.meta, strict=args.strict))


def cmd_compile(args) -> int:
    from planc.driver import compile

    art = compile(args.model, args.plan, args.out, meta=args.meta, strict=args.strict, log=print)
    if args.graph:
        print(art.report["graphs"][list(art.report["graphs"])[-1]])
    for entry in art.report["per_rank"]:
        print(f"rank {entry['rank']}: weights {entry['weight_bytes'] / 2**20:.2f} MiB ({art.manifest['dtype']}), "
              f"KV cache {entry['kv_bytes_per_token']} B/token")
    print(f"wrote {art.path} in {art.report['compile_seconds']:.1f} s")


def _rdzv(args) -> dict:
    keys = {"nnodes": args.nnodes, "node_rank": args.node_rank, "rdzv_endpoint": args.rdzv_endpoint,
            "rdzv_backend": args.rdzv_backend, "rdzv_id": args.rdzv_id}
    return {k: v for k, v in keys.items() if v is not None}


def cmd_run(args) -> int:
    from planc.run import format_run, run

    result = run(Path(args.artifact), nproc=args.nproc, prompts=args.prompt, max_new_tokens=args.max_new_tokens,
                 sampling={"temperature": args.temperature, "top_k": args.top_k, "seed": args.seed},
                 kernels=args.kernels, timeout_s=args.timeout, collective_timeout_s=args.collective_timeout,
                 rdzv=_rdzv(args))
    print(json.dumps(result) if args.json else format_run(result))


def cmd_verify(args) -> int:
    from planc.runtime.kernel_ops import default_kernels
    from planc.verify import verify

    report = verify(Path(args.artifact), max_new_tokens=args.max_new_tokens,
                    kernels=args.kernels or default_kernels(), timeout_s=args.timeout,
                    collective_timeout_s=args.collective_timeout)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"token_agreement {report['token_agreement']:.4f} over {report['tokens_compared']} tokens, "
              f"max_logit_diff {report['max_logit_diff']:.3e}, median {report['median_logit_diff']:.3e} over the "
              f"{report['logit_steps_agreeing']} row steps before any divergence, max_logit_diff "
              f"{report['max_logit_diff_all_steps']:.3e} over all {report['logit_steps_all']} row steps "
              f"({report['world_size']} ranks, {report['dtype']})")
        verdict = "passed" if report["passed"] else "FAILED"
        ranks = "" if report["ranks_agree"] else "; the ranks generated different tokens"
        print(f"{verdict}: {report['dtype']} tolerance {report['tolerance']}{ranks}")
    return 0 if report["passed"] else 1


def cmd_inspect(args) -> int:
    from planc.report.inspect import write

    print(f"wrote {write(Path(args.artifact), Path(args.out))}")


def _check_artifact_model(artifact: str, model: str) -> None:
    from planc.runtime.artifact import read_manifest

    compiled = read_manifest(Path(artifact))["model"]["source"]
    if Path(compiled).name != Path(model).name and compiled != model:
        raise PlancError(f"--artifact {artifact} was compiled from {compiled!r}, not {model!r}; "
                         f"run `planc eval {compiled} --artifact {artifact}`")


def cmd_eval(args) -> int:
    from planc.zoo.eval import artifact_bits_per_byte, bits_per_byte

    if args.artifact:
        _check_artifact_model(args.artifact, args.model)
        bpb = artifact_bits_per_byte(args.artifact, max_bytes=args.max_bytes, kernels=args.kernels)
    else:
        bpb = bits_per_byte(args.model, max_bytes=args.max_bytes)
    subject = args.artifact or args.model
    print(json.dumps({"model": args.model, "artifact": args.artifact, "bpb": bpb}) if args.json
          else f"{subject}: {bpb:.4f} bits per byte (held-out)")


def cmd_bench(args) -> int:
    from planc.bench import run_cases

    return run_cases(args.cases, as_json=args.json, list_only=args.list)


COMMANDS = {"schema": cmd_schema, "validate": cmd_validate, "compile": cmd_compile, "run": cmd_run,
            "verify": cmd_verify, "eval": cmd_eval, "inspect": cmd_inspect, "bench": cmd_bench}

if __name__ == "__main__":
    sys.exit(main())
