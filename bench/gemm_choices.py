"""Which cuBLAS kernels the SS2D block's GEMMs get, per dtype and call form (GPU).

At 1280x720, batch 1, bf16 runs eight more launches a forward than fp16: a Memset before
each stage-3 Δ GEMM (PERF_NOTES, "Where the time goes", stop 30). This times each GEMM of a
VMamba-T SS2D block at every stage's shape (in_proj, x_proj, the block-diagonal Δ expansion,
out_proj) in fp16 and bf16, in the call form the model uses (``F.linear``, weight (N, K)) and
in others that hand cuBLAS the same product differently: ``torch.mm`` with the weight stored
(K, N), and the Δ GEMM with ``allow_bf16_reduced_precision_reduction`` off. Per row: CUDA-graph
replay time and the kernels a replay launches (names, Memsets counted).

    python bench/gemm_choices.py --size 720x1280 --batch 1 4 --out $OUT/gemm_choices_h200.json
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    capture_graph,
    parse_size,
    provenance,
    stage_hw,
    time_cuda,
    write_json,
)

DIMS = (96, 192, 384, 768)  # VMamba-T
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def gemm_shapes(dim: int, pixels: int) -> dict:
    """(M, K, N) of each GEMM of one SS2D block (d_state 1, ssm_ratio 1, dt_rank C/16)."""
    width = math.ceil(dim / 16) + 2  # per route: rank Δ factors, B, C
    return {"in_proj": (pixels, dim, dim), "x_proj": (pixels, dim, 4 * width),
            "delta": (pixels, 4 * width, 4 * dim), "out_proj": (pixels, dim, dim)}


def padded(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """``t`` with zeros appended along ``dim`` up to a multiple of ``multiple``."""
    extra = -t.shape[dim] % multiple
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, extra]
    return F.pad(t, pad)


def call_forms(gemm: str, x: torch.Tensor, weight: torch.Tensor) -> dict:
    """Return the product x @ weight.T as callables, the model's form first.

    The Δ GEMM's K (4 routes x (rank + 2)) and the x_proj GEMM's N (the same width) are
    also tried zero-padded to multiples of 16 and 64: what a padded x_proj layout would give.
    """
    weight_t = weight.t().contiguous()
    forms = {"linear": lambda: F.linear(x, weight), "mm_kn": lambda: torch.mm(x, weight_t)}
    for multiple in (16, 64):
        if gemm == "delta" and x.shape[1] % multiple:
            xk, wk = padded(x, 1, multiple), padded(weight, 1, multiple)
            forms[f"linear_k{xk.shape[1]}"] = lambda xk=xk, wk=wk: F.linear(xk, wk)
        if gemm == "x_proj" and weight.shape[0] % multiple:
            wn = padded(weight, 0, multiple)
            forms[f"linear_n{wn.shape[0]}"] = lambda wn=wn: F.linear(x, wn)
    return forms


def kernels_of(fn, iters: int = 5) -> dict:
    """Kernel names (launches per call) of ``iters`` replays of ``fn`` captured in a graph."""
    from torch.profiler import ProfilerActivity, profile

    graph = capture_graph(fn)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            graph.replay()
        torch.cuda.synchronize()
    names = collections.Counter(evt.name for evt in prof.events()
                                if evt.device_type == torch.autograd.DeviceType.CUDA)
    return {name[:120]: round(n / iters, 2) for name, n in names.most_common()}


def measure(dtype_name: str, gemm: str, form: str, fn, shape, calls: int) -> dict:
    """Time ``calls`` back-to-back calls of ``fn`` in one graph (per call) and list kernels."""
    def run():
        for _ in range(calls):
            fn()

    timing = time_cuda(run, iters=20, reps=5)
    timing["median_us"] /= calls
    kernels = {name: n / calls for name, n in kernels_of(run).items()}
    memsets = sum(n for name, n in kernels.items() if "Memset" in name)
    row = {"dtype": dtype_name, "gemm": gemm, "form": form, "mkn": list(shape),
           "us": round(timing["median_us"], 2), "memsets": memsets, "kernels": kernels}
    print(f"{dtype_name} {gemm:8s} {form:18s} M,K,N={shape}  {row['us']:7.2f} us  "
          f"memsets {memsets}  {[k for k in kernels if 'Memset' not in k]}", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default="720x1280", help="input HxW")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--calls", type=int, default=20,
                        help="GEMM calls per captured graph (batch 1 is launch-bound alone)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemm_choices.py needs a CUDA GPU")
    h, w = args.size
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for batch in args.batch:
        for stage in args.stages:
            sh, sw = stage_hw(h, w)[stage - 1]
            for gemm, (m, k, n) in gemm_shapes(DIMS[stage - 1], batch * sh * sw).items():
                for dtype_name, dtype in DTYPES.items():
                    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                    weight = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) / k**0.5
                    forms = call_forms(gemm, x, weight)
                    for form, fn in forms.items():
                        rows.append({"batch": batch, "stage": stage,
                                     **measure(dtype_name, gemm, form, fn, (m, k, n),
                                                 args.calls)})
                    if dtype is torch.bfloat16 and gemm == "delta":
                        flag = torch.backends.cuda.matmul
                        before = flag.allow_bf16_reduced_precision_reduction
                        flag.allow_bf16_reduced_precision_reduction = not before
                        try:
                            rows.append({"batch": batch, "stage": stage, **measure(
                                dtype_name, gemm, f"linear_rpr_{not before}".lower(),
                                forms["linear"], (m, k, n), args.calls)})
                        finally:
                            flag.allow_bf16_reduced_precision_reduction = before
    if args.out:
        write_json(args.out, {"provenance": provenance(), "size": f"{h}x{w}", "rows": rows})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
