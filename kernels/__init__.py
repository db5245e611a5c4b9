"""Fused kernels, one op per module, each with a launcher and a pure-PyTorch reference (Triton;
mla_decode_cpu is C for CPU ranks and shares mla_decode's reference).

- `linear`: `linear(x, weight)` = x @ weight.T (nn.Linear layout, no bias), tiled GEMM, fp32 accumulation.
- `rmsnorm`: `rmsnorm(x, weight, eps)`, Hugging Face RMSNorm semantics, one program per row.
- `mla_decode`: `mla_decode(q_lat, q_pe, ckv, kpe, key_mask, scale)`, absorbed-form MLA decode
  attention over a latent cache, split sequence + log-sum-exp merge.
- `gqa_decode`: `gqa_decode(q, k, v, key_mask, scale, softcap=None)`, grouped-query decode attention
  over a [B, T, Hkv, D] cache (scores optionally capped, Gemma 2), split sequence + log-sum-exp merge.
- `mla_decode_cpu`: `mla_decode_cpu(q_lat, q_pe, ckv, kpe, key_mask, scale)`, the same op fused for
  one CPU core in C (mla_decode_cpu.c, float32), built with the machine's C compiler.

Shared pieces: `gemm_tile` (the K loop of every GEMM kernel here, and their block sizes), `split_merge`
(the split-sequence merge), `mla_inputs` (input checks).

Import from the modules directly (`from planc.kernels.linear import linear`). Without CUDA the
kernels run under the Triton interpreter, which `import planc` selects before any kernel is
decorated.
"""
