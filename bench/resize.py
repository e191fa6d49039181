"""UperNet's coarse fusion: the ``resize_tap_sum`` kernel per launch configuration (GPU).

Times the op (each launch configuration of ``--tune``, or TUNING as it is) on the shapes
UPerHead gives it for a 1280x720 frame (input 768x1344: base 192x336, taps at 96x168, 48x84 and
24x42, 512 channels, 9 x 512 tap channels), fp16 channels-last, the folded BatchNorm and ReLU,
batch 1 and 4, CUDA-graph replays; checks each configuration against the op's PyTorch path
(rel L2) and reports the HBM floor (one read of base and the taps, one write).

    python bench/resize.py --tune --out $OUT/resize_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    HBM_BYTES_PER_S,
    best_launch_config,
    provenance,
    time_launch_config,
    write_json,
)

CHANNELS = 512
BASE_HW = (192, 336)  # stride 4 of a 768x1344 input


def candidates():
    """Launch configurations swept by ``--tune`` (TUNING keys of triton/resize.py)."""
    return [dict(block_p=p, block_c=c, num_warps=w)
            for p, c, w in ((32, 64, 4), (16, 128, 4), (32, 128, 4), (64, 64, 4),
                            (64, 128, 8), (128, 64, 8), (32, 256, 8), (16, 256, 4),
                            (64, 32, 4), (128, 32, 4), (32, 32, 2), (16, 64, 2),
                            (64, 256, 8), (256, 32, 8), (8, 512, 8), (128, 128, 8))]


def inputs(batch: int):
    """Return base, the three tap maps, scale and shift as UPerHead passes them."""
    h, w = BASE_HW
    gen = torch.Generator(device='cuda').manual_seed(batch)

    def rand(*shape):
        x = torch.randn(*shape, device='cuda', generator=gen, dtype=torch.float16)
        return x.contiguous(memory_format=torch.channels_last)

    base = rand(batch, CHANNELS, h, w)
    taps = [rand(batch, 9 * CHANNELS, h // s, w // s) for s in (2, 4, 8)]
    scale = torch.rand(CHANNELS, device='cuda', generator=gen) + 0.5
    shift = torch.randn(CHANNELS, device='cuda', generator=gen) * 0.1
    return base, taps, scale, shift


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 4])
    parser.add_argument('--tune', action='store_true', help='sweep launch configurations')
    parser.add_argument('--candidates', default=None,
                        help='JSON list of TUNING overrides swept instead of the built-in list '
                             '(with --tune)')
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print('bench/resize.py needs CUDA', file=sys.stderr)
        return 2
    from mamba_perception_kernels.resize import resize_tap_sum_torch
    from mamba_perception_kernels.triton import resize

    report = {'provenance': provenance({'channels': CHANNELS, 'base_hw': BASE_HW,
                                        'dtype': 'fp16'}),
              'what': 'resize_tap_sum (Triton, per launch configuration), three levels, '
                      'folded BatchNorm + ReLU; CUDA-graph replays, median us; rel_l2 vs the '
                      'PyTorch path; floor_us = bytes of one read of the inputs and one '
                      f'write at {HBM_BYTES_PER_S / 1e9:.0f} GB/s',
              'batches': {}}
    configs = ((json.loads(args.candidates) if args.candidates else candidates()) if args.tune
               else [{}])
    for batch in args.batches:
        base, taps, scale, shift = inputs(batch)
        ref = resize_tap_sum_torch(base, taps, scale, shift, True).float()
        moved = 2 * base.numel() * base.element_size() + sum(
            t.numel() * t.element_size() for t in taps)
        rows = [{'variant': 'floor', 'bytes': moved, 'us': moved / HBM_BYTES_PER_S * 1e6}]
        for cfg in configs:
            cfg = {**resize.TUNING, **cfg}

            def run(cfg=cfg, args=(base, taps, scale, shift)):
                return resize.resize_tap_sum_fwd(*args, True, config=cfg)
            rows.append(time_launch_config(run, ref, cfg))
            if 'us' in rows[-1]:
                print(f'batch {batch} {cfg}: {rows[-1]["us"]:.1f} us '
                      f'({rows[-1]["us"] / rows[0]["us"]:.1f}x floor), rel L2 '
                      f'{rows[-1]["rel_l2"]:.2e}, first call {rows[-1]["first_call_s"]:.1f} s',
                      flush=True)
        report['batches'][str(batch)] = rows
        write_json(args.out, report)
    if args.tune:  # best by the sum over the batches
        report['best'], total = best_launch_config(report['batches'].values(), resize.TUNING)
        print('best:', report['best'], f'{total:.1f} us summed', flush=True)
        write_json(args.out, report)
    return 0


if __name__ == '__main__':
    sys.exit(main())
