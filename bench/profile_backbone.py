"""Where does a backbone forward spend its GPU time? Kernel-level profile, grouped by kind.

Runs one backbone (batch 1, autocast) under ``torch.profiler`` after warm-up, sums the CUDA
kernel time per kernel name and per kind (GEMM, convolution, selective scan, normalisation,
elementwise / copies, other), and writes the table as JSON. Kernel times do not include launch
gaps, so their sum is what a CUDA-graph replay approaches; the graph-replay time of the same
forward is measured in the same run for comparison.

    python bench/profile_backbone.py --model vmamba_tiny --size 720x1280 --dtype fp16 \
        --out $OUT/profile_vmamba_tiny_720p.json

``--compile`` also profiles ``torch.compile`` of the same forward (inductor, default mode).

``--perception det|seg|detseg`` profiles a whole perception model's dense part instead
(``PerceptionModel.forward_dense`` of a random bundle with ``--model`` as its backbone and the
full heads, as the pipeline and node benchmarks build it) at ``--batch`` frames of ``--size``,
which is then the padded input size (a 1280x720 frame runs at 768x1344 by the bundles' input
policy). The eager variant also splits the kernel time by module (``module_us``: the backbone's
stem, stages and downsamples, the FPN, the RPN head, UperNet, ...; ``other`` = kernels launched
outside them, such as the RPN's pre-NMS selection) and its GEMM / conv work by module
(``module_gflop``, ``torch.utils.flop_counter``), so a user sees which part of the model the
GPU time goes to and how close each part runs to the tensor cores' rate::

    python bench/profile_backbone.py --perception detseg --size 768x1344 --batch 4 --compile \
        --out $OUT/profile_detseg_720p_b4.json
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    PERCEPTION_TASKS,
    add_coarse_fusion_option,
    apply_coarse_fusion_option,
    apply_inductor_config,
    compile_kwargs,
    compile_model,
    provenance,
    time_cuda,
    write_json,
)

KINDS = [  # first match wins; patterns are matched against the lower-cased kernel name
    ('scan', re.compile(r'segment_agg|state_pass|output_kernel|seq_agg|seq_out|state_kernel|'
                        r'ss2d|selective_scan|bidir_scan|bidir_seq')),
    ('gemm', re.compile(r'gemm|sm90_xmma|cutlass|cublas|nvjet|wgmma|matmul|mm_')),
    ('conv', re.compile(r'conv|cudnn|implicit|winograd|depthwise|dgrad|wgrad')),
    ('norm', re.compile(r'layer_norm|layernorm|rms_norm|welford|norm')),
    ('copy/layout', re.compile(r'copy|transpose|permute|cat|contiguous|memcpy|memset')),
    ('elementwise', re.compile(r'elementwise|vectorized|unrolled|triton_poi|triton_red|act|'
                               r'silu|gelu|exp|softplus|add|mul')),
]


def kind_of(name: str) -> str:
    """Kind of a CUDA kernel from its name."""
    low = name.lower()
    for kind, pat in KINDS:
        if pat.search(low):
            return kind
    return 'other'


def build(name: str):
    """Model and the forward to profile (dense features for ours, forward_features for timm)."""
    if name.startswith('timm:'):
        import timm

        model = timm.create_model(name[5:], pretrained=False, num_classes=0,
                                  dynamic_img_size=True)
        return model, model.forward_features
    from mamba_perception.models import create_model

    model = create_model(name)
    return model, model.forward_intermediates


MODULE_RANGE = 'module::'


def build_perception(backbone: str, tasks: str):
    """Random-weight perception model (full heads) and its dense forward, as the benches build."""
    from mamba_perception.models.bundle import create_random_bundle

    bundle = create_random_bundle(backbone=backbone, tasks=PERCEPTION_TASKS[tasks],
                                  num_classes=150 if tasks == 'seg' else 80)
    model = bundle.build_model('cpu')
    return model, model.forward_dense


def perception_modules(model) -> list:
    """Names of the modules whose kernel time ``module_us`` reports (none nested in another)."""
    names = []
    backbone = getattr(model, 'backbone', None)
    if backbone is not None:
        for child in ('patch_embed', 'pos_drop'):
            if hasattr(backbone, child):
                names.append(f'backbone.{child}')
        for i, layer in enumerate(getattr(backbone, 'layers', [])):
            # (the last stage's downsample is an Identity that forward_intermediates skips)
            names += [f'backbone.layers.{i}.{part}' for part in ('blocks', 'downsample')
                      if isinstance(getattr(layer, part, None), torch.nn.Module)
                      and not isinstance(getattr(layer, part), torch.nn.Identity)]
    for name in ('detector.neck', 'detector.rpn.head', 'decode_head'):
        try:
            model.get_submodule(name)
        except AttributeError:
            continue
        names.append(name)
    return names


def around_calls(model, names, enter, leave) -> list:
    """Call ``enter(name)`` / ``leave(name, what enter returned)`` around the modules' calls.

    A stack per module (it may be called inside its own call); returns the hook handles
    (remove them when done). Eager calls only: dynamo would break the graph at the hooks.
    """
    handles = []
    for name in names:
        module = model.get_submodule(name)
        stack = []

        def pre(_module, _args, name=name, stack=stack):
            stack.append(enter(name))

        def post(_module, _args, _out, name=name, stack=stack):
            leave(name, stack.pop())

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def module_ranges(model, names) -> list:
    """Hooks that put each named module's call inside a profiler range; their handles."""
    def enter(name):
        scope = torch.profiler.record_function(MODULE_RANGE + name)
        scope.__enter__()
        return scope

    return around_calls(model, names, enter, lambda _name, scope: scope.__exit__(None, None, None))


