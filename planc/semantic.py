"""The base op kinds of the semantic graph: what each emits into the program and what it holds.

A strategy that introduces kinds of its own (EP's dispatch, TPLA's latent slice) declares them in
its module under passes/ the same way; codegen, partition and the report read only OpSpecs.
"""
from __future__ import annotations

from planc.ir import Call, declare_op


def _core_args(c: Call) -> str:
    return ", ".join(c.args)


MLA_KERNELS = ("mla_decode.py", "mla_decode_cpu.py", "mla_decode_cpu.c", "rmsnorm.py")  # decode attention, latent norm
MOE_KERNELS = ("grouped_gemm.py", "permute.py")  # expert-sorted rows, one grouped GEMM per projection

def _scaled(c: Call, x: str, scale) -> str:
    return x if scale is None else f"({scale.emit(x)})"


declare_op("embedding", lambda c: _scaled(c, f"ops.embedding({c.args[0]}, {c.weight('weight')})", c.info.dims.scale),
           owns_weights=True)
declare_op("scale", lambda c: c.info.dims.emit(c.args[0]))  # a constant factor between blocks (planc.lift.glue)
declare_op("rmsnorm", lambda c: f"ops.rmsnorm({c.args[0]}, {c.weight('weight')}, {c.info.dims.eps!r}"
                                 + (f", offset={c.info.dims.offset!r})" if c.info.dims.offset else ")"),
           owns_weights=True, kernels=("rmsnorm.py",))
declare_op("linear", lambda c: f"ops.linear({c.args[0]}, {c.weight('weight')}, {c.maybe('bias')})", owns_weights=True,
           kernels=("linear.py",))
declare_op("add", lambda c: f"{c.args[0]} + {_scaled(c, c.args[1], c.info.dims)}")  # dims: the branch's Scale or None
declare_op("sigmoid_scale", lambda c: f"ops.sigmoid_scale({c.args[0]}, {c.args[1]})")
declare_op("mlp", lambda c: f"ops.act({c.args[0]}, {c.info.dims.act!r})" if not c.info.dims.gated
           else f"ops.gated_act({c.args[0]}, {c.args[1]}, {c.info.dims.act!r})" if c.info.dims.limit is None
           else f"ops.gated_act({c.args[0]}, {c.args[1]}, {c.info.dims.act!r}, {c.info.dims.limit!r}, {c.info.dims.alpha!r})")
declare_op("mla_attention", lambda c: f"ops.mla_core({_core_args(c)}, step, caches[{c.name()}], {c.W}, {c.dims})",
           owns_weights=True, rotary=True, step=True, kernels=MLA_KERNELS)
declare_op("gqa_attention", lambda c: f"ops.gqa_core({_core_args(c)}, step, caches[{c.name()}], {c.W}, {c.dims})",
           owns_weights=True, rotary=True, step=True, kernels=("gqa_decode.py",))
declare_op("captured", lambda c: f"{c.define(c.info.dims.fn)}({c.args[0]}, {c.W})", owns_weights=True)
declare_op("moe", lambda c: f"ops.moe_routed({c.args[0]}, {c.W}, {c.dims})", owns_weights=True,
           kernels=MOE_KERNELS)
declare_op("all_reduce", lambda c: f"comm.all_reduce({c.args[0]})", collective="all_reduce")
