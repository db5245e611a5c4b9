"""Semantic ops: one pure-PyTorch reference per node kind of the semantic graph, and per block.

Node-level ops (linear, rmsnorm, mla_core, gqa_core, gated_act, moe_routed) are what a generated
program calls; block-level ops (mla_attention, gqa_attention, mlp, moe) compose them into a whole
recognized block, which is what the lift check compares with the captured graph. The same
functions run a block on one device (full weights) and on one rank (that rank's shard
of the weights: fewer heads, fewer experts, a slice of the intermediate dim). Partial outputs of
row-parallel blocks are summed by an explicit collective in the generated program, never here.

`Ops` holds the primitives (linear, rmsnorm, decode attention) that a kernel backend replaces;
composite ops call them through `self`, so `--kernels triton` swaps every GEMM at once.

Legend: B batch, S query tokens this step, T cache capacity, L = start + S keys in use,
D hidden, H local heads, C latent (kv_lora_rank), R rope dim, P nope dim, V value dim,
Dh head dim, K top-k, E experts (local or global as named), N tokens (B*S).
"""
from __future__ import annotations

from dataclasses import dataclass


from planc.dims import ExpertsLayout, GqaDims, MlaDims, MoeDims, RouterDims
from planc.lazy import lazy
from planc.weights import scoped

torch = lazy("torch")
F = lazy("torch.nn.functional")


Weights = dict[str, "torch.Tensor"]


@dataclass
class Step:
    """Where this forward step sits in the sequence.

    start: first cache slot written this step (prefill 0; decode = tokens already cached);
    pos_BS: rope positions (left padding makes them differ per row);
    key_mask_BT: slots holding a real token, including the ones written this step.
    """

    start: int
    pos_BS: torch.Tensor
    key_mask_BT: torch.Tensor


@dataclass
class MlaCache:
    ckv_BTC: torch.Tensor  # normalized latent; also the value
    kpe_BTR: torch.Tensor  # rotated rope key, shared by all heads


@dataclass
class GqaCache:
    k_BTHD: torch.Tensor
    v_BTHD: torch.Tensor


def rope_inv_freq(W, pos_BS: torch.Tensor) -> torch.Tensor:
    """This step's rotary frequencies: a long-context rope (Phi-3's longrope) turns by its long set
    for the whole step once a position reaches its original context, as transformers decides per
    forward (the runtime re-reads the cached tokens at that step, as transformers does:
    planc.runtime.model.Model.extend)."""
    long = W.get("rotary.long_inv_freq")
    if long is None:
        return W["rotary.inv_freq"]
    return torch.where(pos_BS.max() >= W["rotary.long_after"], long, W["rotary.inv_freq"])


def rope_cos_sin(pos_BS: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
    freqs = pos_BS[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [B, S, H, R]; cos/sin [B, S, R]. Interleaved pairs come out de-interleaved (DeepSeek)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if not interleave:
        return x * cos + rotate_half(x) * sin
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int | None,
                 interleave: bool = False) -> torch.Tensor:
    """apply_rope on the first rope_dim of each head; the rest passes through. Interleaved pairs
    come out de-interleaved: the same permutation of q's and k's dims leaves every q·k unchanged."""
    if rope_dim is None or rope_dim == x.shape[-1]:
        return apply_rope(x, cos, sin, interleave)
    if rope_dim == 0:  # a NoPE layer
        return x
    return torch.cat([apply_rope(x[..., :rope_dim], cos, sin, interleave), x[..., rope_dim:]], dim=-1)


def attention_mask(step: Step, num_queries: int, window: int | None = None, chunk: int | None = None) -> torch.Tensor:
    """[B, 1, S, L] bool: a query at slot start+i sees filled slots <= start+i (and, with a sliding
    `window`, only slots > start+i-window: transformers' window, counted in cache slots; with a
    `chunk`, only the slots of its own chunk of that many, as Llama 4's chunked attention)."""
    length = step.start + num_queries
    q_slot = torch.arange(step.start, length, device=step.key_mask_BT.device)
    k_slot = torch.arange(length, device=step.key_mask_BT.device)
    causal = k_slot[None, :] <= q_slot[:, None]
    if window is not None:
        causal &= k_slot[None, :] > q_slot[:, None] - window
    causal = causal[None] & step.key_mask_BT[:, None, :length]
    if chunk is not None:
        causal &= same_chunk(step, q_slot, k_slot, chunk)
    return causal[:, None]


def same_chunk(step: Step, q_slot: torch.Tensor, k_slot: torch.Tensor, chunk: int) -> torch.Tensor:
    """[B, S, L] whether each key sits in its query's chunk, chunks counted in positions (a row's
    left padding shifts them, as transformers' chunked mask does)."""
    off_B = (q_slot[-1] - step.pos_BS[:, -1])[:, None]  # slot - position, from the last query (a real token)
    return (k_slot[None, None, :] - off_B[:, :, None]) // chunk == ((q_slot[None, :] - off_B) // chunk)[:, :, None]


def decode_key_mask(step: Step, window: int | None = None, chunk: int | None = None) -> torch.Tensor:
    """[B, start+1] the keys a one-token step's query sees (its own slot included)."""
    end = step.start + 1
    mask = step.key_mask_BT[:, :end]
    if chunk is not None:
        slots = torch.arange(end, device=mask.device)
        mask = mask & same_chunk(step, slots[-1:], slots, chunk)[:, 0]
    if window is None or window >= end:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], end - window), mask[:, end - window:]], dim=1)


