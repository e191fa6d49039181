"""bench/activation_memory.py: the live-bytes counter on known allocations, and on a model."""

import gc

from bench_modules import load
import torch

memory = load('activation_memory')
MIB = 2 ** 20


def test_live_bytes_counts_storages_once_and_releases_them():
    with memory.LiveBytes() as live:
        a = torch.empty(MIB, dtype=torch.uint8)
        view = a.view(1024, 1024)[::2]  # a view of a: no new bytes
        b = torch.ones(MIB, dtype=torch.float16)  # 2 MiB
        assert live.live == 3 * MIB
        del a, view
        gc.collect()
        assert live.live == 2 * MIB
        c = b + 1  # a new 2 MiB output
        assert live.live == 4 * MIB
        del b, c
        gc.collect()
    assert live.peak == 4 * MIB and live.live == 0
    assert live.peak_trace[-1][:3] == ('add', [MIB], 'float16')


def test_live_bytes_counts_fake_tensors_by_storage():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), memory.LiveBytes() as live:
        a = torch.empty(MIB, dtype=torch.uint8)
        b = torch.empty(MIB, dtype=torch.uint8)  # fake storages have no addresses to tell apart
        c = a[::2]  # but a view shares its base's storage
        assert live.live == 2 * MIB
        del a, b, c
        gc.collect()
        assert live.live == 0


def test_measure_reports_the_model_peak():
    from mamba_perception.models import create_model
    from mamba_perception.models.layers import cast_autocast_weights

    def build():
        return cast_autocast_weights(create_model('vmamba_test', num_classes=0).eval(),
                                     torch.bfloat16)

    small = memory.measure(build, (128, 192))
    large = memory.measure(build, (256, 384))
    for r in (small, large):
        # the four kept maps are alive at the end, so the peak holds at least them
        assert 0 < r['outputs_mib'] <= r['activation_peak_mib']
        assert r['ops_up_to_peak']
        # under autocast the maps come out in its dtype (VSSM.forward_intermediates)
        assert [dtype for _, dtype in r['outputs']] == ['bfloat16'] * 4
    # activations grow with the pixels (4x here), not the parameters
    assert 3 < large['activation_peak_mib'] / small['activation_peak_mib'] < 5
    assert large['params_mib'] == small['params_mib']
    # 16 x 24 stride-4 positions x 16 channels x 2 bytes, and so on down the stages
    assert small['outputs_mib'] == round(sum(
        (128 // s) * (192 // s) * c * 2 for s, c in ((4, 16), (8, 32), (16, 64), (32, 128)))
        / MIB, 2)
