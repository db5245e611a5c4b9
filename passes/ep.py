"""`moe: {strategy: ep, placement: contiguous}` — expert parallelism with all-to-all.

    before:  r = moe(x);  s = shared experts(x) (linears);  m = add(r, s)
    after:   route = moe_route(x)              every rank routes every token (replicated gate)
             sent = moe_dispatch(x, route)     all-to-all: rank i sends its token slice's rows,
                                               once per destination rank (de-duplicated)
             local = moe_experts(sent, route)  the E/n local experts, weighted by the router
             back = moe_return(local, route)   all-to-all: partial sums go back to the sender
             mine = moe_combine(back, x, route)
             xs = moe_slice(x, route);  s = shared experts(xs);  m = add(mine, s)
             m' = all_gather_varlen(m, route)  every rank gets every token back (attention is TP)

Contiguous placement: experts e·E/n … (e+1)·E/n − 1 live on rank e. Because the routing is
computed on every rank, split sizes are known locally and need no exchange. Shared experts (and
Qwen2-MoE's sigmoid gate on them) run on the rank's token slice with the routed ones, unless a
rule split them (dense tp): then they run on every token and are added after the gather.

Runtime (called by the program): `route_tokens` builds an `EpRoute` — who sends which rows where.
Legend: N tokens this step, K top-k, E experts, El experts on this rank, R received rows, D hidden.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from planc.dims import CommDims, MoeDims, RouterDims
from planc.ir import Call, NodeInfo, Shard, Tensors, add_node, copy_graph, declare_op, divisors, info
from planc.lazy import lazy
from planc.strategy import Section, Strategy

torch = lazy("torch")
fx = lazy("torch.fx")


class EpSection(Section):
    """Routed experts split over all devices, tokens exchanged by all-to-all."""

    strategy: Literal["ep"] = Field(description="ep: experts split over devices.")
    placement: Literal["contiguous"] = Field(
        "contiguous", description="Expert-to-device map; contiguous: rank r owns the r-th block of experts.")


@dataclass(frozen=True)
class Experts(Shard):
    """The experts one rank holds: those whose owner is the rank."""

    experts_per_rank: int
    owner: tuple[int, ...] = field(repr=False)

    def slice(self, W: Tensors, info: NodeInfo, rank: int) -> Tensors:
        local = torch.tensor([e for e, r in enumerate(self.owner) if r == rank])
        out = dict(W)
        for name in ("experts.gate_up_proj", "experts.down_proj"):
            out[name] = W[name][local] if W[name].device.type != "meta" else W[name][: len(local)]
        return out


def contiguous_owner(num_experts: int, world_size: int) -> tuple[int, ...]:
    per_rank = num_experts // world_size
    return tuple(e // per_rank for e in range(num_experts))


IMPORT = ("from planc.passes import ep",)


def _route(c: Call) -> str:
    router = c.const("ROUTER", c.info.dims.router)
    owner = c.const("OWNER", c.info.shard.owner)
    return f"ep.route_tokens(ops, {c.args[0]}, W.scope({c.info.fqn + '.gate'!r}), {router}, {owner}, comm)"


declare_op("moe_route", _route, imports=IMPORT)
declare_op("moe_dispatch", lambda c: f"comm.all_to_all({c.args[1]}.dispatch_rows({c.args[0]}), "
                                     f"{c.args[1]}.send_splits, {c.args[1]}.recv_splits)", collective="all_to_all")
declare_op("moe_experts", lambda c: f"ops.moe_experts({c.args[0]}, {c.args[1]}.recv_weight_RE, "
                                    f"W.scope({c.info.fqn + '.experts'!r}), {c.info.dims.act!r})", owns_weights=True)
declare_op("moe_return", lambda c: f"comm.all_to_all({c.args[0]}, {c.args[1]}.recv_splits, {c.args[1]}.send_splits)",
           collective="all_to_all")
declare_op("moe_combine", lambda c: f"{c.args[2]}.combine({c.args[0]}, {c.args[1]})")
declare_op("moe_slice", lambda c: f"{c.args[1]}.mine_rows({c.args[0]})")
declare_op("all_gather_varlen", lambda c: f"comm.all_gather_varlen({c.args[0]}, {c.args[1]}.slice_sizes)"
                                          f".view_as({c.args[2]})", collective="all_gather_varlen")


def ep(graph: fx.Graph, section: EpSection, ctx) -> fx.Graph:
    graph = copy_graph(graph)
    n = ctx.world_size
    for core in ctx.bound(graph, ("moe",)):
        experts = info(core).dims.router.num_experts
        if experts % n:
            ctx.decline(core, f"{experts} experts do not place evenly on {n} devices; valid degrees: "
                              f"{', '.join(map(str, divisors(experts)))}")
            continue
        _expand(graph, core, Experts(experts // n, contiguous_owner(experts, n)), n)
        ctx.applied(core, f"{experts // n} of {experts} experts per rank ({section.placement})")
    return graph


def _expand(graph: fx.Graph, core: fx.Node, shard: Experts, world: int) -> None:
    meta = info(core).with_(strategy="ep")
    x = core.args[0]
    d: MoeDims = meta.dims
    def step(kind: str, args: tuple, **changes) -> fx.Node:
        return add_node(graph, kind, args, meta.with_(kind=kind, **changes))

    hidden = d.hidden
    combine_add = next((u for u in core.users if info(u).kind == "add" and info(u).block == meta.block), None)
    shared = _shared_path(combine_add, core) if combine_add is not None else []
    on_slice = bool(shared) and all(info(n).strategy in (None, "replicated") for n in shared)
    with graph.inserting_before(core):
        route = step("moe_route", (x,), shard=shard)
        sent = step("moe_dispatch", (x, route), dims=CommDims(hidden, fanout=min(d.router.top_k, world - 1)),
                    why="dispatch: send each token once to every rank owning one of its experts")
        local = step("moe_experts", (sent, route), shard=shard)
        back = step("moe_return", (local, route), dims=CommDims(hidden, fanout=min(d.router.top_k, world - 1)),
                    why="combine: partial expert sums back to the token's rank")
        mine = step("moe_combine", (back, x, route))
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
        full = step("all_gather_varlen", (last, route, x), dims=CommDims(hidden),
                    why="restore: every rank gets every token's output back")
    if on_slice:
        for user in list(combine_add.users):
            if user is not full:
                user.replace_input_with(combine_add, full)
    else:
        core.replace_all_uses_with(full)
    graph.erase_node(core)


def _shared_path(combine_add: fx.Node, core: fx.Node) -> list[fx.Node]:
    """The shared expert's nodes: what feeds the block's final add besides the routed experts,
    back to the block's input (its MLP, and Qwen2-MoE's sigmoid gate)."""
    block = info(core).block
    found, todo = [], [a for a in combine_add.args if isinstance(a, fx.Node) and a is not core]
    while todo:
        node = todo.pop()
        if node in found or "planc" not in node.meta or info(node).block != block:
            continue
        found.append(node)
        todo.extend(a for a in node.all_input_nodes)
    return found


def token_slices(num_tokens: int, world_size: int) -> list[tuple[int, int]]:
    bounds = [num_tokens * r // world_size for r in range(world_size + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass
class EpRoute:
    mine: tuple[int, int]  # this rank's token slice
    slice_sizes: list[int]
    send_rows: torch.Tensor  # token ids (global) in send order, grouped by destination rank
    send_splits: list[int]
    recv_splits: list[int]
    recv_weight_RE: torch.Tensor  # routing weight of each received row for each local expert

    def dispatch_rows(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return x_BSD.reshape(-1, x_BSD.shape[-1])[self.send_rows]

    def mine_rows(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return x_BSD.reshape(-1, x_BSD.shape[-1])[self.mine[0]:self.mine[1]]

    def combine(self, back_RD: torch.Tensor, like_BSD: torch.Tensor) -> torch.Tensor:
        """Sum the partial expert outputs returned for this rank's tokens."""
        out = like_BSD.new_zeros(self.mine[1] - self.mine[0], like_BSD.shape[-1])
        return out.index_add_(0, self.send_rows - self.mine[0], back_RD.to(out.dtype))


