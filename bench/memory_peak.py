"""What is alive on the GPU at a backbone's memory peak (compiled forward), block by block.

``backbone_speed.py`` reports the peak (``max_memory_allocated`` over one compiled forward);
``activation_memory.py`` estimates the peak without a GPU but with eager lifetimes. This one
runs the compiled forward once with the CUDA caching allocator's history on
(``torch.cuda.memory._record_memory_history``), replays the allocation trace to find the moment
of the peak and lists the blocks alive then: size, and where they were allocated (the line of
inductor's generated code, which names the buffer and the kernel that fills it, and the first
frame of our package). Weights and the input are allocated before the history starts and are
reported in ``before`` with whatever else was alive then (``before_other_mib``: the fp32 copy
of the model that ``backbone_speed.Models`` keeps, cuBLAS's workspace); weights + input +
traced peak is the figure ``backbone_speed.py`` reports as ``peak_mem_mib``.

Usage (GPU)::

    python bench/memory_peak.py --model vmamba_tiny --size 2048x2048 --dtype fp16 \
        --out /tmp/memory_peak.json

``--lowrank-tuning`` replays the peak with another low-rank scan setting (e.g. Δ projected in
the walk above a Δ-map size: ``'{"seq_delta_map_max_bytes": 67108864}'``).
"""

from __future__ import annotations

import argparse
import linecache
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backbone_speed import (  # noqa: E402
    DTYPES,
    Models,
    autocast_step,
    compile_kwargs_for,
    family,
    inputs,
)
from common import (  # noqa: E402
    add_lowrank_tuning_option,
    add_persistent_norms_option,
    apply_lowrank_tuning_option,
    apply_persistent_norms_option,
    compile_model,
    parse_size,
    provenance,
    write_json,
)

MIB = 2 ** 20


def where(frames: list) -> dict:
    """Return the generated-code line and our package's first frame of an allocation."""
    out = {}
    for f in frames:
        name = f.get('filename', '')
        if 'torchinductor' in name and 'generated' not in out:
            line = linecache.getline(name, f.get('line', 0)).strip()
            out['generated'] = line[:160]
        elif ('mamba_perception' in name and 'ours' not in out
              and '/bench/' not in name):
            out['ours'] = f"{os.path.basename(name)}:{f.get('line')} {f.get('name')}"
    return out


def live_at_peak(trace: list) -> tuple[int, list]:
    """Replay alloc / free events; return the peak bytes and the blocks alive at it."""
    live: dict = {}
    total = peak = 0
    at_peak: list = []
    for event in trace:
        action, addr, size = event['action'], event['addr'], event['size']
        if action == 'alloc':
            live[addr] = event
            total += size
            if total > peak:
                peak, at_peak = total, list(live.values())
        elif action == 'free_completed' and addr in live:
            total -= live.pop(addr)['size']
    return peak, at_peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='vmamba_tiny')
    parser.add_argument('--size', default='2048x2048', help='HxW')
    parser.add_argument('--dtype', default='fp16', choices=sorted(DTYPES))
    parser.add_argument('--eager', action='store_true', help='no torch.compile')
    parser.add_argument('--top', type=int, default=30)
    parser.add_argument('--out', default='/tmp/memory_peak.json')
    add_lowrank_tuning_option(parser)
    add_persistent_norms_option(parser)
    args = parser.parse_args(argv)
    lowrank_tuning = apply_lowrank_tuning_option(args)
    inductor_choices = apply_persistent_norms_option(args)
    hw = parse_size(args.size)
    models = Models(seed=0, notes={}, cast_weights=True)
    _, fwd, weights_bytes = models.get(args.model, args.dtype)
    x = inputs(1, hw, 0)
    # compiled as backbone_speed.py's rows: ours as Pipeline, a timm baseline with the defaults
    fn = (fwd if args.eager else
          compile_model(fwd, baseline=family(args.model) == 'timm', dynamic=False,
                        **compile_kwargs_for(args.model, 'compile')))
    step = autocast_step(fn, x, DTYPES[args.dtype])
    step()
    step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=200000)
    out = step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    max_allocated = torch.cuda.max_memory_allocated()
    del out
    trace = [e for dev in snapshot['device_traces'] for e in dev]
    peak, blocks = live_at_peak(trace)
    blocks.sort(key=lambda e: -e['size'])
    rows = [{'mib': round(e['size'] / MIB, 2), **where(e.get('frames', []))}
            for e in blocks[:args.top]]
    result = {
        'provenance': provenance({'ss2d_lowrank_tuning': lowrank_tuning,
                                  'inductor_choices': inductor_choices}),
        'model': args.model, 'size': list(hw), 'dtype': args.dtype,
        'mode': 'eager' if args.eager else 'compile',
        'weights_mib': round(weights_bytes / MIB, 1),
        'input_mib': round(x.nbytes / MIB, 1),
        # before = weights + input + the rest: Models' fp32 copy of the model (it casts a copy),
        # cuBLAS's workspace, caches
        'before_mib': round(before / MIB, 1),
        'before_other_mib': round((before - weights_bytes - x.nbytes) / MIB, 1),
        'max_memory_allocated_mib': round(max_allocated / MIB, 1),
        'traced_peak_mib': round(peak / MIB, 1),
        'live_blocks_at_peak': len(blocks),
        'largest_at_peak': rows,
    }
    print(f"{args.model} {args.size} {result['mode']}: max_memory_allocated "
          f"{result['max_memory_allocated_mib']} MiB = before {result['before_mib']} "
          f"(weights {result['weights_mib']}, input {result['input_mib']}, other "
          f"{result['before_other_mib']}) + traced {result['traced_peak_mib']}; as "
          f"backbone_speed.py counts it: weights + input + traced = "
          f"{result['weights_mib'] + result['input_mib'] + result['traced_peak_mib']:.1f}")
    for r in rows:
        print(f"  {r['mib']:8.2f}  {r.get('generated', '')}  [{r.get('ours', '')}]")
    write_json(args.out, result)
    return 0


if __name__ == '__main__':
    sys.exit(main())