def module_flops(model, names, step) -> dict:
    """FLOPs of one ``step()`` inside each named module (``other``: the rest).

    By ``torch.utils.flop_counter``: GEMMs and convolutions; custom ops (the scans) count 0.
    The modules must not nest (``perception_modules``): each one's count is the running total
    at its exit minus that at its entry.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    spent = collections.Counter()

    def leave(name, at_entry):
        spent[name] += counter.get_total_flops() - at_entry

    handles = around_calls(model, names, lambda _name: counter.get_total_flops(), leave)
    try:
        with counter:
            step()
    finally:
        for handle in handles:
            handle.remove()
    out = dict(spent)
    out['other'] = counter.get_total_flops() - sum(spent.values())
    return out


def module_times(events, iters: int, total_us: float, device: bool = True) -> dict:
    """µs per forward inside each module range (``other``: the rest of ``total_us``).

    ``device``: kernel time of each range (CUDA); else its CPU time (what a CPU test can see).
    """
    times = collections.Counter()
    for evt in events:
        if evt.name.startswith(MODULE_RANGE):
            spent = evt.device_time_total if device else evt.cpu_time_total
            times[evt.name[len(MODULE_RANGE):]] += spent / iters
    out = {name: round(us, 1) for name, us in times.items()}
    out['other'] = round(total_us - sum(times.values()), 1)
    return out


def neighbours_of(kernels: list, pattern: str, iters: int) -> list:
    """Which kernels run just before and after each kernel whose name contains ``pattern``.

    ``kernels``: (start time, name) of every kernel launched over ``iters`` forwards. A cuBLAS
    Memset (a split-K GEMM's zeroed output or workspace) says nothing of its GEMM by name; its
    neighbours in launch order do. Returns one row per (before, after) pair, most frequent
    first, with launches per forward.
    """
    names = [name for _, name in sorted(kernels, key=lambda k: k[0])]
    pairs = collections.Counter()
    for i, name in enumerate(names):
        if pattern in name:
            before = names[i - 1] if i > 0 else None
            after = names[i + 1] if i + 1 < len(names) else None
            pairs[before, after] += 1
    return [{'before': b and b[:120], 'after': a and a[:120], 'per_forward': round(n / iters, 2)}
            for (b, a), n in pairs.most_common()]


def profile(fn, iters: int, top_n: int = 40, modules: bool = False) -> dict:
    """Per-kernel CUDA time (µs per forward) of ``fn`` over ``iters`` calls.

    ``modules``: ``fn`` runs with :func:`module_ranges` hooks; ``module_us`` splits the kernel
    time by them.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if modules else [])
    with tprofile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per_kernel = collections.Counter()
    launches = collections.Counter()
    kernels = []
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name] += evt.device_time / iters
            launches[evt.name] += 1 / iters
            kernels.append((evt.time_range.start, evt.name))
    per_kind = collections.Counter()
    for name, us in per_kernel.items():
        per_kind[kind_of(name)] += us
    total = sum(per_kernel.values())
    top = [{'kernel': n[:160], 'kind': kind_of(n), 'us': round(us, 1),
            'launches': round(launches[n], 1)} for n, us in per_kernel.most_common(top_n)]
    row = {'kernel_sum_us': round(total, 1),
           'launches_per_forward': round(sum(launches.values()), 1),
           'per_kind_us': {k: round(v, 1) for k, v in per_kind.most_common()},
           'top_kernels': top}
    memsets = neighbours_of(kernels, 'Memset', iters)
    if memsets:
        row['memset_neighbours'] = memsets
    if modules:
        row['module_us'] = module_times(prof.events(), iters, total)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='vmamba_tiny')
    parser.add_argument('--size', default='720x1280', help='HxW')
    parser.add_argument('--dtype', default='fp16', choices=['fp16', 'bf16'])
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--compile', action='store_true')
    parser.add_argument('--no-eager', action='store_true', help='compiled forward only')
    parser.add_argument('--lowrank-impl', choices=['seq', 'expanded'],
                        help="CUDA implementation of ss2d_scan_lowrank (default: the module's)")
    parser.add_argument('--weights', choices=('cast', 'autocast'), default='cast',
                        help='cast: Linear / Conv weights stored in the dtype once (as '
                             'Pipeline); autocast: fp32 weights cast on every call')
    parser.add_argument('--compile-mode', default=None,
                        help="torch.compile mode, e.g. 'max-autotune-no-cudagraphs'")
    parser.add_argument('--inductor-freezing', action='store_true',
                        help='torch._inductor.config.freezing = True (parameter-only work folded '
                             'into constants at compile time)')
    parser.add_argument('--inductor-config', nargs='+', default=[], metavar='KEY=VALUE',
                        help='torch._inductor.config entries, e.g. coordinate_descent_tuning=true')
    parser.add_argument('--fused-stem', choices=('on', 'off'), default=None,
                        help='VMamba patch embedding as one kernel or as its modules')
    parser.add_argument('--gelu-epilogue', choices=('on', 'off'), default=None,
                        help="VMamba fc1 + GELU as one GEMM with cuBLASLt's GELU epilogue")
    parser.add_argument('--perception', choices=sorted(PERCEPTION_TASKS),
                        help="a perception model's dense part (module docstring) instead of the "
                             'backbone alone')
    parser.add_argument('--batch', type=int, default=1)
    add_coarse_fusion_option(parser)
    parser.add_argument('--top', type=int, default=40, help='kernels listed in the JSON')
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print('profile needs CUDA', file=sys.stderr)
        return 2
    if args.lowrank_impl:
        from mamba_perception_kernels.triton import ss2d_lowrank

        ss2d_lowrank.TUNING['impl'] = args.lowrank_impl
    from mamba_perception.models import vmamba

    if args.fused_stem is not None:
        vmamba.FUSED_STEM = args.fused_stem == 'on'
    if args.gelu_epilogue is not None:
        vmamba.GELU_TANH_EPILOGUE = args.gelu_epilogue == 'on'
    coarse_fusion = apply_coarse_fusion_option(args)
    if args.inductor_freezing:
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True
    inductor_settings = apply_inductor_config(args.inductor_config)
    h, w = (int(v) for v in args.size.split('x'))
    dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    model, fwd = (build_perception(args.model, args.perception) if args.perception
                  else build(args.model))
    model = model.cuda().eval()
    if args.perception:
        # As Pipeline: the heads' conv weights channels-last on CUDA (the backbone hands them
        # channels-last maps)
        for head in (model.detector, model.decode_head):
            if head is not None:
                head.to(memory_format=torch.channels_last)
    if args.weights == 'cast':
        from mamba_perception.models.layers import cast_autocast_weights

        cast_autocast_weights(model, dtype)
    x = torch.randn(args.batch, 3, h, w, device='cuda')

    def runner(f):
        def step():
            with torch.no_grad(), torch.autocast('cuda', dtype=dtype):
                return f(x)
        return step

    result = {'provenance': provenance({'batch': args.batch, 'perception': args.perception,
                                        'upernet_coarse_fusion': coarse_fusion,
                                        'lowrank_impl': args.lowrank_impl,
                                        'weights': args.weights,
                                        'compile_mode': args.compile_mode,
                                        'inductor_freezing': args.inductor_freezing,
                                        'inductor_config': inductor_settings,
                                        'fused_stem': args.fused_stem,
                                        'gelu_epilogue': args.gelu_epilogue}),
              'model': args.model, 'size': [h, w], 'dtype': args.dtype, 'variants': {}}
    variants = [] if args.no_eager else [('eager', fwd)]
    if args.compile:
        baseline = not args.perception and args.model.startswith('timm:')
        variants.append(('compiled', compile_model(fwd, baseline=baseline, **compile_kwargs(
            args.compile_mode, args.inductor_config, baseline=baseline))))
    for label, f in variants:
        step = runner(f)
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        for _ in range(3):
            step()
        hooks = (module_ranges(model, perception_modules(model))
                 if args.perception and label == 'eager' else [])
        row = profile(step, args.iters, args.top, modules=bool(hooks))
        for handle in hooks:
            handle.remove()
        if hooks:  # and what each module asks of the tensor cores, to compare with its time
            row['module_gflop'] = {name: round(flops / 1e9, 3) for name, flops in
                                   module_flops(model, perception_modules(model), step).items()}
        row['first_call_s'] = round(first_s, 2)
        row['graph_replay_ms'] = round(time_cuda(step, iters=20, reps=5)['median_us'] / 1e3, 3)
        result['variants'][label] = row
        print(f'== {args.model} {h}x{w} {args.dtype} {label}: graph {row["graph_replay_ms"]} ms, '
              f'kernel sum {row["kernel_sum_us"]} us, {row["launches_per_forward"]} launches, '
              f'first call {first_s:.1f} s', flush=True)
        print('   per kind (us):', row['per_kind_us'], flush=True)
        if 'module_us' in row:
            print('   per module (us):', row['module_us'], flush=True)
            print('   per module (GFLOP):', row['module_gflop'], flush=True)
        for k in row['top_kernels'][:15]:
            print(f"   {k['us']:8.1f} us x{k['launches']:5.1f} {k['kind']:12s} {k['kernel'][:90]}")
        for m in row.get('memset_neighbours', []):
            print(f"   Memset x{m['per_forward']}: after {m['before']}, before {m['after']}")
        write_json(args.out, result)
    return 0


if __name__ == '__main__':
    sys.exit(main())
