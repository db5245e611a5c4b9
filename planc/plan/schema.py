"""The plan file as typed, frozen pydantic models (DESIGN.md §3).

A rule has one section (`attention`, `mlp`, `moe`, `overlap`); each section is a union of the
section models the strategies declare (passes/), told apart by their discriminator's value
(`strategy`, or `kind` for `overlap`). A new strategy is a new module under passes/; a new section
key is a new `Strategy.section` there: this file lists neither.
"""
from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, PrivateAttr, create_model, model_validator

from planc.passes import DRAFTINGS, STRATEGIES
from planc.strategy import Frozen as _Frozen, Section

MAX_DEVICES = 1024  # ranks of one program; each gets its own weights file
MAX_RULES = 1024  # a rule's match is a glob: a plan needs a few dozen
MAX_SOURCE_CHARS = 4096  # PATH_MAX on Linux


class Mesh(_Frozen):
    """The devices the compiled program runs on."""

    devices: int = Field(ge=1, le=MAX_DEVICES, strict=True, description=f"World size: number of ranks (at most {MAX_DEVICES}).")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend; auto picks nccl on CUDA, gloo on CPU."
    )


class ModelRef(_Frozen):
    """The model a plan is applied to."""

    source: str = Field(
        min_length=1,
        max_length=MAX_SOURCE_CHARS,
        strict=True,
        description="A bundled model name (e.g. tiny-deepseek), a checkpoint directory or a config.json. "
        "A package.module:factory is taken only as MODEL on the command line: planc imports no code a plan names.",
    )
    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] = Field(
        "auto",
        description="Parameter and activation dtype. auto: the checkpoint's own (config.json's dtype or "
        "torch_dtype, else its safetensors tensors'), float32 for bundled models and random inits.",
    )


def _exactly_one_section_schema(schema: dict[str, Any]) -> None:
    """The JSON Schema says what the validator below enforces, so an editor flags a rule with no
    section key or with two as `planc validate` does."""
    names = [name for name in schema.get("properties", {}) if name != "match"]
    schema["oneOf"] = [{"required": [name]} for name in names]
    schema["description"] = f"{schema.get('description', '')} Exactly one section key: {', '.join(names)}.".strip()


class _RuleBase(_Frozen):
    """Apply one section to every module whose FQN matches `match`; the first matching rule wins."""

    model_config = ConfigDict(json_schema_extra=_exactly_one_section_schema)

    match: str = Field(
        min_length=1,
        strict=True,
        description='fnmatch-style glob over module FQNs, e.g. "model.layers.*.self_attn".',
    )

    @classmethod
    def section_names(cls) -> tuple[str, ...]:
        """The keys that name a section; every field except `match` is one."""
        return tuple(name for name in cls.model_fields if name != "match")

    @model_validator(mode="after")
    def _exactly_one_section(self) -> "_RuleBase":
        present = [name for name in self.section_names() if getattr(self, name) is not None]
        if len(present) != 1:
            allowed = ", ".join(self.section_names())
            found = ", ".join(present) or "none"
            raise ValueError(f"a rule needs exactly one section key out of {allowed}; "
                             f"found {found}")
        return self

    @property
    def section_name(self) -> str:
        """The key of the rule's single section, e.g. "attention"."""
        return next(name for name in self.section_names() if getattr(self, name) is not None)

    @property
    def section(self) -> Section:
        """The rule's single section."""
        return getattr(self, self.section_name)


SECTION_DESCRIPTIONS = {"attention": "Attention parallelism.", "mlp": "Dense MLP parallelism.",
                        "moe": "Mixture-of-experts parallelism.",
                        "overlap": "Overlap of a row-parallel GEMM with the collective after it."}


def _section_field(key: str) -> tuple[Any, Any]:
    configs = tuple(dict.fromkeys(s.config for s in STRATEGIES if s.section == key))
    tags = {c.discriminator for c in configs}
    assert len(tags) == 1, f"the {key} section's strategies disagree on their discriminator: {tags}"
    union = configs[0] if len(configs) == 1 else Annotated[Union[configs], Field(discriminator=tags.pop())]
    return union | None, Field(None, description=SECTION_DESCRIPTIONS.get(key, f"{key} section."))


