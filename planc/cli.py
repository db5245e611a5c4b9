"""`planc` command line: argument parsing and printing only; the work lives in the library.

Nothing here imports torch at module level: `--help`, `--version`, usage errors and plan errors
answer before torch (seconds to import) is loaded; each command imports what it runs.
"""
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

from planc import __version__
from planc.cost import PROFILES
from planc.errors import ArtifactError, Interrupted, PlancError, PlanError
from planc.runtime import KERNELS

MANIFEST = "manifest.json"  # what makes a directory an artifact (planc.codegen.artifact.MANIFEST)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one worth reading (not None, not an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks on this machine (default: the plan's mesh.devices over --nnodes)")
    p.add_argument("--kernels", choices=KERNELS, default=None,
                   help="op implementations (default: torch on CPU, triton on CUDA); cpu: MLA decode "
                        "attention fused in C for CPU ranks (needs a C compiler)")
    p.add_argument("--timeout", type=float, default=900.0, help="wall-clock limit of the run in seconds")
    p.add_argument("--collective-timeout", type=float, default=30.0,
                   help="seconds a rank waits in a collective for a peer before the run fails naming the rank "
                        "that stalled (raise it when ranks load large weights at different speeds)")
    p.add_argument("--nnodes", type=int, default=None, help="machines in the job (torchrun's --nnodes)")
    p.add_argument("--node-rank", type=int, default=None, help="this machine's index (torchrun's --node-rank)")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="rendezvous of every machine (torchrun's --rdzv-endpoint; default: a free local port)")
    p.add_argument("--rdzv-backend", default=None, help="torchrun's --rdzv-backend (default: static)")
    p.add_argument("--rdzv-id", default=None, help="the job's name, the same on every machine (torchrun's --rdzv-id)")


