"""Semantic ops: one pure-PyTorch reference per recognized block.

The same functions run a block on one device (full weights) and on one rank (that rank's shard
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

import torch
import torch.nn.functional as F

from planc.dims import GqaDims, MlaDims, RouterDims, TplaDims
from planc.weights import scoped

Weights = dict[str, torch.Tensor]


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
class TplaLatent:
    """This step's latent slice (before normalization), rope key, and per-token sum of squares."""

    c_BSC: torch.Tensor
    k_pe_BSR: torch.Tensor
    sumsq_BS1: torch.Tensor


@dataclass
class GqaCache:
    k_BTHD: torch.Tensor
    v_BTHD: torch.Tensor


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


def attention_mask(step: Step, num_queries: int) -> torch.Tensor:
    """[B, 1, S, L] bool: a query at slot start+i sees filled slots <= start+i."""
    length = step.start + num_queries
    q_slot = torch.arange(step.start, length, device=step.key_mask_BT.device)
    k_slot = torch.arange(length, device=step.key_mask_BT.device)
    causal = k_slot[None, :] <= q_slot[:, None]
    return (causal[None] & step.key_mask_BT[:, None, :length])[:, None]


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = acc(logits).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # fully masked rows (padding queries) give zeros


def acc(x: torch.Tensor) -> torch.Tensor:
    """Norm statistics in at least fp32 (fp64 stays fp64, so fp64 checks can be exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name in ("gelu", "gelu_pytorch_tanh"):
        return F.gelu(x, approximate="tanh" if name.endswith("tanh") else "none")
    raise ValueError(f"unsupported activation {name!r}")


class Ops:
    """Reference backend: every primitive is plain PyTorch."""

    name = "torch"

    # -- primitives a kernel backend may replace -------------------------------------------------
    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, w, b)

    def rmsnorm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        h = acc(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype)

    def mla_decode(self, q_lat_BHC, q_pe_BHR, ckv_BTC, kpe_BTR, key_mask_BT, scale: float):
        logits = torch.einsum("bhc,btc->bht", q_lat_BHC, ckv_BTC) + torch.einsum("bhr,btr->bht", q_pe_BHR, kpe_BTR)
        probs = masked_softmax(logits * scale, key_mask_BT[:, None, :]).to(ckv_BTC.dtype)
        return torch.einsum("bht,btc->bhc", probs, ckv_BTC)

    def gqa_decode(self, q_BHD, k_BTGD, v_BTGD, key_mask_BT, scale: float):
        rep = q_BHD.shape[1] // k_BTGD.shape[2]
        k = k_BTGD.repeat_interleave(rep, dim=2)
        v = v_BTGD.repeat_interleave(rep, dim=2)
        logits = torch.einsum("bhd,bthd->bht", q_BHD, k) * scale
        probs = masked_softmax(logits, key_mask_BT[:, None, :]).to(v.dtype)
        return torch.einsum("bht,bthd->bhd", probs, v)

    # -- composite ops ---------------------------------------------------------------------------
    def embedding(self, ids_BS: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids_BS, w)

    def mlp(self, x: torch.Tensor, W: Weights, act_name: str) -> torch.Tensor:
        gate = self.linear(x, W["gate_proj.weight"])
        up = self.linear(x, W["up_proj.weight"])
        return self.linear(act(act_name, gate) * up, W["down_proj.weight"])

    def mla_attention(self, x_BSD, step: Step, cache: MlaCache, W: Weights, d: MlaDims) -> torch.Tensor:
        """MLA in the absorbed form over the latent cache; returns this rank's partial o_proj output."""
        B, S, _ = x_BSD.shape
        q_nope, q_pe, (cos, sin) = self._mla_queries(x_BSD, step, W, d)
        kv = self.linear(x_BSD, W["kv_a_proj_with_mqa.weight"], W.get("kv_a_proj_with_mqa.bias"))
        c_kv, k_pe = kv.split([d.kv_lora_rank, d.rope_dim], dim=-1)
        c_kv = self.rmsnorm(c_kv, W["kv_a_layernorm.weight"], d.eps)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin, d.rope_interleave)[:, :, 0]
        end = step.start + S
        cache.ckv_BTC[:, step.start:end] = c_kv
        cache.kpe_BTR[:, step.start:end] = k_pe
        w_kv = W["kv_b_proj.weight"].view(d.num_heads, d.nope_dim + d.v_dim, d.kv_lora_rank)
        w_uk, w_uv = w_kv.split([d.nope_dim, d.v_dim], dim=1)
        q_lat = torch.einsum("bshp,hpc->bshc", q_nope, w_uk)
        o_lat = self._mla_core(q_lat, q_pe, cache, step, S, d.scale)
        o = torch.einsum("bshc,hvc->bshv", o_lat, w_uv).reshape(B, S, d.num_heads * d.v_dim)
        return self.linear(o, W["o_proj.weight"], W.get("o_proj.bias"))

    def _mla_queries(self, x_BSD, step: Step, W: Weights, d: MlaDims):
        B, S, _ = x_BSD.shape
        if d.q_lora_rank:
            q_lat = self.rmsnorm(self.linear(x_BSD, W["q_a_proj.weight"], W.get("q_a_proj.bias")),
                                 W["q_a_layernorm.weight"], d.eps)
            q = self.linear(q_lat, W["q_b_proj.weight"])
        else:
            q = self.linear(x_BSD, W["q_proj.weight"])
        q_nope, q_pe = q.view(B, S, d.num_heads, -1).split([d.nope_dim, d.rope_dim], dim=-1)
        cos, sin = rope_cos_sin(step.pos_BS, W["rotary.inv_freq"], d.rope_scaling, x_BSD.dtype)
        return q_nope, apply_rope(q_pe, cos, sin, d.rope_interleave), (cos, sin)

    def tpla_latent(self, x_BSD, W: Weights, d: TplaDims) -> TplaLatent:
        """This rank's latent slice c'_j = (U^T W_DKV)_j x, the shared rope key (not yet rotated) and
        the per-token sum of squares: of the slice, or with recompute_rms of the whole latent."""
        c, k_pe = self.linear(x_BSD, W["tpla.kv_a.weight"], W.get("tpla.kv_a.bias")).split([d.latent, d.mla.rope_dim], dim=-1)
        if not d.recompute_rms:
            return TplaLatent(c, k_pe, acc(c).pow(2).sum(-1, keepdim=True))
        C = d.mla.kv_lora_rank
        bias = W.get("kv_a_proj_with_mqa.bias")
        whole = self.linear(x_BSD, W["kv_a_proj_with_mqa.weight"][:C], bias[:C] if bias is not None else None)
        return TplaLatent(c, k_pe, acc(whole).pow(2).sum(-1, keepdim=True))

    def tpla_attention(self, x_BSD, lat: TplaLatent, sumsq_BS1, step: Step, cache: MlaCache, W: Weights,
                       d: TplaDims) -> torch.Tensor:
        """TPLA on one rank: attention of this rank's heads over its latent slice only.

        Prefill with PD separation runs exact MLA (full latent, prefill head split) and caches
        the slice; otherwise: normalize the slice (sliced: over the slice; exact: with the
        all-reduced sum of squares; recompute: with the whole latent's, computed here), per-slice
        softmax, W_UV slice, o_proj -> partial [B, S, D].
        """
        if step.start == 0 and d.prefill_heads:
            return self._tpla_exact_prefill(x_BSD, lat, step, cache, W, d)
        m = d.mla
        B, S, _ = x_BSD.shape
        q_nope, q_pe, (cos, sin) = self._mla_queries(x_BSD, step, W, m)
        whole = sumsq_BS1 is not None or d.recompute_rms  # the RMS is over the whole latent
        width = m.kv_lora_rank if whole else d.latent
        sumsq = sumsq_BS1 / d.group_size if sumsq_BS1 is not None else lat.sumsq_BS1
        c = acc(lat.c_BSC) * torch.rsqrt(sumsq / width + m.eps)
        if sumsq_BS1 is None and "tpla.scale" in W:  # calibrated slice scale (scales: calibrated)
            c = c * W["tpla.scale"]
        c = c.to(x_BSD.dtype)
        k_pe = apply_rope(lat.k_pe_BSR[:, :, None, :], cos, sin, m.rope_interleave)[:, :, 0]
        end = step.start + S
        cache.ckv_BTC[:, step.start:end] = c
        cache.kpe_BTR[:, step.start:end] = k_pe
        w_kv = W["kv_b_proj.weight"].view(m.num_heads, m.nope_dim + m.v_dim, d.latent)
        w_uk, w_uv = w_kv.split([m.nope_dim, m.v_dim], dim=1)
        o_lat = self._mla_core(torch.einsum("bshp,hpc->bshc", q_nope, w_uk), q_pe, cache, step, S, m.scale)
        o = torch.einsum("bshc,hvc->bshv", o_lat, w_uv).reshape(B, S, m.num_heads * m.v_dim)
        return self.linear(o, W["o_proj.weight"], W.get("o_proj.bias"))

    def _tpla_exact_prefill(self, x_BSD, lat: TplaLatent, step: Step, cache: MlaCache, W: Weights, d: TplaDims):
        """Exact MLA over the full reparameterized latent; the cache keeps this rank's slice of it."""
        m, S = d.mla.local(d.prefill_heads), x_BSD.shape[1]
        prefill = {k: W[f"prefill.{k}"] if f"prefill.{k}" in W else v for k, v in W.items() if not k.startswith("prefill.")}
        full = MlaCache(cache.ckv_BTC.new_zeros(x_BSD.shape[0], S, m.kv_lora_rank), cache.kpe_BTR[:, :S].clone())
        out = self.mla_attention(x_BSD, step, full, prefill, m)
        c_all, _ = self.linear(x_BSD, W["kv_a_proj_with_mqa.weight"], W.get("kv_a_proj_with_mqa.bias")).split([m.kv_lora_rank, m.rope_dim], dim=-1)
        rms = torch.rsqrt(acc(c_all).pow(2).mean(-1, keepdim=True) + m.eps)
        cache.ckv_BTC[:, :S] = (acc(lat.c_BSC) * rms).to(x_BSD.dtype)
        cache.kpe_BTR[:, :S] = full.kpe_BTR
        return out

    def _mla_core(self, q_lat_BSHC, q_pe_BSHR, cache: MlaCache, step: Step, S: int, scale: float):
        end = step.start + S
        ckv, kpe = cache.ckv_BTC[:, :end], cache.kpe_BTR[:, :end]
        if S == 1:  # decode: the kernel path
            out = self.mla_decode(q_lat_BSHC[:, 0], q_pe_BSHR[:, 0], ckv, kpe, step.key_mask_BT[:, :end], scale)
            return out[:, None]
        logits = torch.einsum("bshc,btc->bhst", q_lat_BSHC, ckv) + torch.einsum("bshr,btr->bhst", q_pe_BSHR, kpe)
        probs = masked_softmax(logits * scale, attention_mask(step, S)).to(ckv.dtype)
        return torch.einsum("bhst,btc->bshc", probs, ckv)

    def gqa_attention(self, x_BSD, step: Step, cache: GqaCache, W: Weights, d: GqaDims) -> torch.Tensor:
        """Grouped-query attention on this rank's heads; returns the partial o_proj output."""
        B, S, _ = x_BSD.shape
        q = self.linear(x_BSD, W["q_proj.weight"], W.get("q_proj.bias")).view(B, S, d.num_heads, d.head_dim)
        k = self.linear(x_BSD, W["k_proj.weight"], W.get("k_proj.bias")).view(B, S, d.num_kv_heads, d.head_dim)
        v = self.linear(x_BSD, W["v_proj.weight"], W.get("v_proj.bias")).view(B, S, d.num_kv_heads, d.head_dim)
        if "q_norm.weight" in W:
            q = self.rmsnorm(q, W["q_norm.weight"], d.eps)
            k = self.rmsnorm(k, W["k_norm.weight"], d.eps)
        cos, sin = rope_cos_sin(step.pos_BS, W["rotary.inv_freq"], d.rope_scaling, x_BSD.dtype)
        q, k = apply_rope(q, cos, sin, False), apply_rope(k, cos, sin, False)
        end = step.start + S
        cache.k_BTHD[:, step.start:end] = k
        cache.v_BTHD[:, step.start:end] = v
        o = self._gqa_core(q, cache, step, S, d.scale).reshape(B, S, d.num_heads * d.head_dim)
        return self.linear(o, W["o_proj.weight"], W.get("o_proj.bias"))

    def _gqa_core(self, q_BSHD, cache: GqaCache, step: Step, S: int, scale: float):
        end = step.start + S
        k, v = cache.k_BTHD[:, :end], cache.v_BTHD[:, :end]
        if S == 1:
            return self.gqa_decode(q_BSHD[:, 0], k, v, step.key_mask_BT[:, :end], scale)[:, None]
        rep = q_BSHD.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        logits = torch.einsum("bshd,bthd->bhst", q_BSHD, k) * scale
        probs = masked_softmax(logits, attention_mask(step, S)).to(v.dtype)
        return torch.einsum("bhst,bthd->bshd", probs, v)

    def moe_route(self, x_ND: torch.Tensor, W: Weights, d: RouterDims) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek-V3 router: sigmoid scores, bias-corrected group-limited top-k, scaled weights."""
        logits = F.linear(x_ND.float(), W["weight"].float())
        scores = logits.sigmoid()
        choice = scores + W["e_score_correction_bias"].float()
        per_group = choice.view(-1, d.num_groups, d.num_experts // d.num_groups)
        group_scores = per_group.topk(min(2, per_group.shape[-1]), dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=d.topk_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        expert_mask = group_mask.repeat_interleave(d.num_experts // d.num_groups, dim=1).bool()
        choice = choice.masked_fill(~expert_mask, float("-inf"))
        idx_NK = torch.topk(choice, k=d.top_k, dim=-1, sorted=False)[1]
        w_NK = scores.gather(1, idx_NK)
        if d.normalize:
            w_NK = w_NK / (w_NK.sum(dim=-1, keepdim=True) + 1e-20)
        return idx_NK, w_NK * d.scaling

    def moe_experts(self, x_ND: torch.Tensor, weight_NE: torch.Tensor, W: Weights, act_name: str) -> torch.Tensor:
        """Σ_e weight[n, e] · expert_e(x[n]) over the experts held here (columns of weight_NE)."""
        out = torch.zeros_like(x_ND)
        for e in range(weight_NE.shape[1]):
            rows = weight_NE[:, e].nonzero().flatten()
            if rows.numel() == 0:
                continue
            gate, up = self.linear(x_ND[rows], W["gate_up_proj"][e]).chunk(2, dim=-1)
            y = self.linear(act(act_name, gate) * up, W["down_proj"][e])
            out.index_add_(0, rows, (y * weight_NE[rows, e, None]).to(out.dtype))
        return out

    def moe(self, x_BSD: torch.Tensor, W: Weights, d: RouterDims, act_name: str) -> torch.Tensor:
        """The whole MoE block on one device (the reference the EP program must reproduce)."""
        x = x_BSD.reshape(-1, x_BSD.shape[-1])
        idx, w = self.moe_route(x, scoped(W, "gate"), d)
        dense = torch.zeros(x.shape[0], d.num_experts, dtype=w.dtype).scatter_(1, idx, w)
        experts = scoped(W, "experts")
        y = self.moe_experts(x, dense, experts, act_name)
        if any(k.startswith("shared_experts.") for k in W):
            y = y + self.mlp(x, scoped(W, "shared_experts"), act_name)
        return y.view_as(x_BSD)
