"""VMamba's patch embedding: the fused ``conv_norm_stem`` op vs its compiled modules (GPU).

Times the op (each launch configuration of ``--tune``, or TUNING as it is) and
``torch.compile`` of the modules (``PatchEmbedV2`` with ``FUSED_STEM`` off) on the same weights,
fp16 weights and autocast as Pipeline runs them, batch 1 (or ``--batch``), CUDA-graph replays;
checks each configuration against the modules. VMamba-T widths (48 -> 96) unless ``--dim``.

    python bench/stem.py --tune --out $OUT/stem_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    best_launch_config,
    parse_size,
    provenance,
    time_cuda,
    time_launch_config,
    write_json,
)

SIZES = [(720, 1280), (2048, 2048)]


def candidates():
    """Launch configurations swept by ``--tune`` (TUNING keys of triton/stem.py)."""
    return [dict(block_m=m, block_m_conv1=m1, num_warps=w)
            for m, m1, w in ((64, 128, 4), (128, 128, 4), (256, 128, 8), (128, 64, 4),
                             (128, 256, 4), (64, 64, 4))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dim', type=int, default=96, help='stage-1 channels (C2)')
    parser.add_argument('--batch', type=int, default=1, help='images per call')
    parser.add_argument('--sizes', nargs='+', type=parse_size, default=SIZES,
                        help='HxW sizes (default: 720x1280 2048x2048)')
    parser.add_argument('--tune', action='store_true', help='sweep launch configurations')
    parser.add_argument('--candidates', default=None,
                        help='JSON list of TUNING overrides swept instead of the built-in list '
                             '(with --tune)')
    parser.add_argument('--no-modules', action='store_true', help='skip the compiled modules')
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print('bench/stem.py needs CUDA', file=sys.stderr)
        return 2
    from mamba_perception_kernels.triton import stem

    from mamba_perception.models import vmamba
    from mamba_perception.models.layers import cast_autocast_weights

    torch.manual_seed(0)
    module = cast_autocast_weights(vmamba.PatchEmbedV2(3, args.dim).cuda().eval(), torch.float16)
    with torch.no_grad():  # non-trivial norms, so the check means something
        for i in (2, 7):
            module[i].weight.normal_(1.0, 0.2)
            module[i].bias.normal_(0.0, 0.1)
    c1, n1, c2, n2 = module[0], module[2], module[5], module[7]
    weights = (c1.weight, c1.bias, n1.weight, n1.bias, n1.eps, c2.weight, c2.bias, n2.weight,
               n2.bias, n2.eps)
    report = {'provenance': provenance({'dim': args.dim, 'dtype': 'fp16', 'batch': args.batch}),
              'what': 'conv_norm_stem (Triton, per launch configuration) vs torch.compile of '
                      'the modules; CUDA-graph replays, median us; rel_l2 vs the modules',
              'sizes': {}}
    configs = ((json.loads(args.candidates) if args.candidates else candidates()) if args.tune
               else [dict(stem.TUNING)])
    for h, w in args.sizes:
        x = torch.randn(args.batch, 3, h, w, device='cuda')
        vmamba.FUSED_STEM = False
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.float16):
            ref = module(x).float()
        rows = []
        if not args.no_modules:
            compiled = torch.compile(module)

            def run_modules(compiled=compiled, x=x):
                with torch.no_grad(), torch.autocast('cuda', dtype=torch.float16):
                    return compiled(x)
            run_modules()
            rows.append({'variant': 'compiled modules',
                         'us': time_cuda(run_modules, iters=20, reps=5)['median_us']})
            print(f'{h}x{w} compiled modules: {rows[-1]["us"]:.1f} us', flush=True)
        for cfg in configs:
            cfg = {**stem.TUNING, **cfg}

            def run(cfg=cfg, x=x):
                return stem.conv_norm_stem_fwd(x, *weights, config=cfg)
            rows.append(time_launch_config(run, ref, cfg))
            if 'us' in rows[-1]:
                print(f'{h}x{w} {cfg}: {rows[-1]["us"]:.1f} us, rel L2 {rows[-1]["rel_l2"]:.2e}, '
                      f'first call {rows[-1]["first_call_s"]:.1f} s', flush=True)
        report['sizes'][f'{h}x{w}'] = rows
        write_json(args.out, report)
    if args.tune:  # best by the sum over the sizes
        report['best'], total = best_launch_config(report['sizes'].values(), stem.TUNING)
        print('best:', report['best'], f'{total:.1f} us summed', flush=True)
        write_json(args.out, report)
    return 0


if __name__ == '__main__':
    sys.exit(main())
