"""`planc bench kernels`: planc's Triton kernels on one CUDA device, timed side by side at
DeepSeek-V3's dims (bf16). Absolute times mean something only on a GPU, so without CUDA the case
refuses; `measure(device=cpu)` runs the same probes (correctness checks included) under the
interpreter at small shapes for the tests.

tpla_decode: one rank's decode attention kernel (kernels/mla_decode.py) for mla_tp (H/k heads over
  the whole C-wide latent) and TPLA g = 2, 4, 8 at k = 8 devices (H/(k/g) heads over a C/g slice),
  per batch and context; beside each time the bytes the kernel must read (cache + queries + output),
  the bandwidth that implies, planc.cost's roofline for the same op on this device's profile, and
  the speedup over mla_tp. Every output is checked against mla_decode_reference first.
t3_gemm: T3's producer GEMM (kernels/t3_gemm.py, one launch, pieces in ring order, a counter per
  piece) against cuBLAS (torch.nn.functional.linear) and planc's plain Triton linear
  (kernels/linear.py) on one rank's slice of DeepSeek-V3's o_proj at TP = 8; and `schedule`, the
  whole on-device T3 schedule without the network: the launch plus a side stream that waits on each
  piece's counter in ring order and copies the piece out (what the ring's send does to it), so
  schedule - t3_gemm is what the counters and waits cost.

On CUDA each probe is timed twice, the L2 cache flushed before every call: eager (medians of
triton.testing.do_bench: each call as Python makes it, host launch overhead included) and graph (the
same call captured once in a CUDA graph and replayed, as a served decode step runs; medians of CUDA
events around each replay). The figures compared are the graph ones where the probe could be
captured, the eager ones otherwise; on CPU, medians of perf_counter samples.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from planc import cost
from planc.errors import PlancError

DEVICES = 8  # the TPLA paper's and DeepSeek-V3's serving setting
GROUPS = (1, 2, 4, 8)  # 1 = mla_tp
BATCHES, CONTEXTS = (1, 16, 64), (4096, 32768)
TOKENS = (4, 512, 4096)  # decode-like, prefill chunk, long prefill
CPU_SHAPES = {"heads": 16, "latent": 64, "rope": 16, "batches": (2,), "contexts": (96,), "devices": 4,
              "groups": (1, 2, 4), "k_in": 256, "n_out": 128, "tokens": (4, 40), "tp": 2}


def gpu_shapes() -> dict:
    m = cost.mla_model("deepseek-v3")
    return {"heads": m.H, "latent": m.C, "rope": m.R, "batches": BATCHES, "contexts": CONTEXTS,
            "devices": DEVICES, "groups": GROUPS, "k_in": m.H * m.V, "n_out": m.D, "tokens": TOKENS,
            "tp": DEVICES}


def _timer(device: torch.device) -> Callable[[Callable[[], object]], tuple[float, float | None]]:
    """fn -> (eager seconds, graph seconds or None): eager is each call as Python makes it, host launch
    overhead included; graph is the same work captured once in a CUDA graph and replayed (how a
    decode step is served), both with the L2 cache flushed before every call."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: (triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3,
                           _graph_seconds(fn, device))

    def cpu(fn: Callable[[], object]) -> tuple[float, None]:
        fn()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples), None

    return cpu


def _graph_seconds(fn: Callable[[], object], device: torch.device, samples: int = 50) -> float | None:
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm up off the default stream, as capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return None  # not capturable: the eager figure stands alone
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
    times = []
    for _ in range(samples):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _hardware(device: torch.device) -> cost.Hardware:
    if device.type != "cuda":
        return cost.cpu_profile()
    name = torch.cuda.get_device_name(device)
    return next((hw for key, hw in cost.PROFILES.items() if key in name), cost.PROFILES["H100"])


def tpla_decode(shapes: dict, device: torch.device, dtype: torch.dtype, timer, hw: cost.Hardware) -> list[dict]:
    from planc.kernels.mla_decode import mla_decode, mla_decode_reference

    e, rows = torch.finfo(dtype).bits // 8, []
    gen = torch.Generator(device=device).manual_seed(0)
    for context in shapes["contexts"]:
        for batch in shapes["batches"]:
            base = None
            for g in shapes["groups"]:
                heads, latent, rope = shapes["heads"] * g // shapes["devices"], shapes["latent"] // g, shapes["rope"]
                make = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=dtype)  # noqa: E731
                q_lat, q_pe, ckv, kpe = make(batch, heads, latent), make(batch, heads, rope), \
                    make(batch, context, latent), make(batch, context, rope)
                mask = torch.ones(batch, context, dtype=torch.bool, device=device)
                scale = (latent + rope) ** -0.5
                got = mla_decode(q_lat, q_pe, ckv, kpe, mask, scale)
                torch.testing.assert_close(got.float(), mla_decode_reference(q_lat, q_pe, ckv, kpe, mask, scale).float(),
                                           rtol=2e-2, atol=2e-2)
                eager, graph = timer(lambda: mla_decode(q_lat, q_pe, ckv, kpe, mask, scale))
                seconds = eager if graph is None else graph
                op = cost.attention(batch, heads, latent, rope, context, e)
                base = seconds if g == 1 else base
                rows.append({"strategy": "mla_tp" if g == 1 else f"tpla g={g}", "batch": batch, "context": context,
                             "heads_per_rank": heads, "latent_per_rank": latent, "seconds": seconds,
                             "eager_seconds": eager,
                             "bytes": op.bytes, "bandwidth": op.bytes / seconds,
                             "roofline_seconds": cost.op_time(op, hw), "speedup_vs_mla_tp": base / seconds})
    return rows