def unit_rmsnorm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, in fp32, cast back: an RMSNorm without a weight."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def temperature_scales(pos_BS: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """[B, S] Llama 4's query scale on its NoPE layers: log1p(floor((pos + 1) / floor_scale)) · attn_scale + 1."""
    return torch.log1p(torch.floor((pos_BS.float() + 1.0) / floor_scale)) * attn_scale + 1.0


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor | None = None) -> torch.Tensor:
    """softmax over the last dim where `mask`; `sink` (broadcast to logits[..., :1]) is one more
    logit in each row's normalizer whose probability is dropped (gpt-oss's attention sinks)."""
    logits = acc(logits).masked_fill(~mask, float("-inf"))
    if sink is not None:
        combined = torch.cat([logits, acc(sink).expand(*logits.shape[:-1], 1)], dim=-1)
        return torch.softmax(combined, dim=-1)[..., :-1]
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # fully masked rows (padding queries) give zeros


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap · tanh(x / cap), in transformers' order (Gemma 2's attention scores and final logits)."""
    return torch.tanh(x / cap) * cap


def capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else softcap(logits, cap)


def acc(x: torch.Tensor) -> torch.Tensor:
    """Norm statistics in at least fp32 (fp64 stays fp64, so fp64 checks can be exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "relu2":  # ReLU squared (Arcee, Nemotron)
        return F.relu(x).square()
    if name == "relu":
        return F.relu(x)
    if name in ("gelu", "gelu_pytorch_tanh"):
        return F.gelu(x, approximate="tanh" if name.endswith("tanh") else "none")
    raise ValueError(f"unsupported activation {name!r}")


def glu(gate: torch.Tensor, up: torch.Tensor, act_name: str, limit: float | None = None, alpha: float = 1.0
        ) -> torch.Tensor:
    """act(gate) · up; with a limit, the clamped GLU (up + 1) · g · σ(α g) of the clamped halves
    (gpt-oss's experts, MiniMax-M3's experts and MLPs)."""
    if limit is None:
        return act(act_name, gate) * up
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def expert_glu(gate_up: torch.Tensor, act_name: str, layout: ExpertsLayout) -> torch.Tensor:
    """The experts' gated activation of their gate_up output [M, 2I] -> [M, I]."""
    if layout.interleaved:
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    else:
        gate, up = gate_up.chunk(2, dim=-1)
    return glu(gate, up, act_name, layout.limit, layout.alpha)


def _gnk(w: torch.Tensor, layout: ExpertsLayout) -> torch.Tensor:
    """Experts' weights as [E, out, in] (a view of a transposed layout's [E, in, out])."""
    return w.transpose(1, 2) if layout.transposed else w


class Ops:
    """Reference backend: every primitive is plain PyTorch."""

    name = "torch"

    # -- primitives a kernel backend may replace -------------------------------------------------
    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, w, b)

    def rmsnorm(self, x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
        """x̂ · w (Llama: x̂ cast back first); with an offset, x̂ · (offset + w) in fp32, then cast (Gemma)."""
        h = acc(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        if offset:
            return (h * (offset + acc(w))).to(x.dtype)
        return w * h.to(x.dtype)

    def sumsq(self, x: torch.Tensor) -> torch.Tensor:
        """Σ x² over the last dim, in at least fp32: one rank's share of a split RMSNorm's statistic."""
        return acc(x).pow(2).sum(-1, keepdim=True)

    def rmsnorm_sumsq(self, x: torch.Tensor, sumsq: torch.Tensor, w: torch.Tensor, eps: float, count: int) -> torch.Tensor:
        """RMSNorm of a column slice `x`, given Σ x² over all `count` elements of the whole row."""
        h = acc(x) * torch.rsqrt(sumsq / count + eps)
        return w * h.to(x.dtype)

    def mla_decode(self, q_lat_BHC, q_pe_BHR, ckv_BTC, kpe_BTR, key_mask_BT, scale: float):
        logits = torch.einsum("bhc,btc->bht", q_lat_BHC, ckv_BTC) + torch.einsum("bhr,btr->bht", q_pe_BHR, kpe_BTR)
        probs = masked_softmax(logits * scale, key_mask_BT[:, None, :]).to(ckv_BTC.dtype)
        return torch.einsum("bht,btc->bhc", probs, ckv_BTC)

    def gqa_decode(self, q_BHD, k_BTGD, v_BTGD, key_mask_BT, scale: float, softcap: float | None = None,
                   sinks_H: torch.Tensor | None = None):
        rep = q_BHD.shape[1] // k_BTGD.shape[2]
        k = k_BTGD.repeat_interleave(rep, dim=2)
        v = v_BTGD.repeat_interleave(rep, dim=2)
        logits = capped(torch.einsum("bhd,bthd->bht", q_BHD, k) * scale, softcap)
        sink = None if sinks_H is None else sinks_H[None, :, None]
        probs = masked_softmax(logits, key_mask_BT[:, None, :], sink).to(v.dtype)
        return torch.einsum("bht,bthd->bhd", probs, v)

    def gather_rows(self, x_ND: torch.Tensor, idx_M: torch.Tensor) -> torch.Tensor:
        """[M, D]: row idx[i] of x as row i (a permutation, or any selection of rows)."""
        return x_ND[idx_M]

    def scatter_rows(self, y_MD: torch.Tensor, idx_M: torch.Tensor, num_rows: int) -> torch.Tensor:
        """[num_rows, D]: row i of y as row idx[i] (the inverse of gather_rows for a permutation)."""
        return y_MD.new_zeros(num_rows, y_MD.shape[1]).index_copy_(0, idx_M, y_MD)

    # -- node-level ops --------------------------------------------------------------------------
    def embedding(self, ids_BS: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids_BS, w)

    def softcap(self, x: torch.Tensor, cap: float) -> torch.Tensor:
        """cap · tanh(x / cap): Gemma 2's final logits (planc.lift.glue.Softcap)."""
        return softcap(x, cap)

    def sigmoid_scale(self, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """sigmoid(gate) * y: a gate of width 1 scales each token's output (Qwen2-MoE's shared expert)."""
        return torch.sigmoid(gate) * y

    def gated_act(self, gate: torch.Tensor, up: torch.Tensor, act_name: str, limit: float | None = None,
                  alpha: float = 1.0) -> torch.Tensor:
        return glu(gate, up, act_name, limit, alpha)

    def act(self, up: torch.Tensor, act_name: str) -> torch.Tensor:
        """An MLP without a gate: act(up)."""
        return act(act_name, up)

    def mla_queries(self, q_BSX: torch.Tensor, step: Step, W: Weights, d: MlaDims):
        """[B, S, H(P+R)] from q_b_proj -> (q_nope [B,S,H,P], rotated q_pe [B,S,H,R], (cos, sin))."""
        B, S, _ = q_BSX.shape
        q_nope, q_pe = q_BSX.view(B, S, d.num_heads, -1).split([d.nope_dim, d.rope_dim], dim=-1)
        cos, sin = rope_cos_sin(step.pos_BS, rope_inv_freq(W, step.pos_BS), d.rope_scaling, q_BSX.dtype)
        return q_nope, apply_rope(q_pe, cos, sin, d.rope_interleave), (cos, sin)

    def mla_core(self, q_BSX, kv_BSY, step: Step, cache: MlaCache, W: Weights, d: MlaDims) -> torch.Tensor:
        """MLA between its projections, absorbed form: q [B,S,H(P+R)] and kv_a's output [B,S,C+R]
        -> per-head values before o_proj [B,S,HV]; writes the normalized latent + rope key."""
        B, S, _ = q_BSX.shape
        q_nope, q_pe, (cos, sin) = self.mla_queries(q_BSX, step, W, d)
        c_kv, k_pe = kv_BSY.split([d.kv_lora_rank, d.rope_dim], dim=-1)
        c_kv = self.rmsnorm(c_kv, W["kv_a_layernorm.weight"], d.eps)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin, d.rope_interleave)[:, :, 0]
        end = step.start + S
        cache.ckv_BTC[:, step.start:end] = c_kv
        cache.kpe_BTR[:, step.start:end] = k_pe
        w_kv = W["kv_b_proj.weight"].view(d.num_heads, d.nope_dim + d.v_dim, d.kv_lora_rank)
        w_uk, w_uv = w_kv.split([d.nope_dim, d.v_dim], dim=1)
        q_lat = torch.einsum("bshp,hpc->bshc", q_nope, w_uk)
        o_lat = self.mla_attend(q_lat, q_pe, cache, step, S, d.scale)
        return torch.einsum("bshc,hvc->bshv", o_lat, w_uv).reshape(B, S, d.num_heads * d.v_dim)

    def mla_attend(self, q_lat_BSHC, q_pe_BSHR, cache: MlaCache, step: Step, S: int, scale: float):
        """Latent-space attention of S queries over the cache (decode: the kernel path)."""
        end = step.start + S
        ckv, kpe = cache.ckv_BTC[:, :end], cache.kpe_BTR[:, :end]
        if S == 1:
            out = self.mla_decode(q_lat_BSHC[:, 0], q_pe_BSHR[:, 0], ckv, kpe, step.key_mask_BT[:, :end], scale)
            return out[:, None]
        logits = torch.einsum("bshc,btc->bhst", q_lat_BSHC, ckv) + torch.einsum("bshr,btr->bhst", q_pe_BSHR, kpe)
        probs = masked_softmax(logits * scale, attention_mask(step, S)).to(ckv.dtype)
        return torch.einsum("bhst,btc->bshc", probs, ckv)

    def gqa_core(self, q_BSX, k_BSX, v_BSX, step: Step, cache: GqaCache, W: Weights, d: GqaDims) -> torch.Tensor:
        """Grouped-query attention between its projections -> [B, S, H Dh] before o_proj."""
        B, S, _ = q_BSX.shape
        q = q_BSX.view(B, S, d.num_heads, d.head_dim)
        k = k_BSX.view(B, S, d.num_kv_heads, d.head_dim)
        v = v_BSX.view(B, S, d.num_kv_heads, d.head_dim)
        if d.qk_norm == "head" and not d.qk_norm_after_rope:
            q, k = self._head_norms(q, k, W, d)
        cos, sin = rope_cos_sin(step.pos_BS, rope_inv_freq(W, step.pos_BS), d.rope_scaling, q_BSX.dtype)
        q, k = (partial_rope(t, cos, sin, d.rope_dim, d.rope_interleave) for t in (q, k))
        if d.qk_norm == "head" and d.qk_norm_after_rope:
            q, k = self._head_norms(q, k, W, d)
        if d.temperature is not None:
            q = (q * temperature_scales(step.pos_BS, *d.temperature)[:, :, None, None]).to(q.dtype)
        end = step.start + S
        cache.k_BTHD[:, step.start:end] = k
        cache.v_BTHD[:, step.start:end] = v
        sinks_H = W["sinks"] if d.sinks else None
        return self._gqa_attend(q, cache, step, S, d, sinks_H).reshape(B, S, d.num_heads * d.head_dim)

    def _head_norms(self, q_BSHD, k_BSGD, W: Weights, d: GqaDims):
        """Each head of q and k RMS-normalized on its own (by weight, or offset + weight)."""
        if d.qk_norm_weightless:  # Llama 4's L2 norm
            return unit_rmsnorm(q_BSHD, d.eps), unit_rmsnorm(k_BSGD, d.eps)
        q_name, k_name = d.qk_norm_names
        return (self.rmsnorm(q_BSHD, W[f"{q_name}.weight"], d.eps, d.qk_offset),
                self.rmsnorm(k_BSGD, W[f"{k_name}.weight"], d.eps, d.qk_offset))

    def _gqa_attend(self, q_BSHD, cache: GqaCache, step: Step, S: int, d: GqaDims, sinks_H: torch.Tensor | None = None):
        end = step.start + S
        k, v = cache.k_BTHD[:, :end], cache.v_BTHD[:, :end]
        if S == 1:
            return self.gqa_decode(q_BSHD[:, 0], k, v, decode_key_mask(step, d.window, d.chunk), d.scale, d.softcap,
                                   sinks_H)[:, None]
        rep = q_BSHD.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        logits = capped(torch.einsum("bshd,bthd->bhst", q_BSHD, k) * d.scale, d.softcap)
        sink = None if sinks_H is None else sinks_H[None, :, None, None]
        probs = masked_softmax(logits, attention_mask(step, S, d.window, d.chunk), sink).to(v.dtype)
        return torch.einsum("bhst,bthd->bshd", probs, v)

    def moe_route(self, x_ND: torch.Tensor, W: Weights, d: RouterDims) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k routing (RouterDims says which variant): expert ids [N, K] and their weights [N, K]."""
        bias = W["bias"] if d.bias else None
        if d.fp32_logits:
            logits = F.linear(x_ND.float(), W["weight"].float(), None if bias is None else bias.float())
        else:
            logits = F.linear(x_ND, W["weight"], bias).float()
        scores = logits.sigmoid() if d.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + W["e_score_correction_bias"].float() if d.correction_bias else scores
        if d.num_groups > 1:
            per_group = choice.view(-1, d.num_groups, d.num_experts // d.num_groups)
            if d.group_score == "max":
                group_scores = per_group.amax(dim=-1)
            else:  # the sum of each group's best two
                group_scores = per_group.topk(min(2, per_group.shape[-1]), dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=d.topk_groups, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
            expert_mask = group_mask.repeat_interleave(d.num_experts // d.num_groups, dim=1).bool()
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        idx_NK = torch.topk(choice, k=d.top_k, dim=-1, sorted=False)[1]
        w_NK = scores.gather(1, idx_NK)
        if d.normalize:
            # sigmoid scores can all be tiny; DeepSeek-V3 guards the division, softmax routers do not
            w_NK = w_NK / (w_NK.sum(dim=-1, keepdim=True) + (1e-20 if d.scoring == "sigmoid" else 0.0))
        w_NK = w_NK * d.scaling
        return idx_NK, w_NK.to(x_ND.dtype) if d.weights_in_model_dtype else w_NK

    def moe_experts(self, x_ND: torch.Tensor, weight_NE: torch.Tensor, W: Weights, act_name: str,
                    layout: ExpertsLayout = ExpertsLayout()) -> torch.Tensor:
        """Σ_e weight[n, e] · expert_e(x[n]) over the experts held here (columns of weight_NE; with
        layout.scaled_inputs, Σ_e expert_e(weight[n, e] · x[n])): the
        (row, expert) pairs sorted by expert, one grouped GEMM per projection, each row's partial
        sums added in expert order. `layout`: how the experts hold their weights (ExpertsLayout)."""
        e_idx, r_idx = weight_NE.T.nonzero(as_tuple=True)  # sorted by expert, then row
        offsets = [0] + torch.bincount(e_idx, minlength=weight_NE.shape[1]).cumsum(0).tolist()
        rows, w_R = self.gather_rows(x_ND, r_idx), weight_NE[r_idx, e_idx, None]
        if layout.scaled_inputs:  # Llama 4: expert(w · x)
            rows = (rows * w_R).to(x_ND.dtype)
        gate_up = self.grouped_linear(rows, _gnk(W["gate_up_proj"], layout), offsets)
        if layout.bias:
            gate_up = gate_up + W["gate_up_proj_bias"][e_idx]
        y = self.grouped_linear(expert_glu(gate_up, act_name, layout), _gnk(W["down_proj"], layout), offsets)
        if layout.bias:
            y = y + W["down_proj_bias"][e_idx]
        return torch.zeros_like(x_ND).index_add_(0, r_idx, (y if layout.scaled_inputs else y * w_R).to(x_ND.dtype))

    def grouped_linear(self, x_MK: torch.Tensor, w_GNK: torch.Tensor, offsets: list[int]) -> torch.Tensor:
        """[M, N]: rows offsets[g] .. offsets[g+1]-1 of x times w[g]ᵀ (token-sorted rows, a weight per group)."""
        return torch.cat([self.linear(x_MK[lo:hi], w_GNK[g]) for g, (lo, hi) in enumerate(zip(offsets, offsets[1:]))])

    def moe_routed(self, x_BSD: torch.Tensor, W: Weights, d: MoeDims) -> torch.Tensor:
        """Router + routed experts on one device (shared experts are their own linear nodes)."""
        x = x_BSD.reshape(-1, x_BSD.shape[-1])
        idx, w = self.moe_route(x, scoped(W, d.router.module), d.router)
        dense = torch.zeros(x.shape[0], d.router.num_experts, dtype=w.dtype, device=w.device).scatter_(1, idx, w)
        return self.moe_experts(x, dense, scoped(W, "experts"), d.act, d.layout).view_as(x_BSD)

    # -- whole blocks (the lift check's references), composed from the node-level ops ------------
    def mlp(self, x: torch.Tensor, W: Weights, act_name: str, limit: float | None = None, alpha: float = 1.0
            ) -> torch.Tensor:
        """down(act(gate(x)) * up(x)) (the clamped GLU with a limit); down(act(up(x))) for an MLP
        without gate_proj."""
        up = self.linear(x, W["up_proj.weight"], W.get("up_proj.bias"))
        if W.get("gate_proj.weight") is None:
            return self.linear(self.act(up, act_name), W["down_proj.weight"], W.get("down_proj.bias"))
        gate = self.linear(x, W["gate_proj.weight"], W.get("gate_proj.bias"))
        return self.linear(self.gated_act(gate, up, act_name, limit, alpha), W["down_proj.weight"], W.get("down_proj.bias"))

    def mla_attention(self, x_BSD, step: Step, cache: MlaCache, W: Weights, d: MlaDims) -> torch.Tensor:
        if d.q_lora_rank:
            q_lat = self.rmsnorm(self.linear(x_BSD, W["q_a_proj.weight"], W.get("q_a_proj.bias")),
                                 W["q_a_layernorm.weight"], d.eps)
            q = self.linear(q_lat, W["q_b_proj.weight"], W.get("q_b_proj.bias"))
        else:
            q = self.linear(x_BSD, W["q_proj.weight"], W.get("q_proj.bias"))
        kv = self.linear(x_BSD, W["kv_a_proj_with_mqa.weight"], W.get("kv_a_proj_with_mqa.bias"))
        o = self.mla_core(q, kv, step, cache, W, d)
        return self.linear(o, W["o_proj.weight"], W.get("o_proj.bias"))

    def gqa_attention(self, x_BSD, step: Step, cache: GqaCache, W: Weights, d: GqaDims) -> torch.Tensor:
        q, k, v = (self.linear(x_BSD, W[f"{p}_proj.weight"], W.get(f"{p}_proj.bias")) for p in "qkv")
        if d.qk_norm == "full":  # over the whole projection, before the heads are split
            q, k = self.rmsnorm(q, W["q_norm.weight"], d.eps), self.rmsnorm(k, W["k_norm.weight"], d.eps)
        o = self.gqa_core(q, k, v, step, cache, W, d)
        if d.output_gate:
            o = self.sigmoid_scale(self.linear(x_BSD, W["gate_proj.weight"], W.get("gate_proj.bias")), o)
        return self.linear(o, W["o_proj.weight"], W.get("o_proj.bias"))

    def moe(self, x_BSD: torch.Tensor, W: Weights, d: RouterDims, act_name: str, shared: str | None = None,
            shared_gate: str | None = None, layout: ExpertsLayout = ExpertsLayout()) -> torch.Tensor:
        """The whole MoE block on one device: routed experts, plus the shared expert MLP (scaled by
        sigmoid(shared_gate(x)) when the block has such a gate, as Qwen2-MoE does)."""
        intermediate = _gnk(W["experts.down_proj"], layout).shape[-1]
        y = self.moe_routed(x_BSD, W, MoeDims(d, x_BSD.shape[-1], intermediate, act_name, layout))
        if shared is None:
            return y
        s = self.mlp(x_BSD, scoped(W, shared), act_name, layout.limit, layout.alpha)  # the experts' clamp (MiniMax-M3)
        if shared_gate is not None:
            s = self.sigmoid_scale(self.linear(x_BSD, W[f"{shared_gate}.weight"], W.get(f"{shared_gate}.bias")), s)
        return y + s