SECTIONS = tuple(dict.fromkeys(s.section for s in STRATEGIES))
Rule = create_model("Rule", __base__=_RuleBase, __doc__=_RuleBase.__doc__,
                    **{key: _section_field(key) for key in SECTIONS})


MAX_SPECULATE_TOKENS = 16  # the target scores tokens + 1 positions in one pass


class Speculate(_Frozen):
    """How many tokens the draft proposes per round."""

    tokens: int = Field(4, ge=1, le=MAX_SPECULATE_TOKENS, strict=True,
                        description=f"gamma: draft tokens per round (1..{MAX_SPECULATE_TOKENS}); the target scores "
                        "gamma + 1 positions in one pass.")


class _DraftBase(_Frozen):
    """Speculative decoding: a draft model compiled beside the target (program `draft` of the same
    artifact, on the same ranks) under its own rules; greedy or sampled as `planc run` asks."""

    model: ModelRef = Field(description="The draft model; its vocabulary must be the target's.")
    rules: tuple[Rule, ...] = Field(
        (), max_length=MAX_RULES,
        description="The draft's own module rules (same form as the plan's); none: every block replicated.")
    speculate: Speculate = Field(default_factory=Speculate)

    @model_validator(mode="after")
    def _one_drafting(self) -> "_DraftBase":
        present = [d.name for d, _ in self.draftings()]
        if len(present) > 1:
            raise ValueError(f"choose one way of drafting; found {', '.join(present)}")
        return self

    def draftings(self) -> list[tuple[Any, Any]]:
        """The drafting passes this section asks for, with their sections (none: layer by layer)."""
        return [(d, getattr(self, d.name)) for d in DRAFTINGS if getattr(self, d.name) is not None]


# A key per way of drafting (passes/ declares them; this file lists none).
Draft = create_model("Draft", __base__=_DraftBase, __doc__=_DraftBase.__doc__,
                     **{d.name: (d.config | None, Field(None, description=d.summary)) for d in DRAFTINGS})


class Plan(_Frozen):
    """A planc parallel plan: a device mesh, a model and module-matching rules."""

    version: Literal[1] = Field(description="Plan format version; only 1 exists.")
    mesh: Mesh
    model: ModelRef | None = Field(
        None, description="The model to compile; may instead be given on the command line."
    )
    rules: tuple[Rule, ...] = Field(
        (), max_length=MAX_RULES,
        description=f"Module rules in priority order; the first rule matching a module wins (at most {MAX_RULES}).",
    )
    draft: Draft | None = Field(None, description="A draft model for speculative decoding, with its own rules.")

    # Where the plan came from, for error messages; kept out of dumps, the hash and the schema.
    # _positions maps a field path such as ("rules", 0, "match") to its 1-based (line, column).
    _source: str | None = PrivateAttr(None)
    _text: str | None = PrivateAttr(None)  # the YAML as written, comments and all
    _positions: dict[tuple[Any, ...], tuple[int, int]] = PrivateAttr(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        # Content equality: the file a plan was loaded from must not make equal plans differ.
        if not isinstance(other, Plan):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash(tuple(self.__dict__.values()))

    def hash(self) -> str:
        """SHA-256 hex digest of the plan's canonical JSON; part of every cache key."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def draft_plan(self) -> "Plan":
        """The draft section as a plan of its own (same mesh), keeping where each field is written,
        so the pipeline compiles the draft as it compiles any plan and its errors point into this file."""
        assert self.draft is not None
        plan = Plan(version=1, mesh=self.mesh, model=self.draft.model, rules=self.draft.rules)
        plan._source = self._source
        plan._positions = {path[1:]: where for path, where in self._positions.items() if path[:1] == ("draft",)}
        return plan

    def to_yaml_dict(self) -> dict[str, Any]:
        """Plain data that `yaml.safe_dump` writes and `parse_plan_text` reads back unchanged (defaults omitted)."""
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
