"""The plan file as typed, frozen pydantic models (DESIGN.md §3).

One plan section (`attention`, `mlp`, `moe`) is one pass; a new section is a new `Section`
subclass plus one optional field on `Rule`. Only values that a pass implements are listed in the
`strategy` literals, so the exported JSON Schema never offers a choice that cannot compile.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator


class _Frozen(BaseModel):
    # Unknown keys are errors (typos must not be ignored) and plans are values: they key caches.
    model_config = ConfigDict(frozen=True, extra="forbid")


class Mesh(_Frozen):
    """The devices the compiled program runs on."""

    devices: int = Field(ge=1, strict=True, description="World size: number of ranks.")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend; auto picks nccl on CUDA, gloo on CPU."
    )


class ModelRef(_Frozen):
    """The model a plan is applied to."""

    source: str = Field(
        min_length=1,
        strict=True,
        description="A bundled model name (e.g. tiny-deepseek), a checkpoint directory, "
        "or package.module:factory returning an nn.Module.",
    )
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = Field(
        "float32", description="Parameter and activation dtype."
    )


class Section(_Frozen):
    """Fields every rule section shares; each subclass is the input of one pass."""

    required: bool = Field(
        False,
        strict=True,
        description="If true, compilation fails when the rewrite cannot be applied to a "
        "matched module, instead of recording why it was declined.",
    )


TPLA_FIELDS = ("latent_groups", "transform", "prefill", "rmsnorm", "scales", "calibration_tokens", "seed")


class AttentionSection(Section):
    """How the attention modules matched by the rule are parallelised."""

    strategy: Literal["replicated", "tp", "mla_tp", "tpla"] = Field(
        description="replicated: every rank holds all heads; tp: GQA heads split over devices; "
        "mla_tp: MLA heads split over devices, latent KV cache replicated; tpla: MLA latent "
        "dimension split into latent_groups slices, heads split inside each group."
    )
    latent_groups: int = Field(1, ge=1, strict=True, description="tpla: g, the number of latent slices; g divides the devices.")
    transform: Literal["none", "hadamard", "pca"] = Field(
        "none", description="tpla: orthogonal transform folded into the latent weights before slicing "
        "(pca: eigenvectors of the latent covariance on the calibration split)."
    )
    prefill: Literal["mla", "tpla"] = Field(
        "mla", description="tpla: mla = exact MLA prefill, each rank keeps its latent slice (PD separation); "
        "tpla = prefill with the sliced formula too."
    )
    rmsnorm: Literal["sliced", "exact", "recompute"] = Field(
        "sliced", description="tpla: sliced = RMSNorm over each slice (the paper); exact = one small all-reduce "
        "of per-token sums of squares per layer; recompute = the exact RMS without communication: every rank "
        "recomputes a token's whole latent from the full kv_a_proj latent rows (which prefill: mla already "
        "keeps on every rank) and normalizes its slice by it."
    )
    scales: Literal["none", "calibrated"] = Field(
        "none", description="tpla + rmsnorm sliced: calibrated = one scale per latent slice, the mean ratio of the "
        "slice's RMS to the whole latent's on the calibration split, applied when a token's slice is written "
        "to the cache (recorded in report.json); none = the paper's plain per-slice RMSNorm."
    )
    calibration_tokens: int = Field(4096, ge=1, strict=True, description="tpla + pca or scales: calibration tokens.")
    seed: int = Field(0, strict=True, description="tpla + hadamard: seed of the random sign diagonal.")

    @model_validator(mode="after")
    def _tpla_fields_need_tpla(self) -> "AttentionSection":
        # Compare with the defaults, not with what was written: a dumped plan spells every field.
        stray = [f for f in TPLA_FIELDS if getattr(self, f) != type(self).model_fields[f].default]
        if stray and self.strategy != "tpla":
            raise ValueError(f"{', '.join(stray)} only apply to strategy 'tpla' (strategy is {self.strategy!r})")
        return self


class MlpSection(Section):
    """How the dense MLP modules matched by the rule are parallelised."""

    strategy: Literal["replicated", "tp"] = Field(
        description="replicated: every rank holds the whole MLP; tp: column-parallel gate/up "
        "projections, row-parallel down projection."
    )


class MoeSection(Section):
    """How the mixture-of-experts modules matched by the rule are parallelised."""

    strategy: Literal["replicated", "ep"] = Field(
        description="replicated: every rank holds every expert; ep: experts split over devices."
    )
    placement: Literal["contiguous"] = Field(
        "contiguous",
        description="Expert-to-device map; contiguous: rank r owns the r-th block of experts.",
    )


class Rule(_Frozen):
    """Apply one section to every module whose FQN matches `match`; the first matching rule wins."""

    match: str = Field(
        min_length=1,
        strict=True,
        description='fnmatch-style glob over module FQNs, e.g. "model.layers.*.self_attn".',
    )
    attention: AttentionSection | None = Field(None, description="Attention parallelism.")
    mlp: MlpSection | None = Field(None, description="Dense MLP parallelism.")
    moe: MoeSection | None = Field(None, description="Mixture-of-experts parallelism.")

    @classmethod
    def section_names(cls) -> tuple[str, ...]:
        """The keys that name a section; every field except `match` is one."""
        return tuple(name for name in cls.model_fields if name != "match")

    @model_validator(mode="after")
    def _exactly_one_section(self) -> Rule:
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


class Plan(_Frozen):
    """A planc parallel plan: a device mesh, a model and module-matching rules."""

    version: Literal[1] = Field(description="Plan format version; only 1 exists.")
    mesh: Mesh
    model: ModelRef | None = Field(
        None, description="The model to compile; may instead be given on the command line."
    )
    rules: tuple[Rule, ...] = Field(
        (), description="Module rules in priority order; the first rule matching a module wins."
    )

    # Where the plan came from, for error messages; kept out of dumps, the hash and the schema.
    # _positions maps a field path such as ("rules", 0, "match") to its 1-based (line, column).
    _source: str | None = PrivateAttr(None)
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

    def to_yaml_dict(self) -> dict[str, Any]:
        """Plain data that `yaml.safe_dump` writes and `parse_plan_text` reads back unchanged (defaults omitted)."""
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
