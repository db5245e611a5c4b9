"""`moe: {strategy: ep, placement: contiguous | eplb | semantic, token_shuffle: bool}` — expert
parallelism with all-to-all, experts placed from a routing profile, tokens moved to their experts.

    before:  r = moe(x);  s = shared experts(x) (linears);  m = add(r, s)
    after:   route = moe_route(x)              every rank routes every token (replicated gate)
             rows = moe_dispatch(x, route)     all-to-all: rank i sends its token slice's rows once
                                               to every other rank owning one of their experts;
                                               rows served here skip it
             y = moe_experts(rows, route)      the E/n local experts, weighted by the router
             back = moe_return(y, route)       all-to-all: partial sums go back to the sender
             mine = moe_combine(back, y, route)
             xs = moe_slice(x, route);  s = shared experts(xs);  m = add(mine, s)
             m' = all_gather_varlen(m, route)  every rank gets every token back (attention is TP)

Placement (planc.placement) is the expert -> rank owner map: rank r holds the experts whose owner
is r (the weights it receives) and serves their rows; routing is unchanged. `eplb` and `semantic`
read a routing profile of `profile.tokens` calibration tokens (planc.calibrate), or the one stored
in `profile.artifact`'s report.json.

token_shuffle (planc.shuffle) moves each token, before routing, to the rank predicted to hold its
experts; the all-reduce of the attention output feeding the block becomes a reduce-scatter onto
those groups, and the layer's output is gathered back:

    before:  a' = all_reduce(a);  h1 = add(h, a');  x = rmsnorm(h1);  ...block...;  h2 = add(h1, m')
    after:   plan = moe_shuffle(ids, prev_route)     same permutation on every rank: equal groups
             a' = shuffle_reduce_scatter(a, plan)     this rank's group of rows, fully summed
             h1 = add(shuffle_take(h, plan), a');  x = rmsnorm(h1)
             choice = moe_route_rows(x);  all = route_all_gather(choice, plan)   router on exact values
             route = moe_route_groups(all, plan);  rows / y / back / mine as above;  s = shared experts(x)
             h2 = shuffle_all_gather(add(h1, add(mine, s)), plan, h)    back in token order everywhere

Legend: N tokens this step, K top-k, E experts, El experts on this rank, R rows this rank's experts
compute, D hidden, n ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from planc.dims import CommDims, ExpertsLayout, MoeDims, RouterDims
from planc.ir import Call, NodeInfo, Shard, Tensors, add_node, copy_graph, declare_op, divisors, info
from planc.lazy import lazy
from planc.semantic import MOE_KERNELS
from planc.strategy import Frozen, Section, Strategy

torch = lazy("torch")
fx = lazy("torch.fx")
placement = lazy("planc.placement")  # networkx and torch: loaded when a pass runs, not to read a plan
shuffle = lazy("planc.shuffle")
calibrate = lazy("planc.calibrate")

ROUTE_KINDS = ("moe_route", "moe_route_groups")
STEP_WINDOWS = 4  # semantic + token_shuffle judges placements on steps of this many calibration windows


class Profile(Frozen):
    tokens: int = Field(4096, ge=256, strict=True, description="Calibration tokens the routing profile runs over.")
    artifact: str | None = Field(
        None, description="An artifact directory whose report.json holds the profile (re-plan without re-profiling).")


class EpSection(Section):
    """Routed experts split over all devices, tokens exchanged by all-to-all."""

    strategy: Literal["ep"] = Field(description="ep: experts split over devices.")
    placement: Literal["contiguous", "eplb", "semantic"] = Field(
        "contiguous", description="Expert-to-device map. contiguous: rank r owns the r-th block of experts; "
        "eplb: greedy load balancing; semantic: experts co-activated by the same tokens together.")
    token_shuffle: bool = Field(
        False, strict=True, description="Move each token, before routing, to the device predicted to hold its "
        "experts (the all-reduce feeding the block becomes a reduce-scatter).")
    profile: Profile = Field(default_factory=Profile, description="The routing profile eplb, semantic and "
                             "token_shuffle read.")


@dataclass(frozen=True)
class Experts(Shard):
    """The experts one rank holds (those whose owner is the rank) and, under token_shuffle, the
    predictor's tables every rank holds (`shuffle.prior`, `shuffle.ngram1.keys`, ...)."""

    experts_per_rank: int
    owner: tuple[int, ...] = field(repr=False)
    tables: tuple[tuple[str, torch.Tensor], ...] = field(default=(), repr=False, compare=False)

    def slice(self, W: Tensors, info: NodeInfo, rank: int) -> Tensors:
        out = dict(W)
        for name in W:
            if name.startswith("experts."):  # every experts tensor is [E, ...] (weights, and biases where they have them)
                out[name] = self._local(W[name], rank)
        return out | {f"shuffle.{name}": t.clone() for name, t in self.tables}

    def _local(self, experts: torch.Tensor, rank: int) -> torch.Tensor:
        """The rank's rows of an [E, ...] experts tensor (on meta only their number matters)."""
        if experts.device.type == "meta":
            return experts[: self.owner.count(rank)]
        return experts[torch.tensor([e for e, r in enumerate(self.owner) if r == rank])]


