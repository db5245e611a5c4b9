"""`attention: {strategy: tpla}` — Tensor-Parallel Latent Attention (arXiv 2508.15881).

    before:  q = linear[q_b_proj];  kv = linear[kv_a_proj_with_mqa];  o = mla_attention(q, kv)
             a = linear[o_proj](o);  h = add(h, a)
    after:   q = linear[q_b_proj]  (column: this rank's decode heads, its prefill heads first)
             kv = linear[kv_a_proj_with_mqa]  (rows U^T-rotated: its latent slice c'_j first, then
                  with PD separation or recompute the other slices, then the rope rows)
             lat = tpla_latent(kv)                 slice, whole latent (if held), rope key, sums of squares
             ss = all_reduce(tpla_sumsq(lat))      only with rmsnorm: exact
             o = tpla_attention(q, lat[, ss])      H/(k/g) heads over slice j; per-slice softmax
             a = linear[o_proj] (row);  a' = all_reduce(a)   the single all-reduce MLA-TP already has

k devices form g groups of k/g; group j holds latent slice j (C/g wide) and the full rope key, heads
are split over the ranks of a group. The orthogonal transform U (none | hadamard | pca, from the
calibration profile) is decided here and folded into the weights when they are sliced:
W_DKV <- U^T W_DKV, W_UK/W_UV <- W_UK/W_UV diag(gamma) U, gamma <- 1, so the unsliced model is
exactly MLA. With PD separation (prefill: mla) prefill runs exact MLA on this rank's prefill heads
(the first H/k of its decode heads) over the whole rotated latent and caches only slice j.

Legend: B batch, S tokens this step, C latent, Cs = C/g slice, R rope dim, P nope, V value dim,
Hd decode heads on this rank, Hp prefill heads on this rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from pydantic import Field, model_validator

from planc.dims import CommDims, MlaDims
from planc.ir import (Call, LinearShard, NodeInfo, Shard, Tensors, add_node, block_members, copy_graph, declare_op,
                      divisors, info, mark, sum_partials_after)
from planc.lazy import lazy
from planc.ops import MlaCache, Step, acc, apply_rope
from planc.semantic import MLA_KERNELS
from planc.strategy import Section, Strategy
from planc.transforms import hadamard, pca, slice_scales

torch = lazy("torch")
fx = lazy("torch.fx")


class TplaSection(Section):
    """MLA latent dimension split into latent_groups slices, heads split inside each group."""

    strategy: Literal["tpla"] = Field(description="tpla: MLA latent split into latent_groups slices.")
    latent_groups: int = Field(1, ge=1, strict=True, description="g, the number of latent slices; g divides the devices.")
    transform: Literal["none", "hadamard", "pca"] = Field(
        "none", description="orthogonal transform folded into the latent weights before slicing "
        "(pca: eigenvectors of the latent covariance on the calibration split).")
    prefill: Literal["mla", "tpla"] = Field(
        "mla", description="mla = exact MLA prefill, each rank keeps its latent slice (PD separation); "
        "tpla = prefill with the sliced formula too.")
    rmsnorm: Literal["sliced", "exact", "recompute"] = Field(
        "sliced", description="sliced = RMSNorm over each slice (the paper); exact = one small all-reduce "
        "of per-token sums of squares per layer; recompute = the exact RMS without communication: every rank "
        "recomputes a token's whole latent from the full kv_a_proj latent rows (which prefill: mla already "
        "keeps on every rank) and normalizes its slice by it.")
    scales: Literal["none", "calibrated"] = Field(
        "none", description="with rmsnorm sliced: calibrated = one scale per latent slice, the mean ratio of the "
        "slice's RMS to the whole latent's on the calibration split, applied when a token's slice is written "
        "to the cache (recorded in report.json); none = the paper's plain per-slice RMSNorm.")
    calibration_tokens: int = Field(4096, ge=1, le=1 << 18, strict=True,
                                    description="pca or scales: calibration tokens (the calibration split holds ~360k).")
    seed: int = Field(0, ge=0, le=(1 << 63) - 1, strict=True, description="hadamard: seed of the random sign diagonal.")

    @model_validator(mode="after")
    def _scales_need_the_sliced_norm(self) -> "TplaSection":
        if self.scales == "calibrated" and self.rmsnorm != "sliced":
            raise ValueError(f"scales: 'calibrated' corrects the sliced RMSNorm; with rmsnorm: {self.rmsnorm!r} "
                             "there is nothing to correct. Use rmsnorm: sliced or scales: none")
        return self


# -- what one rank runs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TplaDims:
    """One rank's share of a TPLA layer (every rank has the same numbers; slices live in weights).

    mla.num_heads: decode heads on this rank; latent: its slice width C/g; group_size: ranks
    sharing one slice; prefill_heads: heads this rank runs in exact-MLA prefill (0: prefill uses
    the sliced formula); whole: kv_a's output holds the whole rotated latent (slice first);
    rmsnorm: sliced | exact | recompute."""

    mla: MlaDims
    latent: int
    group_size: int
    prefill_heads: int
    whole: bool
    rmsnorm: str

    def cache(self) -> dict:
        return {"kind": "mla", "ckv": self.latent, "kpe": self.mla.rope_dim}


@dataclass
class TplaLatent:
    """This step's latent slice (before normalization), the whole latent when held, the rope key
    (not yet rotated) and the per-token sum of squares (of the slice; recompute: of the whole)."""

    c_BSC: torch.Tensor
    whole_BSC: torch.Tensor | None
    k_pe_BSR: torch.Tensor
    sumsq_BS1: torch.Tensor


def latent(kv_BSY: torch.Tensor, d: TplaDims) -> TplaLatent:
    C, R = d.mla.kv_lora_rank, d.mla.rope_dim
    whole = kv_BSY[..., :C] if d.whole else None
    c, k_pe = kv_BSY[..., :d.latent], kv_BSY[..., -R:]
    norm_of = whole if d.rmsnorm == "recompute" else c
    return TplaLatent(c, whole, k_pe, acc(norm_of).pow(2).sum(-1, keepdim=True))


def sumsq(lat: TplaLatent) -> torch.Tensor:
    return lat.sumsq_BS1


def attention(ops, q_BSX, lat: TplaLatent, sumsq_BS1, step: Step, cache: MlaCache, W: Tensors,
              d: TplaDims) -> torch.Tensor:
    """TPLA on one rank -> per-head values [B, S, Hd V] before o_proj (a partial over slices).

    Prefill with PD separation runs exact MLA and caches the slice; otherwise: normalize the slice
    (sliced: over the slice; exact: by the all-reduced sum of squares; recompute: by the whole
    latent's, computed here), per-slice softmax, this slice of W_UV."""
    if step.start == 0 and d.prefill_heads:
        return _exact_prefill(ops, q_BSX, lat, step, cache, W, d)
    m = d.mla
    B, S, _ = q_BSX.shape
    q_nope, q_pe, (cos, sin) = ops.mla_queries(q_BSX, step, W, m)
    whole = sumsq_BS1 is not None or d.rmsnorm == "recompute"
    width = m.kv_lora_rank if whole else d.latent
    ss = sumsq_BS1 / d.group_size if sumsq_BS1 is not None else lat.sumsq_BS1
    c = acc(lat.c_BSC) * torch.rsqrt(ss / width + m.eps)
    if "tpla.scale" in W:  # calibrated slice scale (scales: calibrated)
        c = c * W["tpla.scale"]
    c = c.to(q_BSX.dtype)
    k_pe = apply_rope(lat.k_pe_BSR[:, :, None, :], cos, sin, m.rope_interleave)[:, :, 0]
    end = step.start + S
    cache.ckv_BTC[:, step.start:end] = c
    cache.kpe_BTR[:, step.start:end] = k_pe
    w_uk, w_uv = W["kv_b_proj.weight"].view(m.num_heads, m.nope_dim + m.v_dim, d.latent).split([m.nope_dim, m.v_dim], 1)
    o_lat = ops.mla_attend(torch.einsum("bshp,hpc->bshc", q_nope, w_uk), q_pe, cache, step, S, m.scale)
    return torch.einsum("bshc,hvc->bshv", o_lat, w_uv).reshape(B, S, m.num_heads * m.v_dim)


def _exact_prefill(ops, q_BSX, lat: TplaLatent, step: Step, cache: MlaCache, W: Tensors, d: TplaDims):
    """Exact MLA of this rank's prefill heads over the whole rotated latent; zeros for its other
    decode heads (o_proj is laid out for them); the cache keeps slice j, exactly normalized."""
    m = d.mla
    B, S, _ = q_BSX.shape
    mp = m.local(d.prefill_heads)
    q = q_BSX[..., :d.prefill_heads * (m.nope_dim + m.rope_dim)]
    full = MlaCache(cache.ckv_BTC.new_zeros(B, S, m.kv_lora_rank), cache.kpe_BTR[:, :S].clone())
    W_prefill = {"kv_a_layernorm.weight": W["prefill.unit_norm"], "kv_b_proj.weight": W["prefill.kv_b_proj.weight"],
                 **{k: v for k, v in W.items() if k.startswith("rotary.")}}
    o = ops.mla_core(q, torch.cat([lat.whole_BSC, lat.k_pe_BSR], -1), Step(0, step.pos_BS, step.key_mask_BT), full,
                     W_prefill, mp)
    rms = torch.rsqrt(acc(lat.whole_BSC).pow(2).mean(-1, keepdim=True) + m.eps)
    cache.ckv_BTC[:, :S] = (acc(lat.c_BSC) * rms).to(q_BSX.dtype)
    cache.kpe_BTR[:, :S] = full.kpe_BTR
    return torch.nn.functional.pad(o, (0, (m.num_heads - d.prefill_heads) * m.v_dim))


IMPORT = ("from planc.passes import tpla",)


def _dims(c: Call) -> str:
    return c.const("TPLA", c.info.local_dims())


declare_op("tpla_latent", lambda c: f"tpla.latent({c.args[0]}, {_dims(c)})", imports=IMPORT)
declare_op("tpla_sumsq", lambda c: f"tpla.sumsq({c.args[0]})", imports=IMPORT)
declare_op("tpla_attention", lambda c: f"tpla.attention(ops, {c.args[0]}, {c.args[1]}, "
                                       f"{c.args[2] if len(c.args) > 2 else 'None'}, step, caches[{c.name()}], "
                                       f"{c.W}, {_dims(c)})",
           owns_weights=True, rotary=True, step=True, imports=IMPORT, kernels=MLA_KERNELS)


# -- the layout: which heads, which slice, which rotation -----------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where rank r = group j · group_size + member i sits: decode heads of member i (prefill part j
    first), latent slice j."""

    heads: int  # H
    world: int  # k
    groups: int  # g
    prefill: bool

    @property
    def group_size(self) -> int:
        return self.world // self.groups

    @property
    def decode_heads(self) -> int:
        return self.heads // self.group_size

    @property
    def prefill_heads(self) -> int:
        return self.heads // self.world if self.prefill else 0

    def head_order(self, rank: int) -> list[int]:
        """This rank's decode heads, its prefill heads (part j of them) first."""
        group, member = divmod(rank, self.group_size)
        mine = list(range(member * self.decode_heads, (member + 1) * self.decode_heads))
        part = self.heads // self.world
        first = mine[group * part:(group + 1) * part] if self.prefill else []
        return first + [h for h in mine if h not in first]

    def head_segments(self, rank: int, unit: int) -> tuple[tuple[int, int], ...]:
        return _merge((h * unit, (h + 1) * unit) for h in self.head_order(rank))

    def latent_order(self, rank: int, C: int, whole: bool) -> list[int]:
        """Rotated latent rows this rank holds: slice j first, then (whole) the others in order."""
        j, width = rank // self.group_size, C // self.groups
        mine = list(range(j * width, (j + 1) * width))
        return mine + [c for c in range(C) if c not in mine] if whole else mine