def t3_gemm(shapes: dict, device: torch.device, dtype: torch.dtype, timer, hw: cost.Hardware) -> list[dict]:
    from planc.kernels.linear import linear
    from planc.kernels.t3_gemm import Pieces
    from planc.kernels.t3_gemm import t3_gemm as t3

    world = shapes["tp"]
    k, n, e = shapes["k_in"] // world, shapes["n_out"], torch.finfo(dtype).bits // 8
    gen = torch.Generator(device=device).manual_seed(1)
    w = torch.randn(n, k, generator=gen, device=device, dtype=dtype) / k ** 0.5
    rows = []
    for tokens in shapes["tokens"]:
        x = torch.randn(tokens, k, generator=gen, device=device, dtype=dtype)
        want = torch.nn.functional.linear(x.float(), w.float())
        torch.testing.assert_close(t3(x, w, 0, world, world)[0].float(), want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(linear(x, w).float(), want, rtol=2e-2, atol=2e-2)
        sink = torch.empty(tokens, n // world, dtype=dtype, device=device)

        def schedule() -> None:
            made = Pieces(x, w, None, rank=0, world=world, pieces=world)
            with made.running():
                for piece in made.order:
                    sink.copy_(made.compute(piece))

        probes = {"cublas": lambda: torch.nn.functional.linear(x, w), "triton_linear": lambda: linear(x, w),
                  "t3_gemm": lambda: t3(x, w, 0, world, world), "schedule": schedule}
        timed = {name: timer(fn) for name, fn in probes.items()}
        times = {name: eager if graph is None else graph for name, (eager, graph) in timed.items()}
        op = cost.gemm("o_proj", tokens, k, n, e)
        rows.append({"gemm": "deepseek-v3 o_proj", "tp": world, "tokens": tokens, "in_features_per_rank": k,
                     "out_features": n, **{f"{name}_s": s for name, s in times.items()},
                     **{f"{name}_eager_s": eager for name, (eager, _) in timed.items()},
                     "t3_over_cublas": times["t3_gemm"] / times["cublas"],
                     "schedule_over_t3": times["schedule"] / times["t3_gemm"],
                     "roofline_seconds": cost.op_time(op, hw), "tflops_t3": op.flops / times["t3_gemm"] / 1e12})
    return rows


def measure(device: torch.device, shapes: dict, dtype: torch.dtype) -> dict:
    timer, hw = _timer(device), _hardware(device)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
            "dtype": str(dtype).removeprefix("torch."), "profile": hw.name, "tpla_devices": shapes["devices"],
            "tpla_decode": tpla_decode(shapes, device, dtype, timer, hw),
            "t3_gemm": t3_gemm(shapes, device, dtype, timer, hw)}


def run() -> dict:
    if not torch.cuda.is_available():
        raise PlancError("planc bench kernels times Triton kernels on a CUDA device and none is visible here; "
                         "run it on a machine with a GPU (the kernels' correctness tests run on CPU under the "
                         "Triton interpreter: pytest tests/kernels)")
    return measure(torch.device("cuda"), gpu_shapes(), torch.bfloat16)


def table(result: dict) -> str:
    rows = [f"kernels on {result['device']} ({result['dtype']}; roofline: planc.cost's {result['profile']} profile)",
            f"  tpla_decode: one rank's MLA decode kernel (k = {result['tpla_devices']} devices)",
            f"  {'strategy':<10} {'B':>3} {'T':>6} {'H/rank':>6} {'C/rank':>6} {'us':>9} {'eager us':>9} {'GB/s':>7} "
            f"{'roofline us':>11} {'speedup':>7}"]
    for r in result["tpla_decode"]:
        rows.append(f"  {r['strategy']:<10} {r['batch']:>3} {r['context']:>6} {r['heads_per_rank']:>6} "
                    f"{r['latent_per_rank']:>6} {r['seconds'] * 1e6:9.1f} {r['eager_seconds'] * 1e6:9.1f} "
                    f"{r['bandwidth'] / 1e9:7.0f} "
                    f"{r['roofline_seconds'] * 1e6:11.1f} {r['speedup_vs_mla_tp']:7.2f}")
    rows += ["  t3_gemm: one rank's o_proj GEMM (row-parallel slice), microseconds (eager in the JSON)",
             f"  {'tokens':>6} {'K':>5} {'N':>5} {'cublas':>8} {'triton':>8} {'t3_gemm':>8} {'schedule':>8} "
             f"{'t3/cublas':>9} {'sched/t3':>8} {'roofline':>8} {'TFLOP/s':>7}"]
    for r in result["t3_gemm"]:
        rows.append(f"  {r['tokens']:>6} {r['in_features_per_rank']:>5} {r['out_features']:>5} "
                    f"{r['cublas_s'] * 1e6:8.1f} {r['triton_linear_s'] * 1e6:8.1f} {r['t3_gemm_s'] * 1e6:8.1f} "
                    f"{r['schedule_s'] * 1e6:8.1f} {r['t3_over_cublas']:9.2f} {r['schedule_over_t3']:8.2f} "
                    f"{r['roofline_seconds'] * 1e6:8.1f} {r['tflops_t3']:7.1f}")
    return "\n".join(rows)