IMPORT = ("from planc.passes import ep",)


def _route(c: Call) -> str:
    router = c.const("ROUTER", c.info.dims.router)
    owner = c.const("OWNER", c.info.shard.owner)
    return f"ep.route_tokens(ops, {c.args[0]}, {_gate(c)}, {router}, {owner}, comm)"


def _gate(c: Call) -> str:
    """The router's weights (RouterDims.module: `gate`, or GraniteMoE's and gpt-oss's `router`)."""
    return f"W.scope({c.name('.' + c.info.dims.router.module)})"


def _experts(c: Call) -> str:
    layout = c.info.dims.layout
    extra = "" if layout == ExpertsLayout() else f", {c.const('LAYOUT', layout)}"
    return (f"ops.moe_experts({c.args[0]}, {c.args[1]}.weight_RE, W.scope({c.name('.experts')}), "
            f"{c.info.dims.act!r}{extra})")


def _shuffle(c: Call) -> str:
    return f"ep.shuffle_plan({c.args[0]}, W.scope({c.name('.shuffle')}), {c.args[1]}, comm)"


def _route_groups(c: Call) -> str:
    router = c.const("ROUTER", c.info.dims.router)
    owner = c.const("OWNER", c.info.shard.owner)
    return f"ep.route_groups({c.args[0]}, {c.args[2]}, {router}, {owner}, {c.args[1]})"


declare_op("moe_route", _route, imports=IMPORT)
declare_op("moe_dispatch", lambda c: f"ep.dispatch(comm, {c.args[0]}, {c.args[1]})", collective="all_to_all")
declare_op("moe_experts", _experts, owns_weights=True,
           kernels=MOE_KERNELS)
declare_op("moe_return", lambda c: f"ep.give_back(comm, {c.args[0]}, {c.args[1]})", collective="all_to_all")
declare_op("moe_combine", lambda c: f"{c.args[2]}.combine({c.args[0]}, {c.args[1]})")
declare_op("moe_slice", lambda c: f"{c.args[1]}.mine_rows({c.args[0]})")
declare_op("all_gather_varlen", lambda c: f"comm.all_gather_varlen({c.args[0]}, {c.args[1]}.slice_sizes)"
                                          f".view_as({c.args[2]})", collective="all_gather_varlen")
declare_op("moe_shuffle", _shuffle, imports=IMPORT)
declare_op("shuffle_reduce_scatter", lambda c: f"comm.reduce_scatter_varlen({c.args[1]}.permute(ops, {c.args[0]}), "
                                               f"{c.args[1]}.sizes)", collective="reduce_scatter",
           kernels=("permute.py",))
declare_op("shuffle_take", lambda c: f"{c.args[1]}.take({c.args[0]})")
declare_op("moe_route_rows", lambda c: f"ep.route_rows(ops, {c.args[0]}, {_gate(c)}, "
                                       f"{c.const('ROUTER', c.info.dims.router)})", imports=IMPORT)
declare_op("route_all_gather", lambda c: f"comm.all_gather_varlen({c.args[0]}, {c.args[1]}.sizes)",
           collective="all_gather_varlen")
