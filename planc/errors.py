"""User-facing errors.

Every error a user can cause names the thing at fault (plan field with YAML line:column, file,
module FQN or CLI argument), the offending value, and a fix. `assert` is for internal invariants.
"""
from __future__ import annotations


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
