"""Backbone latency and peak memory: VMamba-T/S and Vim-T/S beside timm's ViT-S / DeiT-S.

One question: how long does one frame (batch 1) take through each backbone, and how much GPU
memory does it need, at 224², 512², 1024², 1248² and 1280x720, under fp16 and bf16 autocast?

* Our models run ``forward_intermediates`` (the dense features a detector / segmenter takes:
  4 maps at strides 4-32); timm ViT-S/16 and DeiT-S/16 (``dynamic_img_size=True``, SDPA
  attention, no head) run ``forward_features`` (all 12 blocks). DeiT-S and ViT-S are the same
  network (weights differ), so one is timed; the JSON says so.
* Latency: CUDA-graph replay of one captured forward (``bench.common.time_cuda``), plus eager
  CUDA-event timing for reference. Peak memory: ``max_memory_allocated`` over one eager
  forward, counted from what was allocated before the model was built (weights, input and
  activations), and above the weights and input.
* Correctness guards: each of our models is compared at 224² in fp32 against the same weights on
  the CPU path (relative L2 error), and run at 1920x1080 in fp32 / fp16 / bf16 to check that no
  output is NaN or Inf.

Run on a CUDA machine: ``python bench/backbone.py --out bench/results/backbone_h100.json``.
Needs timm for the ViT baseline (bench only; the package does not use timm).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import provenance, time_cuda, write_json  # noqa: E402

from mamba_perception.models import create_model  # noqa: E402

OURS = ['vmamba_tiny', 'vmamba_small', 'vim_tiny', 'vim_small']
BASELINES = {'vit_small_patch16_224 (= deit_small_patch16_224)': 'vit_small_patch16_224'}
SIZES = [(224, 224), (512, 512), (1024, 1024), (1248, 1248), (720, 1280)]
DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}


def build(name: str):
    if name in BASELINES:
        import timm

        model = timm.create_model(BASELINES[name], pretrained=False, num_classes=0,
                                  dynamic_img_size=True)
        return model, model.forward_features
    model = create_model(name)
    return model, model.forward_intermediates


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_vs_cpu(name: str) -> float:
    """Worst relative L2 error of the 4 GPU feature maps (fp32, 224²) vs the CPU path."""
    torch.manual_seed(0)
    model, _ = build(name)
    model.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model.forward_intermediates(x)
        out = model.cuda().forward_intermediates(x.cuda())
    return max(rel_err(o.cpu(), r) for o, r in zip(out, ref, strict=True))


def finite_at(name: str, dtype: torch.dtype, hw=(1080, 1920)) -> bool:
    torch.manual_seed(0)
    model, fn = build(name)
    model = model.cuda().eval()
    x = torch.randn(1, 3, *hw, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
        outs = fn(x)
        logits = model(x) if name not in BASELINES else None
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    ok = all(bool(torch.isfinite(o).all()) for o in outs)
    return ok and (logits is None or bool(torch.isfinite(logits).all()))


def measure(name: str, hw, dtype: torch.dtype, iters: int) -> dict:
    torch.manual_seed(0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()  # whatever earlier rows left in the allocator
    model, fn = build(name)
    model = model.cuda().eval()
    weights_mib = (torch.cuda.memory_allocated() - before) / 2**20
    x = torch.randn(1, 3, *hw, device='cuda')

    def step():
        with torch.no_grad(), torch.autocast('cuda', dtype=dtype):
            return fn(x)

    step()  # compile kernels, fill caches (Vim position embedding)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    row = {'model': name, 'height': hw[0], 'width': hw[1], 'dtype': str(dtype).split('.')[-1],
           'weights_mib': round(weights_mib, 1),
           'peak_mem_mib': round((peak - before) / 2**20, 1),
           'peak_mem_above_weights_mib': round((peak - weights) / 2**20, 1)}
    try:
        g = time_cuda(step, iters=iters, reps=5, graph=True)
        row['graph_ms'] = round(g['median_us'] / 1e3, 3)
        row['timing'] = g['timing']
    except Exception as exc:  # noqa: BLE001 - record, fall back to eager numbers
        row['graph_ms'] = None
        row['graph_error'] = f'{type(exc).__name__}: {exc}'[:300]
    e = time_cuda(step, iters=max(3, iters // 2), reps=3, graph=False)
    row['eager_ms'] = round(e['median_us'] / 1e3, 3)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='bench/results/backbone_h100.json')
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--models', nargs='*', default=OURS + list(BASELINES))
    parser.add_argument('--dtypes', nargs='*', default=['fp16', 'bf16'])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print('backbone bench needs CUDA', file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    from mamba_perception_kernels import backend_name

    result = {
        'provenance': provenance({'scan_backend': backend_name('cuda'), 'batch': 1,
                                  'tf32': True}),
        'what': ('batch-1 backbone forward under torch.autocast: ours = forward_intermediates '
                 '(4 maps, strides 4-32), ViT = timm forward_features (SDPA attention, '
                 'dynamic_img_size); graph_ms = CUDA-graph replay, eager_ms = CUDA events '
                 'around eager calls; peak_mem = max_memory_allocated over one eager forward'),
        'checks': {}, 'rows': [],
    }
    for name in [m for m in args.models if m not in BASELINES]:
        result['checks'][f'{name}_fp32_224_vs_cpu_rel_l2'] = check_vs_cpu(name)
        for dt in ('fp32', 'fp16', 'bf16'):
            result['checks'][f'{name}_{dt}_1920x1080_finite'] = finite_at(name, DTYPES[dt])
        print(name, {k: v for k, v in result['checks'].items() if k.startswith(name)},
              flush=True)
    for dt in args.dtypes:
        for hw in SIZES:
            for name in args.models:
                try:
                    row = measure(name, hw, DTYPES[dt], args.iters)
                except torch.cuda.OutOfMemoryError as exc:
                    row = {'model': name, 'height': hw[0], 'width': hw[1], 'dtype': dt,
                           'error': f'OOM: {exc}'[:200]}
                    torch.cuda.empty_cache()
                torch.cuda.empty_cache()
                result['rows'].append(row)
                print(f"{dt} {hw[0]}x{hw[1]} {name:50s} graph {row.get('graph_ms')} ms  "
                      f"eager {row.get('eager_ms')} ms  peak {row.get('peak_mem_mib')} MiB",
                      flush=True)
                write_json(args.out, result)
    write_json(args.out, result)
    return 0


if __name__ == '__main__':
    sys.exit(main())
