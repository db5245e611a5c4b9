"""User-facing errors.

Every error a user can cause names the thing at fault (plan field with YAML line:column, file,
module FQN or CLI argument), the offending value, and a fix. `assert` is for internal invariants.
"""
from __future__ import annotations

import json
import signal
from pathlib import Path


class PlancError(Exception):
    """Base class of errors caused by user input; the CLI prints them without a traceback."""


class PlanError(PlancError):
    """A plan file is malformed, or does not fit the model it is applied to."""


class ModelError(PlancError):
    """A model reference, config or checkpoint cannot be used."""


class CompileError(PlancError):
    """A pass or codegen step cannot honour the plan (e.g. a required rewrite was declined)."""


class ArtifactError(PlancError):
    """An artifact directory is missing, incomplete or inconsistent."""


class RunError(PlancError):
    """A multi-rank run failed; the message carries the first failing rank's error."""


class Interrupted(PlancError):
    """SIGTERM or SIGINT stopped planc where it could clean up; the message says what was left.
    `exit_status` is the shell's convention, 128 + the signal number (143, 130)."""

    def __init__(self, signum: int, outcome: str):
        self.signum = signum
        self.exit_status = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}; {outcome}")


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception's message on one line (transformers, safetensors and YAML write several), cut
    at `limit` characters (transformers lists every model type it knows in one message)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def read_json(path: Path, max_bytes: int) -> object:
    """The JSON document at `path`; ValueError with one line, `FILE[:LINE:COL]: what is wrong`,
    for a file that is unreadable, larger than `max_bytes`, not UTF-8, not JSON or nested too deeply."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise ValueError(f"{path}: larger than {max_bytes} bytes, more than planc reads")
    try:
        return json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}), so not JSON") from None
    except (ValueError, RecursionError) as exc:  # a 5,000-digit number; arrays nested 10^5 deep
        raise ValueError(f"{path}: not JSON planc can read ({one_line(exc)[:120]})") from None
