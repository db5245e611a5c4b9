"""Running compiled artifacts: loading and checking them, the per-rank model and its KV cache, the
generate loop and its decode strategies, the collectives wrapper, the launcher and kernel choices."""

KERNELS = ("torch", "triton", "cpu")  # --kernels choices; planc.runtime.kernel_ops.make_ops builds each
