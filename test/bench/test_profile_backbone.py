"""bench/profile_backbone.py --perception: which modules the kernel time is split by, and how."""

from bench_modules import load
import torch
from torch.profiler import ProfilerActivity, profile

profile_backbone = load('profile_backbone')


def _model(tasks):
    torch.manual_seed(0)
    model, forward = profile_backbone.build_perception('vmamba_test', tasks)
    return model.eval(), forward


def test_perception_modules_cover_backbone_and_heads_without_nesting():
    model, _ = _model('detseg')
    names = profile_backbone.perception_modules(model)
    assert names[0] == 'backbone.patch_embed'
    assert {'detector.neck', 'detector.rpn.head', 'decode_head'} <= set(names)
    stages = len(model.backbone.layers)
    assert sum(n.endswith('.blocks') for n in names) == stages
    # a range inside another would count its kernels twice
    assert not [(a, b) for a in names for b in names if b.startswith(a + '.')]
    seg_only, _ = _model('seg')
    seg_names = profile_backbone.perception_modules(seg_only)
    assert 'decode_head' in seg_names and not any(n.startswith('detector') for n in seg_names)


def test_module_ranges_time_each_module_and_are_removed():
    model, forward = _model('detseg')
    names = profile_backbone.perception_modules(model)
    x = torch.randn(1, 3, 64, 96)
    handles = profile_backbone.module_ranges(model, names)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            forward(x)
    for handle in handles:
        handle.remove()
    events = prof.events()
    inside = profile_backbone.module_times(events, 2, total_us=0.0, device=False)
    assert set(inside) == set(names) | {'other'}
    assert all(inside[n] > 0 for n in names), inside
    # other = the total minus what the ranges hold
    times = profile_backbone.module_times(events, 2, total_us=1e6, device=False)
    assert abs(times['other'] - (1e6 - sum(inside[n] for n in names))) < 1.0
    # one range per call of its module and iteration
    assert sum(e.name == profile_backbone.MODULE_RANGE + 'decode_head' for e in events) == 2
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as after:
        forward(x)
    assert not [e for e in after.events() if e.name.startswith(profile_backbone.MODULE_RANGE)]


def test_module_flops_split_the_forward_by_module():
    from torch.utils.flop_counter import FlopCounterMode

    model, forward = _model('detseg')
    names = profile_backbone.perception_modules(model)
    x = torch.randn(1, 3, 64, 96)

    def step():
        with torch.no_grad():
            forward(x)

    split = profile_backbone.module_flops(model, names, step)
    total = FlopCounterMode(display=False)
    with total:
        step()
    assert set(split) == set(names) | {'other'}
    assert sum(split.values()) == total.get_total_flops() and split['other'] >= 0
    # UperNet's 3x3 convs dominate its count; the RPN head is one 3x3 conv + two 1x1s
    assert split['decode_head'] > split['detector.rpn.head'] > 0
    # the hooks are gone: a second split counts the same
    assert profile_backbone.module_flops(model, names, step) == split
    assert not model.decode_head._forward_hooks and not model.decode_head._forward_pre_hooks


def test_neighbours_of_names_the_kernels_around_each_match_in_launch_order():
    # (start, name) as the profiler lists them: not in launch order
    kernels = [(30, 'gemm_a'), (10, 'norm'), (20, 'Memset (Device)'), (50, 'Memset (Device)'),
               (60, 'gemm_b'), (40, 'scan'), (120, 'gemm_a'), (110, 'Memset (Device)'),
               (100, 'norm')]
    rows = profile_backbone.neighbours_of(kernels, 'Memset', iters=2)
    assert rows == [
        {'before': 'norm', 'after': 'gemm_a', 'per_forward': 1.0},
        {'before': 'scan', 'after': 'gemm_b', 'per_forward': 0.5},
    ]
    assert profile_backbone.neighbours_of([(0, 'Memset'), (1, 'x')], 'Memset', 1) == [
        {'before': None, 'after': 'x', 'per_forward': 1.0}]
    assert profile_backbone.neighbours_of(kernels, 'nothing', 2) == []
