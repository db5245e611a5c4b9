"""What a plan strategy declares. Each module under passes/ declares one `Strategy` (or a few, for
`replicated`, which every section offers) and the op kinds and typed shards it introduces; the
plan schema, bind, the pass manager, partition, codegen, the report and inspect read these.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from planc.lazy import lazy

fx = lazy("torch.fx")


if TYPE_CHECKING:
    from planc.passmanager import PassContext


class Frozen(BaseModel):
    # Unknown keys are errors (typos must not be ignored) and plans are values: they key caches.
    model_config = ConfigDict(frozen=True, extra="forbid")


class Section(Frozen):
    """Fields every rule section shares; each strategy's section model derives from it and
    narrows its discriminator field (`strategy`, or the name it sets in `discriminator`, as the
    `overlap` section's `kind`) to its own Literal: the tag of the section's union."""

    discriminator: ClassVar[str] = "strategy"

    required: bool = Field(
        False,
        strict=True,
        description="If true, compilation fails when the rewrite cannot be applied to a "
        "matched module, instead of recording why it was declined.",
    )


    @property
    def choice(self) -> str:
        """The strategy value this section selects (its discriminator field's value)."""
        return getattr(self, self.discriminator)


Pass = Callable[["fx.Graph", Section, "PassContext"], "fx.Graph"]


@dataclass(frozen=True)
class Strategy:
    """One plan strategy.

    name: the pass's name everywhere (module, CLI output, report); section: the plan key it is
    written under; value: its discriminator's value there (`strategy: mla_tp`, `kind: t3`); kinds:
    the node kinds its rules bind; config: the section's pydantic model; rewrite: the pass,
    `(graph, section, ctx) -> graph`, called once per rule that selects it, on the nodes that rule
    bound (`ctx.bound(graph)`); candidates: when set, every place in the final graph the strategy
    could rewrite, matched by a rule or not, with what became of it, `(graph, ctx) -> [dict]`
    (report.json's `candidates`, printed by `planc compile`, shown by `planc inspect`); approximates:
    for a strategy that is not exact everywhere, what a node it rewrote computes otherwise than the
    model (None where that node is exact), `(NodeInfo) -> str | None` (report.json's `approximate`,
    which `planc verify` judges by tokens alone)."""

    name: str
    section: str
    value: str
    kinds: tuple[str, ...]
    config: type[Section]
    rewrite: Pass
    summary: str = ""
    candidates: Callable[[fx.Graph, "PassContext"], list[dict[str, Any]]] | None = None
    approximates: Callable[[Any], str | None] | None = None


@dataclass(frozen=True)
class Drafted:
    """What a drafting pass made of the draft's graph (its rules already applied).

    forward: the draft program's `forward` (prefill, and any exact pass over accepted tokens);
    more: further entry points of the draft program, name -> (graph, docstring); graphs: the graphs
    to record in the draft's report, in order; candidates: report.json's candidates[name] (also
    listed with the target's, so `planc compile`, validate and inspect show them); report: entries
    of the draft's report.json; speculate: entries of manifest["speculate"], what the runtime reads
    to draft this way; log: lines `planc compile` prints."""

    forward: fx.Graph
    more: dict[str, tuple[fx.Graph, str]]
    graphs: list[tuple[str, fx.Graph]]
    candidates: list[dict[str, Any]]
    report: dict[str, Any]
    speculate: dict[str, Any]
    log: list[str]


@dataclass(frozen=True)
class Drafting:
    """A way of drafting for speculative decoding, written as a key of the plan's `draft:` section
    (`draft: {easyspec: {...}}`). name: that key and the pass's name; config: the section's
    pydantic model; rewrite: the pass, `(graph, section, ctx) -> Drafted`, run once on the draft's
    graph after the draft's own rules; summary: the schema's description of the key; describe: how
    an artifact drafts, read from manifest["speculate"] (what `planc run` prints), None where this
    drafting made none of it."""

    name: str
    config: type[Frozen]
    rewrite: Callable[["fx.Graph", Any, "PassContext"], Drafted]
    summary: str = ""
    describe: Callable[[dict], str | None] = lambda speculate: None
