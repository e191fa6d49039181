"""Benchmark the fused norm + MLP + residual op against what the model ran before it.

Each VMamba block ends with ``x + fc2(gelu(fc1(norm2(x))))`` on the fp32 residual stream.
For the VMamba T/S/B stage shapes that the fused kernel takes (C <= 256) at 1280x720 and
2048x2048 (batch 1, fp16 weights as ``cast_autocast_weights`` leaves them), times in the same
run, both captured in a CUDA graph (``common.time_cuda``):

* ``fused``: ``norm_mlp_residual`` (one Triton kernel);
* ``compiled``: the module path under fp16 autocast through ``torch.compile`` (inductor fuses
  the LayerNorm and the GELU into their neighbours where it can; cuBLAS GEMMs), which is what
  the compiled backbone ran before.

Error: relative L2 of each against float64 modules on the same fp16 weights. HBM floor: read
x + write y in fp32 (``8 * rows * C`` bytes; the weights come from L2) at 3.35e12 B/s; the
GEMM work is ``4 * rows * C * HID`` flop. ``--tune`` first sweeps the kernel's TUNING (tiles,
warps, stages, weight layout) over the shapes, per TUNING width (padded C <= 128, and 256),
and applies the config with the least summed time.

Usage: ``python bench/norm_mlp.py --out bench/results/norm_mlp_h100.json [--tune]``
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import provenance, stage_hw, time_cuda, write_json  # noqa: E402

HBM_BPS = 3.35e12
# (model, dims of the stages the kernel takes, MLP ratio)
MODELS = {'vmamba_tiny': (96, 192), 'vmamba_base': (128, 256)}
SIZES = {'720p': (720, 1280), '2048sq': (2048, 2048)}


def cases():
    out = []
    for model, dims in MODELS.items():
        for size, hw in SIZES.items():
            shapes = stage_hw(*hw)[:len(dims)]
            for stage, (dim, (h, w)) in enumerate(zip(dims, shapes, strict=True)):
                out.append(dict(model=model, size=size, stage=stage + 1, rows=h * w,
                                channels=dim, hidden=4 * dim))
    return out


def make(case, seed=0):
    torch.manual_seed(seed)
    c, hid = case['channels'], case['hidden']
    norm = nn.LayerNorm(c).cuda()
    fc1 = nn.Linear(c, hid).cuda().half()
    fc2 = nn.Linear(hid, c).cuda().half()
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn_like(norm.weight))
    x = torch.randn(1, case['rows'], c, device='cuda')
    return x, norm, fc1, fc2


def run_case(case, iters):
    from mamba_perception_kernels import norm_mlp_residual

    x, norm, fc1, fc2 = make(case)
    args = (x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias)

    def modules(inp):
        with torch.autocast('cuda', dtype=torch.float16, cache_enabled=False):
            return inp + fc2(nn.functional.gelu(fc1(norm(inp))))

    compiled_fn = torch.compile(modules, dynamic=False)
    with torch.no_grad():
        d = torch.float64
        ref = nn.functional.layer_norm(x.to(d), (case['channels'],), norm.weight.to(d),
                                       norm.bias.to(d), norm.eps)
        ref = nn.functional.gelu(nn.functional.linear(ref, fc1.weight.to(d), fc1.bias.to(d)))
        ref = x.to(d) + nn.functional.linear(ref, fc2.weight.to(d), fc2.bias.to(d))
        row = dict(case)
        for name, fn in (('fused', lambda: norm_mlp_residual(*args)),
                         ('compiled', lambda: compiled_fn(x))):
            out = fn()
            row[f'{name}_rel_l2'] = float(f'{float((out.double() - ref).norm() / ref.norm()):.3g}')
            row[f'{name}_us'] = round(time_cuda(fn, iters=iters)['median_us'], 2)
    floor_us = 8 * case['rows'] * case['channels'] / HBM_BPS * 1e6
    row['hbm_floor_us'] = round(floor_us, 2)
    row['gemm_tflop'] = round(4 * case['rows'] * case['channels'] * case['hidden'] / 1e12, 4)
    row['speedup'] = round(row['compiled_us'] / row['fused_us'], 2)
    return row


def width_of(case) -> int:
    """Return the TUNING entry (padded channel width) the kernel uses for ``case``."""
    return 128 if case['channels'] <= 128 else 256


def tune(shapes, width, iters):
    from mamba_perception_kernels import norm_mlp_residual
    from mamba_perception_kernels.triton import norm_mlp

    configs = [dict(block_m=m, block_h=h, num_warps=w, num_stages=s, layout=lay)
               for m, h, w, s, lay in itertools.product((64, 128), (32, 64), (4, 8), (2, 3),
                                                        norm_mlp.LAYOUTS)]
    base = dict(norm_mlp.TUNING[width])
    results = []
    for cfg in configs:
        norm_mlp.TUNING[width].update(cfg)
        total, per = 0.0, []
        try:
            for case in shapes:
                x, norm, fc1, fc2 = make(case)
                args = (x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight,
                        fc2.bias)
                us = time_cuda(lambda a=args: norm_mlp_residual(*a), iters=iters)['median_us']
                per.append(round(us, 2))
                total += us
            results.append({'config': cfg, 'us': per, 'total_us': round(total, 2)})
        except Exception as exc:  # noqa: BLE001 - an infeasible config (registers, smem)
            results.append({'config': cfg, 'error': f'{type(exc).__name__}: {str(exc)[:200]}'})
        print(results[-1], flush=True)
    norm_mlp.TUNING[width].update(base)
    ok = [r for r in results if 'total_us' in r]
    best = min(ok, key=lambda r: r['total_us'])
    return {'width': width,
            'shapes': [{k: c[k] for k in ('model', 'size', 'stage')} for c in shapes],
            'results': results, 'best': best}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='bench/results/norm_mlp_h100.json')
    parser.add_argument('--tune', action='store_true')
    parser.add_argument('--iters', type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print('norm_mlp bench needs CUDA', file=sys.stderr)
        return 2
    from mamba_perception_kernels.triton import norm_mlp

    result = {'provenance': provenance({'command': ' '.join(sys.argv)}), 'rows': []}
    if args.tune:  # per TUNING width, on VMamba-T's shapes
        result['tune'] = []
        for width in (128, 256):
            tiny = [c for c in cases() if c['model'] == 'vmamba_tiny' and width_of(c) == width]
            result['tune'].append(tune(tiny, width, args.iters))
            norm_mlp.TUNING[width].update(result['tune'][-1]['best']['config'])
            print('best', width, result['tune'][-1]['best'], flush=True)
    result['tuning'] = {str(k): dict(v) for k, v in norm_mlp.TUNING.items()}
    for case in cases():
        row = run_case(case, args.iters)
        result['rows'].append(row)
        print(f"{row['model']:12s} {row['size']:7s} stage {row['stage']}: fused "
              f"{row['fused_us']:8.1f} us  compiled {row['compiled_us']:8.1f} us  "
              f"x{row['speedup']:.2f}  floor {row['hbm_floor_us']:.1f}  err "
              f"{row['fused_rel_l2']:.2g}/{row['compiled_rel_l2']:.2g}", flush=True)
        write_json(args.out, result)
    return 0


if __name__ == '__main__':
    sys.exit(main())