def _sub(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="planc", description="declarative parallel-plan compiler for LLM inference",
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"planc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_help = "bundled name, checkpoint dir, config.json or package.module:factory"

    _sub(sub, "schema", "print the plan format's JSON Schema")

    p = _sub(sub, "validate", "check a plan (and, with a model, that it fits the model); writes nothing")
    p.add_argument("plan", help="plan file (YAML)")
    p.add_argument("--model", default=None, help=f"{model_help} (default: the plan's model.source, if any)")
    p.add_argument("--meta", action="store_true", help="build the model on the meta device (no weights)")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                   help="a declined rewrite is an error (as `planc compile --strict`)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    p = _sub(sub, "compile", "compile MODEL under PLAN into an artifact directory")
    p.add_argument("model", nargs="?", default=None,
                   help=f"{model_help}; leave it out when the plan names model.source")
    p.add_argument("plan", help="plan file (YAML)")
    p.add_argument("-o", "--out", required=True, help="artifact directory to write (replaced if it is one)")
    p.add_argument("--meta", action="store_true", help="weightless dry run: report only, no weights")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                   help="fail on any declined rewrite (`required: true` on a rule fails on that rule's)")
    p.add_argument("--graph", action="store_true", help="print the parallel graph the passes produced")
    p.add_argument("--json", action="store_true", help="print one JSON object (the log goes to stderr)")

    p = _sub(sub, "run", "launch an artifact on N ranks and generate (inside torchrun: run this rank)")
    p.add_argument("artifact", help="compiled artifact directory")
    p.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable: one batch row each)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="decode the prompts N at a time, each batch prefilled and decoded on its own, one after "
                        "another in the same launch; the figures are summed over the batches (default: all "
                        "prompts in one batch)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = all")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same on every rank)")
    p.add_argument("--trace", nargs="?", const="", default=None, metavar="FILE",
                   help="record every rank's wall-clock span of each program node in the decode steps and write "
                        "them, from rank 0, as one Chrome trace JSON (Perfetto); FILE defaults to ARTIFACT/trace.json, "
                        "where `planc inspect` reads it. Untraced runs are not slowed")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_run_options(p)

    p = _sub(sub, "verify", "compare an artifact on N ranks with the single-device model; exit status 1 when it "
                            "differs beyond the dtype's tolerance")
    p.add_argument("artifact", help="compiled artifact directory")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens compared per prompt")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_run_options(p)

    p = _sub(sub, "inspect", "write a self-contained HTML page showing what a compile decided")
    p.add_argument("artifact", help="compiled artifact directory")
    p.add_argument("-o", "--out", default="plan.html", help="the page's file")
    p.add_argument("--json", action="store_true", help="also print the page's figures as one JSON object")
    p.add_argument("--trace-out", metavar="FILE", default=None,
                   help="also write the predicted decode step (and the measured one `planc run --trace` left in "
                        "the artifact) as Chrome trace JSON, which Perfetto opens")
    p.add_argument("--profile", choices=list(PROFILES), default="H100",
                   help="device profile of the predicted trace (default: %(default)s)")

    p = _sub(sub, "diff", "compare two artifacts, or two plans on one model: placements, per-rank bytes, "
                          "collectives, predicted decode step, kernels")
    p.add_argument("a", metavar="A", help="artifact directory or plan file")
    p.add_argument("b", metavar="B", help="artifact directory or plan file")
    p.add_argument("--model", default=None, help=f"for plans: {model_help} (default: each plan's model.source)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("-o", "--out", default=None, help="also write the comparison as an HTML page to this file")

    p = _sub(sub, "eval", "held-out bits per byte of a model, alone or as a compiled artifact on N ranks")
    p.add_argument("model", help=model_help)
    p.add_argument("--artifact", default=None, help="evaluate this compiled artifact (run on its ranks) instead")
    p.add_argument("--max-bytes", type=int, default=None, help="evaluate on fewer held-out bytes (default: all)")
    p.add_argument("--kernels", choices=KERNELS, default="torch", help="op implementations of the artifact's ranks")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    p = _sub(sub, "bench", "side-by-side measurements (see `planc bench --list`)")
    p.add_argument("cases", nargs="*", help="cases to run (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--list", action="store_true", help="list the cases")
    return parser


STUCK_S = 3.0  # a main thread that has not run its signal handler by then is blocked in C++
SIGPIPE_STATUS = 128 + 13  # what a shell reports for a writer whose reader went away


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
            status = COMMANDS[args.command](args) or 0
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
            return status
    except BrokenPipeError:
        return _stdout_closed()
    except Stop as stop:
        print(_interrupted_line(args.command, stop.signum), file=sys.stderr)
        return 128 + stop.signum
    except Interrupted as exc:  # raised by planc itself where no handler of the CLI's was installed
        print(f"planc {args.command}: {exc}", file=sys.stderr)
        return exc.exit_status
    except PlancError as exc:
        print(f"planc {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _stdout_closed() -> int:
    """The reader of our output went away (`planc schema | head`): stop quietly, as cat does; what
    is still buffered goes nowhere instead of into a second error at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return SIGPIPE_STATUS


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


# -- what every command checks before any work ---------------------------------------------------


def _plan_and_model(plan_path: str, model: str | None):
    """The plan (its errors before torch is imported) and the MODEL to compile it on: the one given,
    or the plan's model.source; both given and naming different models is an error. A factory
    (package.module:factory) is the exception: a plan may not name one, so MODEL stands in."""
    from planc.plan import load_plan, locate

    plan = load_plan(plan_path)
    if model is None or plan.model is None:
        return plan, model
    from planc.models.registry import source_kind

    named = plan.model.source
    if source_kind(model) == "factory" or _same_model(model, named, source_kind):
        return plan, model
    where = locate(plan, ("model", "source")) or plan_path
    raise PlanError(f"MODEL {model!r} is not the plan's model.source {named!r} ({where}); leave MODEL out to use "
                    f"the plan's model, or make them name the same model")


def _same_model(a: str, b: str, source_kind: Callable[[str], str]) -> bool:
    paths = ("checkpoint", "config")
    if source_kind(a) in paths and source_kind(b) in paths:
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def _check_artifact_out(out: str) -> None:
    """-o must be a new path or an artifact (replaced); anything else is refused before compiling."""
    path = Path(out)
    if path.exists() and not (path / MANIFEST).is_file():
        what = "a directory that is not a planc artifact" if path.is_dir() else "a file, not an artifact directory"
        raise ArtifactError(f"-o {out}: {what}; refusing to replace it (choose another -o)")


def _check_page_out(out: str, flag: str = "-o", example: str = "plan.html") -> None:
    """An output file's path, checked before any work: not a directory, not under a file."""
    path = Path(out)
    if path.is_dir():
        raise ArtifactError(f"{flag} {out}: a directory; name the file to write, e.g. {flag} {path / example}")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ArtifactError(f"{flag} {out}: {parent} is a file, so nothing can be written under it")


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=1))


# -- commands -------------------------------------------------------------------------------------


def cmd_schema(args) -> int:
    from planc.plan import plan_json_schema

    print(json.dumps(plan_json_schema(), indent=2))


def cmd_validate(args) -> int:
    _plan_and_model(args.plan, args.model)
    from planc.driver import validate, validation

    if args.json:
        _print_json(validation(args.plan, args.model, meta=args.meta, strict=args.strict))
    else:
        print(validate(args.plan, args.model, meta=args.meta, strict=args.strict))