def route(idx_NK: torch.Tensor, w_NK: torch.Tensor, owner: list[int], rank: int, world_size: int) -> EpRoute:
    owner_E = torch.tensor(owner, device=idx_NK.device)
    dest_NK = owner_E[idx_NK]
    needs_ND = torch.zeros(idx_NK.shape[0], world_size, dtype=torch.bool, device=idx_NK.device)
    needs_ND.scatter_(1, dest_NK, True)
    slices = token_slices(idx_NK.shape[0], world_size)
    lo, hi = slices[rank]
    send = [lo + needs_ND[lo:hi, d].nonzero().flatten() for d in range(world_size)]
    recv = [s + needs_ND[s:e, rank].nonzero().flatten() for s, e in slices]
    recv_rows = torch.cat(recv)
    local_E = torch.cumsum(owner_E == rank, 0) - 1  # expert id -> column among this rank's experts
    weight_RE = torch.zeros(recv_rows.numel(), int((owner_E == rank).sum()), dtype=w_NK.dtype, device=w_NK.device)
    hit = dest_NK[recv_rows] == rank  # [R, K]: which of the row's k choices live here
    rows, ks = hit.nonzero(as_tuple=True)
    weight_RE[rows, local_E[idx_NK[recv_rows][rows, ks]]] = w_NK[recv_rows][rows, ks]
    return EpRoute((lo, hi), [e - s for s, e in slices], torch.cat(send),
                   [t.numel() for t in send], [t.numel() for t in recv], weight_RE)


def route_tokens(ops, x_BSD: torch.Tensor, gate: dict, dims: RouterDims, owner: list[int], comm) -> EpRoute:
    idx_NK, w_NK = ops.moe_route(x_BSD.reshape(-1, x_BSD.shape[-1]), gate, dims)
    return route(idx_NK, w_NK, owner, comm.rank, comm.world_size)


STRATEGY = Strategy("ep", "moe", "ep", ("moe",), EpSection, ep, "routed experts split, tokens by all-to-all")
