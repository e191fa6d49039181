"""Benchmark the NHWC depthwise conv + SiLU op against cuDNN on the channels-last view.

VMamba's SS2D block runs ``in_proj -> depthwise conv 3x3 -> SiLU`` on a (B, H, W, C)
activation. For the T/S/B stage shapes at a 1280x720 input (fp16 by default, batch 1), times
in the same run:

* ``ours``: ``dwconv2d_nhwc(x, w, silu=True)`` (Triton; w is the fp32 Conv2d weight, as the
  model holds it under autocast);
* ``cudnn_cl``: what the model does today, ``F.silu(F.conv2d(x.permute(0, 3, 1, 2), w16,
  padding=1, groups=C))`` on the channels-last NCHW view (w16: the weight already in fp16);
* ``cudnn_nchw``: the same on an NCHW-contiguous copy made outside the timing (for context
  only: the layout cuDNN prefers, not what the model has).

Errors: max |ours - cudnn_cl| and each one's max error against an fp32 F.conv2d on the same
fp16 inputs. HBM floor: read x + write y (+ weights), ``2 * B*H*W*C * bytes + C*k*k*4`` at
3.35e12 B/s. ``per_forward_us`` sums each stage's time times its depth (T: 2-2-8-2,
S/B: 2-2-15-2). Timing: ``common.time_cuda`` (CUDA-graph replay).

``--tune`` first sweeps ``mamba_perception_kernels.triton.dwconv.TUNING`` (tile sizes,
num_warps) over all shapes, reports the best config per shape and overall (least summed time
over the shapes every config ran), and applies the overall best to the main table.

Usage: ``python bench/dwconv.py --out bench/results/dwconv_h100.json [--tune] [--quick]
[--batch 1 4] [--dtype fp16 bf16] [--bias]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    HBM_BYTES_PER_S,
    VMAMBA_DEPTHS,
    VMAMBA_STAGE_DIMS,
    parse_size,
    provenance,
    stage_hw,
    time_cuda,
    write_json,
)
import mamba_perception_kernels as K  # noqa: E402
from mamba_perception_kernels.dwconv import dwconv2d_nhwc  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
INPUT_HW = (720, 1280)
MODELS = {m: (VMAMBA_STAGE_DIMS[m], VMAMBA_DEPTHS[m]) for m in VMAMBA_STAGE_DIMS}
KSIZE = 3



def cases(quick, input_hw=INPUT_HW):
    """(model, stage, C, H, W, depth) for every stage of every model (T only with --quick)."""
    out = []
    for model, (dims, depths) in MODELS.items():
        if quick and model != "T":
            continue
        for stage, ((h, w), c, depth) in enumerate(
                zip(stage_hw(*input_hw), dims, depths, strict=True)):
            out.append((model, stage + 1, c, h, w, depth))
    return out


def tune_configs(quick):
    """Launch configs to sweep: tile shape x channel block x warps, 512..16384 elements."""
    tiles = [(1, 16), (1, 32), (2, 16), (2, 32), (4, 8), (4, 16), (4, 32), (8, 8), (8, 16),
             (16, 16)]
    blocks_c = (32, 64, 128, 256) if quick else (16, 32, 64, 128, 256)
    warps = (4,) if quick else (2, 4, 8)
    out = []
    for (bh, bw), bc, nw in itertools.product(tiles, blocks_c, warps):
        if 512 <= bh * bw * bc <= 16384:
            out.append(dict(block_h=bh, block_w=bw, block_c=bc, num_warps=nw))
    return out


def make_inputs(batch, c, h, w, dtype, with_bias):
    x = torch.randn(batch, h, w, c, device="cuda", dtype=dtype)
    weight = torch.randn(c, 1, KSIZE, KSIZE, device="cuda") / KSIZE  # fp32, as the parameter
    bias = torch.randn(c, device="cuda") * 0.1 if with_bias else None
    return x, weight, bias


def _fmt_exc(exc):
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc) else ''}"


def _time(fn, iters):
    """time_cuda, or {'error': ...} (printed) when the call fails."""
    try:
        return time_cuda(fn, iters=iters)
    except Exception as exc:  # noqa: BLE001  (one failing config must not end the sweep)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        print(f"    error: {_fmt_exc(exc)}", flush=True)
        return {"error": _fmt_exc(exc)}


def tune(shapes, batch, dtype, with_bias, iters, quick):
    """Sweep TUNING; apply the overall best; return the sweep's results."""
    from mamba_perception_kernels.triton import dwconv as tdw

    default = dict(tdw.TUNING)
    swept = ("block_h", "block_w", "block_c", "num_warps")
    # Every shape gets the swept tile (no WIDE_TUNING override) while sweeping.
    tdw.TUNING["wide_min_channels"] = 0
    configs = tune_configs(quick)
    print(f"tuning: {len(configs)} configs x {len(shapes)} shapes", flush=True)
    inputs = {s: make_inputs(batch, s[2], s[3], s[4], dtype, with_bias) for s in shapes}
    rows = []
    for cfg in configs:
        tdw.TUNING.update(cfg)
        times = {}
        for s in shapes:
            x, weight, bias = inputs[s]
            key = f"C{s[2]}@{s[3]}x{s[4]}"
            r = _time(lambda x=x, weight=weight, bias=bias: dwconv2d_nhwc(
                x, weight, bias, silu=True), iters)
            times[key] = r.get("median_us")
        ok = all(v is not None for v in times.values())
        rows.append({**cfg, "us": times, "sum_us": sum(times.values()) if ok else None})
        print(f"  {cfg}  sum {rows[-1]['sum_us'] or float('nan'):9.1f} us", flush=True)
    tdw.TUNING.update(default)
    ranked = sorted((r for r in rows if r["sum_us"] is not None), key=lambda r: r["sum_us"])
    per_shape = {}
    for s in shapes:
        key = f"C{s[2]}@{s[3]}x{s[4]}"
        timed = [r for r in rows if r["us"].get(key) is not None]
        if timed:
            best = min(timed, key=lambda r: r["us"][key])
            asked = {k: best[k] for k in swept}
            # What the launcher made of it for this shape (tiles clamped, block_c a divisor).
            per_shape[key] = {**asked, "us": best["us"][key],
                              "effective": tdw.launch_config(s[3], s[4], s[2],
                                                             {**asked, "wide_min_channels": 0})}
    result = {"default": default, "configs": rows, "best_per_shape": per_shape,
              "sum_us_of_best_per_shape": sum(v["us"] for v in per_shape.values())}
    if ranked:
        # applied with TUNING's wide_min_channels as it was (WIDE_TUNING above it)
        best = {k: ranked[0][k] for k in swept}
        tdw.TUNING.update(best)
        result["applied"] = best
        result["applied_sum_us"] = ranked[0]["sum_us"]
        default_row = next((r for r in rows if all(r[k] == default[k] for k in swept)), None)
        if default_row is not None:
            result["default_sum_us"] = default_row["sum_us"]
        print(f"tuned: {best} (sum {ranked[0]['sum_us']:.1f} us; best per shape would sum to "
              f"{result['sum_us_of_best_per_shape']:.1f} us)", flush=True)
        for key, v in per_shape.items():
            print(f"  best for {key}: {v}", flush=True)
    else:
        print("tuning: no config ran on every shape; keeping the defaults", flush=True)
    return result