declare_op("moe_route_groups", _route_groups, imports=IMPORT)
declare_op("shuffle_all_gather", lambda c: f"{c.args[1]}.unpermute(ops, comm.all_gather_varlen({c.args[0]}, "
                                           f"{c.args[1]}.sizes), {c.args[2]})", collective="all_gather_varlen",
           kernels=("permute.py",))


# -- the pass --------------------------------------------------------------------------------------


def ep(graph: fx.Graph, section: EpSection, ctx) -> fx.Graph:
    graph = copy_graph(graph)
    n = ctx.world_size
    cores = [core for core in ctx.bound(graph, ("moe",)) if _places_evenly(core, n, ctx)]
    profile = _profile(graph, cores, section, ctx)
    for core in cores:
        fqn, router = info(core).fqn, info(core).dims.router
        feed = _shuffle_feed(core, section, fqn in profile, ctx)
        prev = None if feed is None else _previous_route(graph, core)
        prev_best = _previous_best(profile, prev)
        owner, how = _placement(section.placement, profile.get(fqn), router.num_experts, n,
                                shuffled=feed is not None, prev_best=prev_best)
        shard, predictor = Experts(router.num_experts // n, owner), None
        if feed is None:
            _expand(graph, core, shard, n)
        else:
            predictor, precision = shuffle.predictor(*profile[fqn], owner, prev_best, calibrate.WINDOW)
            shard = Experts(shard.experts_per_rank, owner, tuple(predictor.tables().items()))
            _expand_shuffled(graph, core, shard, feed, prev)
            how += f"; tokens shuffled (predictor precision {precision:.2f} on held-back calibration text)"
            ctx.note(core, predictor_precision=precision)
        if fqn in profile:
            _note_placement(ctx, core, profile[fqn], owner, predictor)
        ctx.applied(core, f"{shard.experts_per_rank} of {router.num_experts} experts per rank ({how})")
    return graph


def _shuffle_feed(core: fx.Node, section: EpSection, profiled: bool, ctx) -> Feed | None:
    """The layer token shuffling rewrites around `core`, or None: not asked for, or declined."""
    if not section.token_shuffle:
        return None
    feed = _feed(core) if profiled else ("it needs a routing profile: there is none on the meta device; set "
                                         "moe.profile.artifact to an artifact compiled with weights")
    if isinstance(feed, str):
        ctx.decline(core, f"token_shuffle: {feed}")
        return None
    return feed


def _places_evenly(core: fx.Node, world: int, ctx) -> bool:
    experts = info(core).dims.router.num_experts
    if experts % world:
        ctx.decline(core, f"{experts} experts do not place evenly on {world} devices; valid degrees: "
                          f"{', '.join(map(str, divisors(experts)))}")
    return not experts % world


def _profile(graph: fx.Graph, cores: list[fx.Node], section: EpSection, ctx) -> dict:
    """{fqn: (ids, experts)} for the blocks (and the MoE blocks before them, for the 2-gram) when
    the section needs a profile and one can be had; {} otherwise."""
    needed = section.placement != "contiguous" or section.token_shuffle
    if not cores or not needed:
        return {}
    if not ctx.profiles.available and section.profile.artifact is None:
        ctx.advice.append(f"{ctx.where('moe')}: no routing profile on the meta device: experts placed "
                          f"contiguously{', tokens not shuffled' if section.token_shuffle else ''}; set "
                          f"moe.profile.artifact to re-plan from a compiled artifact's profile")
        return {}
    blocks = {info(n).fqn: info(n).dims.router for n in graph.nodes
              if "planc" in n.meta and info(n).kind in ("moe", *ROUTE_KINDS)}
    return ctx.profiles.routing(list(blocks), section.profile.tokens, blocks, section.profile.artifact)


def _placement(how: str, profile, num_experts: int, world: int, shuffled: bool = False,
               prev_best: torch.Tensor | None = None) -> tuple[tuple[int, ...], str]:
    """The owner map, and how it was found. semantic under token_shuffle: of its refined starts and
    contiguous, the one whose shuffled tokens need the fewest all-to-all rows on held-back
    calibration text (tables from the profile's first half, rows on its second, in steps of
    STEP_WINDOWS calibration windows), plus the expert-load term of placement's objective."""
    if how == "contiguous" or profile is None:
        fallback = "" if how == "contiguous" else f", {how} needs a routing profile"
        return placement.contiguous(num_experts, world), f"contiguous{fallback}"
    counts = placement.counts(*profile, int(profile[0].max()) + 1, num_experts)
    if how == "eplb":
        owner = placement.eplb(counts.sum(0), world)
        return owner, "eplb"
    owner, found = placement.semantic(counts, world)
    if not shuffled:
        return owner, f"semantic, from the {found['start'].replace('_', '-')} start"
    candidates = {f"from the {start.replace('_', '-')} start": o for start, o in found["placements"].items()}
    candidates["contiguous, unrefined"] = placement.contiguous(num_experts, world)
    rows = {name: shuffle.held_back_rows(*profile, o, prev_best, calibrate.WINDOW, STEP_WINDOWS)
            for name, o in candidates.items()}
    cost = {name: rows[name] + placement.BALANCE * (placement.score(counts, o).expert_imbalance - 1)
            for name, o in candidates.items()}
    winner = min(cost, key=lambda name: (cost[name], name))
    return candidates[winner], (f"semantic, {winner}: {rows[winner]:.3f} all-to-all rows per token on held-back "
                                f"calibration text")


def _previous_best(profile: dict, prev: fx.Node | None) -> torch.Tensor | None:
    """[T] each calibration token's best rank in the MoE layer before (the 2-gram's context)."""
    if prev is None or info(prev).fqn not in profile:
        return None
    return shuffle.best_rank(profile[info(prev).fqn][1], info(prev).shard.owner)


def _note_placement(ctx, core: fx.Node, profile, owner, predictor: shuffle.Predictor | None) -> None:
    """What the placement promises on the calibration text, and its expert x rank heatmap."""
    ids, experts = profile
    counts = placement.counts(ids, experts, int(ids.max()) + 1, len(owner))
    home = None if predictor is None else predictor.token_scores(counts.shape[0])
    load_En = placement.expected_load(counts, max(owner) + 1, home)
    local = float(sum(load_En[e, r] for e, r in enumerate(owner)))
    per_rank = [float(load_En[[e for e, o in enumerate(owner) if o == r]].sum()) for r in range(max(owner) + 1)]
    ctx.note(core, placement=" ".join("/".join(str(e) for e, o in enumerate(owner) if o == r)
                                      for r in range(max(owner) + 1)),
             expected_local_rate=local, expected_load_imbalance=max(per_rank) * len(per_rank) / sum(per_rank),
             co_located_pairs=placement.co_located(experts, owner),
             heatmap={"owner": list(owner), "load": load_En.tolist(), "shuffled": predictor is not None})


# -- rewriting -------------------------------------------------------------------------------------


def _step(graph: fx.Graph, meta: NodeInfo):
    def step(kind: str, args: tuple, **changes) -> fx.Node:
        return add_node(graph, kind, args, meta.with_(kind=kind, **changes))
    return step


def _expand(graph: fx.Graph, core: fx.Node, shard: Experts, world: int) -> None:
    meta = info(core).with_(strategy="ep")
    x = core.args[0]
    d: MoeDims = meta.dims
    step = _step(graph, meta)
    combine_add, shared = _shared(core)
    on_slice = bool(shared) and all(info(n).strategy in (None, "replicated") for n in shared)
    with graph.inserting_before(core):
        route = step("moe_route", (x,), shard=shard)
        rows, y, back, mine = _exchange(step, x, route, d, world, shard)
    last = mine
    if on_slice:
        with graph.inserting_before(core):
            xs = step("moe_slice", (x, route))
        for node in shared:
            if x in node.args:
                node.replace_input_with(x, xs)
        combine_add.replace_input_with(core, mine)
        last = combine_add
    with graph.inserting_after(last):
        full = step("all_gather_varlen", (last, route, x), dims=CommDims(d.hidden),
                    why="restore: every rank gets every token's output back")
    if on_slice:
        for user in list(combine_add.users):
            if user is not full:
                user.replace_input_with(combine_add, full)
    else:
        core.replace_all_uses_with(full)
    graph.erase_node(core)


def _exchange(step, x: fx.Node, route: fx.Node, d: MoeDims, world: int, shard: Experts) -> tuple[fx.Node, ...]:
    fanout = min(d.router.top_k, world - 1)
    rows = step("moe_dispatch", (x, route), dims=CommDims(d.hidden, fanout=fanout),
                why="dispatch: send each token once to every other rank owning one of its experts")
    y = step("moe_experts", (rows, route), shard=shard)
    back = step("moe_return", (y, route), dims=CommDims(d.hidden, fanout=fanout),
                why="combine: partial expert sums back to the token's rank")
    return rows, y, back, step("moe_combine", (back, y, route))


def _shared(core: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
    """The block's final add (routed + shared) and the shared expert's nodes: what feeds that add
    besides the routed experts, back to the block's input (its MLP, and Qwen2-MoE's sigmoid gate)."""
    block = info(core).block
    combine_add = next((u for u in core.users if info(u).kind == "add" and info(u).block == block), None)
    if combine_add is None:
        return None, []
    found, todo = [], [a for a in combine_add.args if isinstance(a, fx.Node) and a is not core]
    while todo:
        node = todo.pop()
        if node in found or "planc" not in node.meta or info(node).block != block:
            continue
        found.append(node)
        todo.extend(a for a in node.all_input_nodes)
    return combine_add, found


@dataclass(frozen=True)
class Feed:
    """The nodes around an MoE block that token shuffling rewrites."""

    summed: fx.Node  # all_reduce of the attention output
    residual: fx.Node  # the residual stream entering the layer (every rank holds it whole)
    stream: fx.Node  # add(residual, summed)
    out: fx.Node  # add(stream, block output): the layer's output


def _feed(core: fx.Node) -> Feed | str:
    """The layer around the block, or why token shuffling cannot rewrite it."""
    x = core.args[0]
    stream = x.args[0] if "planc" in x.meta and info(x).kind == "rmsnorm" else None
    if stream is None or info(stream).kind != "add":
        return "the block's input is not a norm of the residual stream"
    summed = [a for a in stream.args if isinstance(a, fx.Node) and info(a).kind == "all_reduce"]
    if len(summed) != 1 or len(summed[0].users) != 1:
        return ("no all-reduce feeds the block (the attention before it is not split over the devices), so there "
                "is no reduce-scatter to shuffle tokens with")
    combine_add, shared = _shared(core)
    if any(info(n).strategy not in (None, "replicated") for n in shared):
        return "the shared expert is split by another rule; it must run on the rank's own tokens"
    out = [u for u in stream.users if u is not x]
    block_out = combine_add if combine_add is not None else core
    if len(out) != 1 or info(out[0]).kind != "add" or block_out not in out[0].args:
        return "the residual stream is used by more than the layer's output add"
    if any(u is not core and u not in shared for u in x.users):
        return "the block's input feeds nodes outside the block"
    residual = next(a for a in stream.args if a is not summed[0])
    return Feed(summed[0], residual, stream, out[0])


def _previous_route(graph: fx.Graph, core: fx.Node) -> fx.Node | None:
    """The last MoE block's routing before `core` (the 2-gram predicts from it)."""
    found = None
    for node in graph.nodes:
        if node is core:
            return found
        if "planc" in node.meta and info(node).kind in ROUTE_KINDS:
            found = node
    return found


def _expand_shuffled(graph: fx.Graph, core: fx.Node, shard: Experts, feed: Feed, prev: fx.Node | None) -> None:
    meta = info(core).with_(strategy="ep")
    d: MoeDims = meta.dims
    step = _step(graph, meta)
    x = core.args[0]
    ids = next(n for n in graph.nodes if n.op == "placeholder")
    world = len(set(shard.owner))
    with graph.inserting_before(feed.summed):
        plan = step("moe_shuffle", (ids, prev), shard=shard,
                    why="predict each token's rank; equal groups, the same permutation on every rank")
        mine = step("shuffle_reduce_scatter", (feed.summed.args[0], plan), dims=CommDims(d.hidden),
                    why="sum the attention output, each rank keeping the rows of its group")
        h = step("shuffle_take", (feed.residual, plan))
    feed.stream.replace_input_with(feed.summed, mine)
    feed.stream.replace_input_with(feed.residual, h)
    graph.erase_node(feed.summed)
    with graph.inserting_before(core):
        choice = step("moe_route_rows", (x,))
        everyone = step("route_all_gather", (choice, plan), dims=CommDims(0, fixed_bytes=2 * d.router.top_k * 8),
                        why="every token's experts and weights, on every rank")
        route = step("moe_route_groups", (everyone, plan, x), shard=shard)
        *_, out = _exchange(step, x, route, d, world, shard)
    core.replace_all_uses_with(out)
    graph.erase_node(core)
    users = list(feed.out.users)
    with graph.inserting_after(feed.out):
        full = step("shuffle_all_gather", (feed.out, plan, feed.residual), dims=CommDims(d.hidden),
                    why="every rank gets every token's layer output, in token order")
    for user in users:
        user.replace_input_with(feed.out, full)


# -- run time (called by the program) --------------------------------------------------------------


@dataclass
class EpRoute:
    """Who sends which rows where, for one step of one MoE block. Rows are numbered in the step's
    order (token order, or the shuffle's group order); rank r owns rows slice_sizes[:r] .. + slice_sizes[r]."""

    mine: tuple[int, int]  # this rank's rows
    base: int  # the row number of the first row of the `x` this rank holds (0: it holds every row)
    slice_sizes: list[int]
    local_rows: torch.Tensor  # rows of mine that this rank's experts serve
    send_rows: torch.Tensor  # rows of mine other ranks' experts serve, grouped by destination rank
    send_splits: list[int]  # (0 for this rank: local rows never enter the all-to-all)
    recv_splits: list[int]
    weight_RE: torch.Tensor  # routing weight of each computed row [local rows; received rows] per local expert
    dest_NK: torch.Tensor  # rank of each row's experts
    order: torch.Tensor | None = None  # token index of each row (None: rows are in token order)

    def dispatch_rows(self, x_ND: torch.Tensor) -> torch.Tensor:
        return x_ND.reshape(-1, x_ND.shape[-1])[self.send_rows - self.base]

    def expert_rows(self, x_ND: torch.Tensor, received_RD: torch.Tensor) -> torch.Tensor:
        return torch.cat([x_ND.reshape(-1, x_ND.shape[-1])[self.local_rows - self.base], received_RD])

    def mine_rows(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return x_BSD.reshape(-1, x_BSD.shape[-1])[self.mine[0] - self.base:self.mine[1] - self.base]

    def combine(self, back_RD: torch.Tensor, y_RD: torch.Tensor) -> torch.Tensor:
        """Sum the partial expert outputs of this rank's rows: its own experts' first, then those
        returned by the other ranks."""
        lo, hi = self.mine
        out = y_RD.new_zeros(hi - lo, y_RD.shape[-1])
        out.index_add_(0, self.local_rows - lo, y_RD[: self.local_rows.numel()])
        return out.index_add_(0, self.send_rows - lo, back_RD.to(out.dtype))

    def best_rank(self) -> torch.Tensor:
        """[N] per token (token order) the rank holding most of its experts (the lowest on ties)."""
        best = shuffle.held(self.dest_NK, len(self.slice_sizes)).argmax(1)
        if self.order is None:
            return best
        return torch.empty_like(best).index_copy_(0, self.order, best)


def route(idx_NK: torch.Tensor, w_NK: torch.Tensor, owner: list[int], rank: int, sizes: list[int],
          base: int = 0, order: torch.Tensor | None = None) -> EpRoute:
    """The route of rows whose experts are idx_NK (weights w_NK), rank r owning sizes[r] of them."""
    world = len(sizes)
    owner_E = torch.tensor(owner, device=idx_NK.device)
    dest_NK = owner_E[idx_NK]
    needs_Nn = torch.zeros(idx_NK.shape[0], world, dtype=torch.bool, device=idx_NK.device)
    needs_Nn.scatter_(1, dest_NK, True)
    bounds = [sum(sizes[:r]) for r in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    none = torch.zeros(0, dtype=torch.long, device=idx_NK.device)
    send = [lo + needs_Nn[lo:hi, d].nonzero().flatten() if d != rank else none for d in range(world)]
    recv = [bounds[s] + needs_Nn[bounds[s]:bounds[s + 1], rank].nonzero().flatten() if s != rank else none
            for s in range(world)]
    local = lo + needs_Nn[lo:hi, rank].nonzero().flatten()
    rows = torch.cat([local, *recv])
    local_E = torch.cumsum(owner_E == rank, 0) - 1  # expert id -> column among this rank's experts
    weight_RE = torch.zeros(rows.numel(), int((owner_E == rank).sum()), dtype=w_NK.dtype, device=w_NK.device)
    hit = dest_NK[rows] == rank  # [R, K]: which of the row's k choices live here
    r, k = hit.nonzero(as_tuple=True)
    weight_RE[r, local_E[idx_NK[rows][r, k]]] = w_NK[rows][r, k]
    return EpRoute((lo, hi), base, list(sizes), local, torch.cat(send), [t.numel() for t in send],
                   [t.numel() for t in recv], weight_RE, dest_NK, order)


def token_slices(num_tokens: int, world_size: int) -> list[int]:
    """Tokens per rank when every rank holds every token and serves a contiguous slice of them."""
    return [num_tokens * (r + 1) // world_size - num_tokens * r // world_size for r in range(world_size)]


def route_tokens(ops, x_BSD: torch.Tensor, gate: dict, dims: RouterDims, owner: list[int], comm) -> EpRoute:
    idx_NK, w_NK = ops.moe_route(x_BSD.reshape(-1, x_BSD.shape[-1]), gate, dims)
    return route(idx_NK, w_NK, owner, comm.rank, token_slices(idx_NK.shape[0], comm.world_size))


def route_rows(ops, x_ND: torch.Tensor, gate: dict, dims: RouterDims) -> torch.Tensor:
    """This rank's rows' routing, packed for the all-gather: [n_r, 2K] float64 (expert ids, then
    weights; both exact in float64)."""
    idx_NK, w_NK = ops.moe_route(x_ND.reshape(-1, x_ND.shape[-1]), gate, dims)
    return torch.cat([idx_NK.double(), w_NK.double()], 1)


def route_groups(packed_N2K: torch.Tensor, x_ND: torch.Tensor, dims: RouterDims, owner: list[int],
                 plan: shuffle.ShufflePlan) -> EpRoute:
    """The route of every token from the gathered routing (rows in the shuffle's group order);
    the weights come back in the dtype the router gave them (x's when it rounds them to it)."""
    k = dims.top_k
    w = packed_N2K[:, k:].to(x_ND.dtype if dims.weights_in_model_dtype else torch.float32)
    return route(packed_N2K[:, :k].long(), w, owner, plan.rank, plan.sizes, plan.mine[0], plan.perm)


def dispatch(comm, x_ND: torch.Tensor, r: EpRoute) -> torch.Tensor:
    """The rows this rank's experts compute: its own rows they serve, then those received."""
    return r.expert_rows(x_ND, comm.all_to_all(r.dispatch_rows(x_ND), r.send_splits, r.recv_splits))


def give_back(comm, y_RD: torch.Tensor, r: EpRoute) -> torch.Tensor:
    """Partial sums of the received rows, back to their senders."""
    return comm.all_to_all(y_RD[r.local_rows.numel():], r.recv_splits, r.send_splits)


def shuffle_plan(ids_BS: torch.Tensor, W: dict, prev: EpRoute | None, comm) -> shuffle.ShufflePlan:
    return shuffle.plan_tokens(ids_BS, W, None if prev is None else prev.best_rank(),
                               comm.world_size, comm.rank)


STRATEGY = Strategy("ep", "moe", "ep", ("moe",), EpSection, ep, "routed experts split, tokens by all-to-all")