def _merge(pieces) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for lo, hi in pieces:
        if out and out[-1][1] == lo:
            out[-1][1] = hi
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


@dataclass(frozen=True)
class LatentKv(Shard):
    """kv_a_proj_with_mqa rotated by U^T and reduced to this rank's latent rows, then the rope rows."""

    layout: Layout = field(repr=False)
    U: torch.Tensor = field(repr=False)
    whole: bool = True

    def local(self, dims):
        C = self.U.shape[0]
        rows = C if self.whole else C // self.layout.groups
        return replace(dims, out_features=rows + dims.out_features - C)

    def slice(self, W: Tensors, info: NodeInfo, rank: int) -> Tensors:
        C = self.U.shape[0]
        order = torch.tensor(self.layout.latent_order(rank, C, self.whole))
        return {name: torch.cat([_rotate_rows(t, self.U)[order].to(t.dtype), t[C:]])
                for name, t in W.items() if name in ("weight", "bias")}

    def describe(self) -> dict:
        return {"latent_rows": self.U.shape[0] if self.whole else self.U.shape[0] // self.layout.groups}


def _rotate_rows(w_CD: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """U^T W over the latent rows (of a weight or a bias), in fp64 (meta stays meta)."""
    C = U.shape[0]
    return U.T.to(w_CD.device) @ w_CD[:C].double()


@dataclass(frozen=True)
class LatentCore(Shard):
    """The attention core's tensors on one rank: W_UK/W_UV folded with diag(gamma) U, rows of its decode
    heads and columns of slice j; for PD prefill, its prefill heads over the whole (reordered) latent."""

    layout: Layout = field(repr=False)
    U: torch.Tensor = field(repr=False)
    scales: torch.Tensor | None = field(repr=False)
    whole: bool
    rmsnorm: str
    latent_groups: int
    latent_per_rank: int
    heads_per_rank: int
    prefill_heads_per_rank: int
    transform: str

    def local(self, dims: MlaDims) -> TplaDims:
        return TplaDims(dims.local(self.heads_per_rank), self.latent_per_rank, self.layout.group_size,
                        self.prefill_heads_per_rank, self.whole, self.rmsnorm)

    def slice(self, W: Tensors, info: NodeInfo, rank: int) -> Tensors:
        d: MlaDims = info.dims
        per_head = d.nope_dim + d.v_dim
        dtype = W["kv_b_proj.weight"].dtype
        kv_b = W["kv_b_proj.weight"].double() * W["kv_a_layernorm.weight"].double()[None, :] @ self.U.to(
            W["kv_b_proj.weight"].device)
        heads = torch.tensor([h * per_head + i for h in self.layout.head_order(rank) for i in range(per_head)])
        j = rank // self.layout.group_size
        out = {"kv_b_proj.weight": kv_b[heads][:, j * self.latent_per_rank:(j + 1) * self.latent_per_rank].to(dtype)}
        if self.prefill_heads_per_rank:
            order = torch.tensor(self.layout.latent_order(rank, d.kv_lora_rank, True))
            out["prefill.kv_b_proj.weight"] = kv_b[heads[:self.prefill_heads_per_rank * per_head]][:, order].to(dtype)
            out["prefill.unit_norm"] = torch.ones_like(W["kv_a_layernorm.weight"])
        if self.scales is not None:
            out["tpla.scale"] = self.scales[j:j + 1].to(dtype)
        return out


# -- the pass ---------------------------------------------------------------------------------------


def valid_groups(devices: int, kv_lora_rank: int) -> list[int]:
    return [g for g in divisors(devices) if kv_lora_rank % g == 0]


def _why_not(d: MlaDims, section: TplaSection, world: int) -> str | None:
    g = section.latent_groups
    if g not in valid_groups(world, d.kv_lora_rank):
        return (f"latent_groups {g} does not fit {world} devices and kv_lora_rank {d.kv_lora_rank}; valid "
                f"latent_groups: {', '.join(map(str, valid_groups(world, d.kv_lora_rank)))}")
    need = world if section.prefill == "mla" else world // g
    if d.num_heads % need:
        return (f"{d.num_heads} heads do not split over {need} ranks (devices / latent_groups"
                f"{', and all devices for prefill: mla' if section.prefill == 'mla' else ''}); valid device "
                f"counts: {', '.join(map(str, divisors(d.num_heads)))}")
    if section.transform == "hadamard":
        try:
            hadamard(d.kv_lora_rank, section.seed)
        except ValueError as exc:
            return f"transform hadamard: {exc}"
    return None


def tpla(graph: fx.Graph, section: TplaSection, ctx) -> fx.Graph:
    graph = copy_graph(graph)
    cores = []
    for core in ctx.bound(graph, ("mla_attention",)):
        reason = _why_not(info(core).dims, section, ctx.world_size)
        if reason:
            ctx.decline(core, reason)
        else:
            cores.append(core)
    folds = _folds(cores, section, ctx)
    parts = block_members(graph, [info(core).fqn for core in cores])
    for core in cores:
        _expand(graph, core, parts[info(core).fqn], section, ctx.world_size, *folds[info(core).fqn])
        ctx.applied(core, f"{section.latent_groups} latent slices of {info(core).dims.kv_lora_rank // section.latent_groups}, "
                          f"{info(core).dims.num_heads // (ctx.world_size // section.latent_groups)} heads per rank, "
                          f"transform {section.transform}, prefill {section.prefill}, rmsnorm {section.rmsnorm}")
    _advise_on_sliced_norm(ctx, section, [info(c).fqn for c in cores])
    return graph


def _folds(cores: list[fx.Node], section: TplaSection, ctx) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """(U, slice scales) per layer: from the calibration profile where the section needs data."""
    needs_data = section.transform == "pca" or section.scales == "calibrated"
    fqns = [info(c).fqn for c in cores]
    latents = ctx.profiles.latents(fqns, section.calibration_tokens) if needs_data and ctx.profiles.available and fqns else {}
    out = {}
    for core in cores:
        C, fqn = info(core).dims.kv_lora_rank, info(core).fqn
        U = torch.eye(C, dtype=torch.float64)
        if section.transform == "hadamard":
            U = hadamard(C, section.seed)
            ctx.note(core, transform="hadamard")
        elif section.transform == "pca" and fqn in latents:
            U, values = pca(latents[fqn])
            shares = values.view(section.latent_groups, -1).sum(-1) / values.sum()
            ctx.note(core, transform="pca", slice_energy=[round(float(v), 6) for v in shares])
        else:
            ctx.note(core, transform=section.transform if section.transform != "pca" else "pca (identity on meta)")
        scales = None
        if section.scales == "calibrated" and fqn in latents:
            scales = slice_scales(latents[fqn], U, section.latent_groups)
            ctx.note(core, slice_scales=[round(float(v), 6) for v in scales])
        out[fqn] = (U, scales)
    return out


def _expand(graph: fx.Graph, core: fx.Node, parts: dict[str, fx.Node], section: TplaSection, world: int, U: torch.Tensor,
            scales: torch.Tensor | None) -> None:
    meta = info(core)
    d: MlaDims = meta.dims
    layout = Layout(d.num_heads, world, section.latent_groups, section.prefill == "mla")
    whole = section.prefill == "mla" or section.rmsnorm == "recompute"
    q, kv, o_proj = parts.get("q_b_proj", parts.get("q_proj")), parts["kv_a_proj_with_mqa"], parts["o_proj"]
    ranks = range(world)
    mark(q, strategy="tpla", rule=meta.rule, shard=LinearShard(
        "column", tuple(layout.head_segments(r, d.nope_dim + d.rope_dim) for r in ranks)))
    mark(kv, strategy="tpla", rule=meta.rule, shard=LatentKv(layout, U, whole))
    mark(o_proj, strategy="tpla", rule=meta.rule, shard=LinearShard("row", tuple(layout.head_segments(r, d.v_dim) for r in ranks)))
    shard = LatentCore(layout, U, scales, whole, section.rmsnorm, section.latent_groups, d.kv_lora_rank // section.latent_groups,
                       layout.decode_heads, layout.prefill_heads, section.transform)
    step_meta = meta.with_(strategy="tpla", shard=shard)
    with graph.inserting_before(core):
        lat = add_node(graph, "tpla_latent", (kv,), step_meta.with_(kind="tpla_latent"), "lat")
        args = (q, lat)
        if section.rmsnorm == "exact":
            ss = add_node(graph, "tpla_sumsq", (lat,), step_meta.with_(kind="tpla_sumsq"), "ss")
            ss = add_node(graph, "all_reduce", (ss,), step_meta.with_(
                kind="all_reduce", shard=None, dims=CommDims(1, fixed_bytes=4),
                why="exact RMSNorm: sum the slices' sums of squares"), "ss")
            args = (q, lat, ss)
        attn = add_node(graph, "tpla_attention", args, step_meta.with_(kind="tpla_attention"), "o")
    core.replace_all_uses_with(attn)
    graph.erase_node(core)
    sum_partials_after(graph, o_proj, "o_proj is row-parallel and slices are partial: sum over all ranks")


SLICED_NORM_WARN = 2.0  # a slice the sliced RMSNorm scales by more than this (or less than 1/this)


def _advise_on_sliced_norm(ctx, section: TplaSection, fqns: list[str]) -> None:
    """Where slice energies are far from even under the paper's sliced norm, what that norm does to a
    decode token's slices against the exact one: slice j is scaled by ~1 / sqrt(g * energy_j)."""
    if section.rmsnorm != "sliced" or section.scales != "none":
        return
    notes = ctx.notes.get(ctx.current, {})
    gains = {fqn: [1 / math.sqrt(len(n["slice_energy"]) * max(e, 1e-12)) for e in n["slice_energy"]]
             for fqn, n in notes.items() if "slice_energy" in n and fqn in fqns}
    off = {fqn: g for fqn, g in gains.items() if max(g) > SLICED_NORM_WARN or min(g) < 1 / SLICED_NORM_WARN}
    if not off:
        return
    worst = max(off, key=lambda fqn: max(off[fqn]))
    energy = ", ".join(f"{e:.1%}" for e in notes[worst]["slice_energy"])
    ctx.advice.append(
        f"{ctx.rule.label}: {len(off)} of {len(gains)} TPLA layers have uneven slice energies with rmsnorm: sliced; "
        f"worst {worst}: slices hold {energy} of the latent energy on the calibration split, so the sliced "
        f"RMSNorm scales a decode token's slices by {', '.join(f'{g:.2f}x' for g in off[worst])} against the "
        f"exact norm. rmsnorm: recompute normalizes exactly with no extra communication "
        f"(or scales: calibrated corrects the mean)")


def approximates(info: NodeInfo) -> str | None:
    """TPLA is exact with one latent group; with g > 1 each rank's decode attention scores its latent
    slice alone (the paper's approximation), and so may prefill and the latent RMSNorm."""
    shard = info.shard
    if not isinstance(shard, LatentCore) or shard.latent_groups == 1:
        return None
    norm = ", the latent RMSNorm over each slice" if shard.rmsnorm == "sliced" else ""
    return f"attention over {shard.latent_groups} latent slices, each rank's softmax over its slice{norm}"


STRATEGY = Strategy("tpla", "attention", "tpla", ("mla_attention",), TplaSection, tpla,
                    "MLA latent split into slices, heads split inside each group", approximates=approximates)


def cost_split(m, tp: int, groups: int):
    """This strategy in the cost model's TPLA-paper setting: g latent groups over tp ranks."""
    from planc.cost import Split
    return Split(f"tpla_g{groups}", tp, m.H // (tp // groups), m.C // groups)