def run_case(batch, c, h, w, dtype, with_bias, iters):
    x, weight, bias = make_inputs(batch, c, h, w, dtype, with_bias)
    w16 = weight.to(dtype)
    b16 = None if bias is None else bias.to(dtype)
    x_nchw = x.permute(0, 3, 1, 2).contiguous()
    from mamba_perception_kernels.triton import dwconv as tdw

    row = {"launch": tdw.launch_config(h, w, c)}

    def ours():
        return dwconv2d_nhwc(x, weight, bias, silu=True)

    def cudnn_cl():
        return F.silu(F.conv2d(x.permute(0, 3, 1, 2), w16, b16, padding=KSIZE // 2, groups=c))

    def cudnn_nchw():
        return F.silu(F.conv2d(x_nchw, w16, b16, padding=KSIZE // 2, groups=c))

    try:
        ref32 = F.silu(F.conv2d(x.float().permute(0, 3, 1, 2), w16.float(),
                                None if b16 is None else b16.float(), padding=KSIZE // 2,
                                groups=c)).permute(0, 2, 3, 1)
        y_ours, y_cudnn = ours(), cudnn_cl().permute(0, 2, 3, 1)
        row["max_abs_diff_ours_vs_cudnn"] = float((y_ours.float() - y_cudnn.float()).abs().max())
        row["max_abs_err_ours_vs_fp32"] = float((y_ours.float() - ref32).abs().max())
        row["max_abs_err_cudnn_vs_fp32"] = float((y_cudnn.float() - ref32).abs().max())
        row["max_abs_ref"] = float(ref32.abs().max())
        row["ours_output_strides"] = list(y_ours.stride())
        del ref32, y_ours, y_cudnn
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        row["check_error"] = _fmt_exc(exc)
    for name, fn in (("ours", ours), ("cudnn_cl", cudnn_cl), ("cudnn_nchw", cudnn_nchw)):
        row[name] = _time(fn, iters)
    floor_bytes = 2 * batch * h * w * c * x.element_size() + c * KSIZE * KSIZE * 4
    row["hbm_floor_bytes"] = floor_bytes
    row["hbm_floor_us"] = floor_bytes / HBM_BYTES_PER_S * 1e6
    t_ours = row["ours"].get("median_us")
    if t_ours:
        row["ours_over_floor"] = t_ours / row["hbm_floor_us"]
        row["ours_achieved_GBps"] = floor_bytes / t_ours * 1e-3
        for other in ("cudnn_cl", "cudnn_nchw"):
            t = row[other].get("median_us")
            if t:
                row[f"speedup_vs_{other}"] = t / t_ours
    return row


def _us(row, key):
    v = row.get(key, {}).get("median_us")
    return f"{v:9.1f}" if v else "        -"


HEADER = (f"{'model':8s} {'st':>2s} {'C':>5s} {'HxW':>8s} B {'dtype':5s} {'ours':>9s} "
          f"{'cudnn_cl':>9s} {'cudnn_nchw':>10s} {'speedup':>7s} {'floor':>7s} {'x_floor':>7s} "
          f"{'err_ours':>9s} {'err_cudnn':>9s}")


def _line(row):
    err = row.get("max_abs_err_ours_vs_fp32")
    err_c = row.get("max_abs_err_cudnn_vs_fp32")
    return (f"{row['model']:8s} {row['stage']:2d} {row['C']:5d} {row['H']:>3d}x{row['W']:<4d} "
            f"{row['batch']} {row['dtype']:5s} {_us(row, 'ours')} {_us(row, 'cudnn_cl')} "
            f"{_us(row, 'cudnn_nchw'):>10s} {row.get('speedup_vs_cudnn_cl', 0):6.1f}x "
            f"{row['hbm_floor_us']:7.1f} {row.get('ours_over_floor', 0):6.1f}x "
            f"{err if err is not None else float('nan'):9.2e} "
            f"{err_c if err_c is not None else float('nan'):9.2e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/dwconv_h100.json")
    parser.add_argument("--tune", action="store_true", help="sweep TUNING first, apply best")
    parser.add_argument("--quick", action="store_true", help="VMamba-T shapes, smaller sweep")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--dtype", nargs="+", default=["fp16"], choices=sorted(DTYPES))
    parser.add_argument("--bias", action="store_true", help="with a conv bias (VMamba: none)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--input-hw", type=parse_size, default="720x1280",
                        help="the image size whose stage maps are timed (HxW)")
    parser.add_argument("--tuning", default=None,
                        help='JSON object updating TUNING before the table, e.g. '
                             '\'{"wide_min_channels": 0}\'')
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/dwconv.py needs a CUDA GPU")
    from mamba_perception_kernels.triton import dwconv as tdw

    backend = K.backend_name("cuda")
    if backend != "triton":
        print(f"warning: the op's CUDA backend is {backend!r}, not 'triton'", flush=True)
    if args.tuning:
        tdw.TUNING.update(json.loads(args.tuning))
    report = {"hbm_bytes_per_s_assumed": HBM_BYTES_PER_S, "input_hw": list(args.input_hw),
              "ksize": KSIZE, "bias": args.bias,
              "provenance": provenance({"backend": backend}), "cases": []}
    shapes = cases(args.quick, args.input_hw)
    torch.manual_seed(0)
    if args.tune:
        report["tuning"] = tune(shapes, args.batch[0], DTYPES[args.dtype[0]], args.bias,
                                args.iters, args.quick)
        write_json(args.out, report)
    report["launch_config"] = dict(tdw.TUNING)
    print(f"launch config: {tdw.TUNING}", flush=True)
    print(HEADER, flush=True)
    t_start = time.time()
    per_forward = {}
    for dname in args.dtype:
        for batch in args.batch:
            for model, stage, c, h, w, depth in shapes:
                try:
                    row = run_case(batch, c, h, w, DTYPES[dname], args.bias, args.iters)
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    row = {"error": _fmt_exc(exc), "ours": {}, "hbm_floor_us": 0.0}
                row = {"model": f"VMamba-{model}", "stage": stage, "C": c, "H": h, "W": w,
                       "depth": depth, "batch": batch, "dtype": dname, **row}
                report["cases"].append(row)
                print(_line(row), flush=True)
                key = f"VMamba-{model} B{batch} {dname}"
                acc = per_forward.setdefault(key, {"ours": 0.0, "cudnn_cl": 0.0})
                for name in acc:
                    t = row.get(name, {}).get("median_us")
                    acc[name] = acc[name] + depth * t if (t and acc[name] is not None) else None
                write_json(args.out, report)  # partial results survive a timeout
                torch.cuda.empty_cache()
    report["per_forward_us"] = per_forward
    for key, v in per_forward.items():
        print(f"per forward ({key}, sum of depth x stage time): "
              + ", ".join(f"{n} {t:.1f} us" if t is not None else f"{n} -"
                          for n, t in v.items()), flush=True)
    report["wall_s"] = time.time() - t_start
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