def cmd_compile(args) -> int:
    plan, model = _plan_and_model(args.plan, args.model)
    _check_artifact_out(args.out)
    from planc.diff import human_bytes, rank_groups
    from planc.driver import compile

    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    art = compile(model, plan, args.out, meta=args.meta, strict=args.strict, log=log)
    if args.json:
        _print_json({"artifact": str(art.path), "model": art.manifest["model"]["source"],
                     "world_size": art.manifest["world_size"], "dtype": art.manifest["dtype"], "meta": args.meta,
                     "compile_seconds": art.report["compile_seconds"], "per_rank": art.report["per_rank"],
                     "collectives_per_decode_step": art.report["collectives_per_decode_step"],
                     "declines": art.report["declines"]})
        return 0
    if args.graph:
        print(art.report["graphs"][list(art.report["graphs"])[-1]])
    for ranks, entry in rank_groups(art.report["per_rank"]):
        print(f"{ranks}: weights {human_bytes(entry['weight_bytes'])} ({art.manifest['dtype']}), "
              f"KV cache {entry['kv_bytes_per_token']} B/token")
    print(f"wrote {art.path} in {art.report['compile_seconds']:.1f} s")


def _rdzv(args) -> dict:
    keys = {"nnodes": args.nnodes, "node_rank": args.node_rank, "rdzv_endpoint": args.rdzv_endpoint,
            "rdzv_backend": args.rdzv_backend, "rdzv_id": args.rdzv_id}
    return {k: v for k, v in keys.items() if v is not None}


def _speaks() -> bool:
    """Inside torchrun's job every rank runs the command; rank 0 alone prints."""
    return os.environ.get("RANK", "0") == "0"


def cmd_run(args) -> int:
    from planc.report.timeline import MEASURED
    from planc.run import format_run, run

    trace = None if args.trace is None else Path(args.trace or Path(args.artifact) / MEASURED)
    result = run(Path(args.artifact), nproc=args.nproc, prompts=args.prompt, max_new_tokens=args.max_new_tokens,
                 sampling={"temperature": args.temperature, "top_k": args.top_k, "seed": args.seed},
                 kernels=args.kernels, timeout_s=args.timeout, collective_timeout_s=args.collective_timeout,
                 rdzv=_rdzv(args), trace=trace, batch_size=args.batch_size)
    if _speaks():
        print(json.dumps(result) if args.json else format_run(result))


def cmd_verify(args) -> int:
    from planc.verify import verify

    report = verify(Path(args.artifact), max_new_tokens=args.max_new_tokens,
                    kernels=args.kernels, timeout_s=args.timeout,
                    collective_timeout_s=args.collective_timeout, nproc=args.nproc, rdzv=_rdzv(args))
    if _speaks():
        print(json.dumps(report) if args.json else _verify_lines(report))
    return 0 if report["passed"] else 1


def _verify_lines(report: dict) -> str:
    verdict = "passed" if report["passed"] else "FAILED"
    ranks = "" if report["ranks_agree"] else "; the ranks generated different tokens"
    return (f"token_agreement {report['token_agreement']:.4f} over {report['tokens_compared']} tokens, "
            f"max_logit_diff {report['max_logit_diff']:.3e}, median {report['median_logit_diff']:.3e} over the "
            f"{report['logit_steps_agreeing']} row steps before any divergence, max_logit_diff "
            f"{report['max_logit_diff_all_steps']:.3e} over all {report['logit_steps_all']} row steps "
            f"({report['world_size']} ranks, {report['dtype']})\n"
            f"{verdict}: {report['dtype']} tolerance {report['tolerance']}{ranks}"
            + _approximate_line(report.get("approximate") or {}))


def _approximate_line(approximate: dict) -> str:
    """Why the bar is tokens alone: the lines `planc compile` printed on what the plan approximates."""
    from planc.report.report import approximation_lines

    return "".join(f"\n{line}" for line in approximation_lines(approximate))


def cmd_inspect(args) -> int:
    _check_page_out(args.out)
    if args.trace_out is not None:
        _check_page_out(args.trace_out, "--trace-out", "trace.json")
    from planc.report.inspect import write

    page = write(Path(args.artifact), Path(args.out))
    trace = None
    if args.trace_out is not None:
        from planc.report.timeline import export

        trace = export(Path(args.artifact), Path(args.trace_out), profile=args.profile)
    if args.json:
        from planc.diff import summarize

        _print_json({"page": str(page), **({"trace": str(trace)} if trace else {}), **summarize(Path(args.artifact))})
    else:
        print(f"wrote {page}" + (f" and {trace}" if trace else ""))


def cmd_diff(args) -> int:
    if args.out is not None:
        _check_page_out(args.out)
    from planc.diff import diff, format_diff

    result = diff(args.a, args.b, model=args.model)
    if args.out is not None:
        from planc.codegen.replace import replace_file
        from planc.report.inspect import render_diff

        result["page"] = str(replace_file(Path(args.out), render_diff(result)))
    if args.json:
        _print_json(result)
    else:
        print(format_diff(result))
        if args.out is not None:
            print(f"wrote {result['page']}")


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
            "verify": cmd_verify, "eval": cmd_eval, "inspect": cmd_inspect, "diff": cmd_diff, "bench": cmd_bench}

if __name__ == "__main__":
    sys.exit(main())
