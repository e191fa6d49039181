"""Benchmark the fused pre-norm ops against what the model runs without them.

``--ops mlp`` (default): each VMamba block ends with ``x + fc2(gelu(fc1(norm2(x))))`` on the
fp32 residual stream; ``--ops linear``: its SS2D mixer ends with ``x +
out_proj(out_norm(y))`` on the scan's fp32 output (no bias; d_inner = C for T, 2C for S/B). For
the VMamba T/S/B stage shapes the fused kernels take (C <= 256) at 1280x720 and 2048x2048
(batch 1, fp16 weights as ``cast_autocast_weights`` leaves them), times in the same run, both
captured in a CUDA graph (``common.time_cuda``):

* ``fused``: ``norm_mlp_residual`` / ``norm_linear_residual`` (one Triton kernel);
* ``compiled``: the module path under fp16 autocast through ``torch.compile`` (inductor fuses
  the LayerNorm and the GELU into their neighbours where it can; cuBLAS GEMMs), which is what
  the compiled backbone runs without the fused op.

Error: relative L2 of each against float64 modules on the same fp16 weights. HBM floor: read
x + write y in fp32 (``8 * rows * C`` bytes, plus the residual's 4 for ``linear``; the weights
come from L2) at 3.35e12 B/s; the GEMM work is ``4 * rows * C * HID`` (``2 * rows * K * C``)
flop. The file written before the linear op existed (``norm_mlp_h100.json``) was made by this
script under its old name, ``bench/norm_mlp.py``. ``--tune`` first sweeps the MLP kernel's
TUNING (tiles, warps, stages, weight layout) over the shapes, per TUNING width (padded
C <= 128, and 256), and applies the config with the least summed time. (``--ops fc1``, the
MLP split after a Triton norm -> fc1 -> GELU kernel, was removed at stop 19: the split MLP is
now cuBLASLt's GELU epilogue, ``layers.linear_gelu_tanh``; its rows are in ``prenorm_h100.json``.)

Usage: ``python bench/prenorm.py --out bench/results/prenorm_h100.json [--tune]
[--ops mlp linear]``
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
                out.append(dict(op='mlp', model=model, size=size, stage=stage + 1,
                                rows=h * w, channels=dim, hidden=4 * dim))
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


def compare(case, ref, fused, compiled, iters) -> dict:
    """Row of ``case`` with each path's relative L2 error against ``ref`` and its time."""
    row = dict(case)
    with torch.no_grad():
        for name, fn in (('fused', fused), ('compiled', compiled)):
            out = fn()
            err = float((out.double() - ref).norm() / ref.norm())
            row[f'{name}_rel_l2'] = float(f'{err:.3g}')
            row[f'{name}_us'] = round(time_cuda(fn, iters=iters)['median_us'], 2)
    row['speedup'] = round(row['compiled_us'] / row['fused_us'], 2)
    return row


def mlp_baseline(case):
    """Return ``(x, norm, fc1, fc2, compiled, ref)`` of one MLP case.

    ``compiled``: the block as compiled modules (fp16 autocast); ``ref``: its fp64 reference.
    Every MLP row compares against these two.
    """
    x, norm, fc1, fc2 = make(case)

    def modules(inp):
        with torch.autocast('cuda', dtype=torch.float16, cache_enabled=False):
            return inp + fc2(nn.functional.gelu(fc1(norm(inp))))

    with torch.no_grad():
        d = torch.float64
        ref = nn.functional.layer_norm(x.to(d), (case['channels'],), norm.weight.to(d),
                                       norm.bias.to(d), norm.eps)
        ref = nn.functional.gelu(nn.functional.linear(ref, fc1.weight.to(d), fc1.bias.to(d)))
        ref = x.to(d) + nn.functional.linear(ref, fc2.weight.to(d), fc2.bias.to(d))
    return x, norm, fc1, fc2, torch.compile(modules, dynamic=False), ref


