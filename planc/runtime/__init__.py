"""Running compiled artifacts: launcher, collectives wrapper, per-rank engine and kernel choices."""

KERNELS = ("torch", "triton", "cpu")  # --kernels choices; planc.runtime.kernel_ops.make_ops builds each