def run_case(case, iters):
    from mamba_perception_kernels import norm_mlp_residual

    x, norm, fc1, fc2, compiled_fn, ref = mlp_baseline(case)
    args = (x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    row = compare(case, ref, lambda: norm_mlp_residual(*args), lambda: compiled_fn(x), iters)
    floor_us = 8 * case['rows'] * case['channels'] / HBM_BPS * 1e6
    row['hbm_floor_us'] = round(floor_us, 2)
    row['gemm_tflop'] = round(4 * case['rows'] * case['channels'] * case['hidden'] / 1e12, 4)
    return row


# (model, stage, d_inner K, channels C) of the SS2D tails the linear kernel takes (K <= 256)
LINEAR_SHAPES = [('vmamba_tiny', 1, 96, 96), ('vmamba_tiny', 2, 192, 192),
                 ('vmamba_small', 1, 192, 96), ('vmamba_base', 1, 256, 128)]


def linear_cases():
    out = []
    for model, stage, k, c in LINEAR_SHAPES:
        for size, hw in SIZES.items():
            h, w = stage_hw(*hw)[stage - 1]
            out.append(dict(op='linear', model=model, size=size, stage=stage, rows=h * w,
                            d_inner=k, channels=c))
    return out


def run_linear_case(case, iters):
    from mamba_perception_kernels import norm_linear_residual

    torch.manual_seed(0)
    k, c = case['d_inner'], case['channels']
    norm = nn.LayerNorm(k).cuda()
    proj = nn.Linear(k, c, bias=False).cuda().half()
    y = torch.randn(1, case['rows'], k, device='cuda')
    x = torch.randn(1, case['rows'], c, device='cuda')
    args = (y, norm.weight, norm.bias, norm.eps, proj.weight, None, x)

    def modules(y_in, x_in):
        with torch.autocast('cuda', dtype=torch.float16, cache_enabled=False):
            return x_in + proj(norm(y_in).to(torch.float16))

    compiled_fn = torch.compile(modules, dynamic=False)
    with torch.no_grad():
        d = torch.float64
        ref = nn.functional.layer_norm(y.to(d), (k,), norm.weight.to(d), norm.bias.to(d),
                                       norm.eps)
        ref = x.to(d) + nn.functional.linear(ref, proj.weight.to(d))
    row = compare(case, ref, lambda: norm_linear_residual(*args), lambda: compiled_fn(y, x),
                  iters)
    row['hbm_floor_us'] = round(4 * case['rows'] * (k + 2 * c) / HBM_BPS * 1e6, 2)
    return row


def width_of(case) -> int:
    """Return the TUNING entry (padded channel width) the kernel uses for ``case``."""
    return 128 if case['channels'] <= 128 else 256


def sweep(table, configs, shapes, op, op_args, iters, name):
    """Time ``op`` on every shape under each config of ``table`` (a TUNING entry, restored).

    ``op_args(case)`` builds the op's arguments. Returns every config's per-shape and summed
    times (or its error: an infeasible config) and the best.
    """
    base = dict(table)
    results = []
    for cfg in configs:
        table.update(cfg)
        total, per = 0.0, []
        try:
            for case in shapes:
                args = op_args(case)
                us = time_cuda(lambda a=args: op(*a), iters=iters)['median_us']
                per.append(round(us, 2))
                total += us
            results.append({'config': cfg, 'us': per, 'total_us': round(total, 2)})
        except Exception as exc:  # noqa: BLE001 - an infeasible config (registers, smem)
            results.append({'config': cfg, 'error': f'{type(exc).__name__}: {str(exc)[:200]}'})
        print(name, results[-1], flush=True)
    table.update(base)
    best = min((r for r in results if 'total_us' in r), key=lambda r: r['total_us'])
    return {'op': name, 'shapes': [{k: c[k] for k in ('model', 'size', 'stage')} for c in shapes],
            'results': results, 'best': best}


def tune(shapes, width, iters):
    """Sweep the fused MLP's TUNING[width] (tiles, warps, stages, weight layout)."""
    from mamba_perception_kernels import norm_mlp_residual
    from mamba_perception_kernels.triton import prenorm

    def op_args(case):
        x, norm, fc1, fc2 = make(case)
        return (x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight,
                fc2.bias)

    configs = [dict(block_m=m, block_h=h, num_warps=w, num_stages=s, layout=lay)
               for m, h, w, s, lay in itertools.product((64, 128), (32, 64), (4, 8), (2, 3),
                                                        prenorm.LAYOUTS)]
    return {'width': width, **sweep(prenorm.TUNING[width], configs, shapes, norm_mlp_residual,
                                    op_args, iters, 'mlp')}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='bench/results/prenorm_h100.json')
    parser.add_argument('--tune', action='store_true', help='sweep the MLP kernel first')
    parser.add_argument('--ops', nargs='+', choices=('mlp', 'linear'), default=['mlp'])
    parser.add_argument('--iters', type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print('the prenorm bench needs CUDA', file=sys.stderr)
        return 2
    from mamba_perception_kernels.triton import prenorm

    result = {'provenance': provenance({'command': ' '.join(sys.argv)}), 'rows': []}
    if args.tune:  # per TUNING width, on VMamba-T's shapes
        result['tune'] = []
        for width in (128, 256):
            tiny = [c for c in cases() if c['model'] == 'vmamba_tiny' and width_of(c) == width]
            if 'mlp' in args.ops:
                result['tune'].append(tune(tiny, width, args.iters))
                prenorm.TUNING[width].update(result['tune'][-1]['best']['config'])
                print('best', width, result['tune'][-1]['best'], flush=True)
    result['tuning'] = {str(k): dict(v) for k, v in prenorm.TUNING.items()}
    todo = ([(c, run_case) for c in cases()] if 'mlp' in args.ops else []) + (
        [(c, run_linear_case) for c in linear_cases()] if 'linear' in args.ops else [])
    for case, run in todo:
        row = run(case, args.iters)
        result['rows'].append(row)
        print(f"{row['op']:6s} {row['model']:12s} {row['size']:7s} stage {row['stage']}: fused "
              f"{row['fused_us']:8.1f} us  compiled {row['compiled_us']:8.1f} us  "
              f"x{row['speedup']:.2f}  floor {row['hbm_floor_us']:.1f}  err "
              f"{row['fused_rel_l2']:.2g}/{row['compiled_rel_l2']:.2g}", flush=True)
        write_json(args.out, result)
    return 0


if __name__ == '__main__':
    sys.exit(main())
