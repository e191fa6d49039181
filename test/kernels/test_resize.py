"""resize_tap_sum (UperNet's fusion conv done coarse): PyTorch path, errors, Triton kernel.

The Triton tests (``test_triton_kernel_*``) need CUDA or the Triton interpreter; without a GPU
``test_triton_kernels_under_interpreter`` reruns them in a subprocess with
``TRITON_INTERPRET=1`` (see conftest.py for why not in-process).
"""

from mamba_perception_kernels import ScanInputError, resize_tap_sum
from mamba_perception_kernels.resize import resize_tap_sum_op, resize_tap_sum_torch
import pytest
import torch
import torch.nn.functional as F
from triton_tests import (
    HAS_TRITON,
    TRITON_DEVICE,
    needs_triton_device,
    only_without_gpu,
    run_under_interpreter,
)


def per_tap(x, weight):
    """The nine 1x1 products of a 3x3 conv weight at x's resolution, tap-major channels."""
    out_channels, in_channels = weight.shape[:2]
    return F.conv2d(x, weight.permute(2, 3, 0, 1).reshape(9 * out_channels, in_channels, 1, 1))


def conv_of_resized(x, weight, size):
    """The definition: the 3x3 conv (padding 1) of x resized bilinearly to ``size``."""
    resized = F.interpolate(x, size=size, mode='bilinear', align_corners=False)
    return F.conv2d(resized, weight, padding=1)


def levels(size, channels=5, in_channels=6, batch=2, divisors=((2, 2), (4, 4), (8, 8)),
           dtype=torch.float64, seed=0):
    """Coarse maps for ``size`` at each divisor (ceil) and one 3x3 weight per level."""
    gen = torch.Generator().manual_seed(seed)
    maps = [torch.randn(batch, in_channels, -(-size[0] // dy), -(-size[1] // dx),
                        generator=gen, dtype=dtype) for dy, dx in divisors]
    weights = [torch.randn(channels, in_channels, 3, 3, generator=gen, dtype=dtype)
               for _ in divisors]
    return maps, weights


@pytest.mark.parametrize('size', [(20, 28), (17, 23), (8, 3)])  # even, odd, fewer than 9 px
def test_torch_path_is_the_conv_of_the_resized_maps(size):
    maps, weights = levels(size)
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2, 5, *size, generator=gen, dtype=torch.float64)
    want = base + sum(conv_of_resized(x, w, size) for x, w in zip(maps, weights, strict=True))
    got = resize_tap_sum(base, [per_tap(x, w) for x, w in zip(maps, weights, strict=True)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.is_contiguous(memory_format=torch.channels_last)
    # a transposed kernel (taps in the wrong places) is far off: the check above can fail
    wrong = resize_tap_sum(base, [per_tap(x, w.transpose(-1, -2))
                                  for x, w in zip(maps, weights, strict=True)])
    assert (wrong - want).abs().max() > 1e-2


def test_affine_and_relu_come_after_the_sum():
    maps, weights = levels((12, 16), divisors=((2, 2),))
    base = torch.randn(2, 5, 12, 16, dtype=torch.float64)
    scale = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)
    shift = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    total = base + conv_of_resized(maps[0], weights[0], (12, 16))
    want = (total * scale[:, None, None] + shift[:, None, None]).clamp_min(0)
    got = resize_tap_sum(base, [per_tap(maps[0], weights[0])], scale, shift, relu=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got == 0).any() and (got > 0).any()


def test_16_bit_inputs_are_summed_in_fp32_and_rounded_once():
    maps, weights = levels((16, 24), dtype=torch.float32)
    base = torch.randn(2, 5, 16, 24).half()
    taps = [per_tap(x, w).half() for x, w in zip(maps, weights, strict=True)]
    want = resize_tap_sum_torch(base.double(), [t.double() for t in taps], None, None, False)
    got = resize_tap_sum(base, taps)
    assert got.dtype == torch.float16
    # one rounding of the fp32 sum: within half an fp16 ulp (2^-11 relative) of the exact sum
    err = (got.double() - want).abs() / want.abs().clamp_min(1.0)
    assert float(err.max()) <= 2 ** -11


@pytest.mark.parametrize('change, message', [
    (lambda a: {**a, 'base': a['base'][0]}, 'base must be a torch.Tensor of shape'),
    (lambda a: {**a, 'taps': []}, 'taps must be a list of 1 to 3'),
    (lambda a: {**a, 'taps': a['taps'] * 4}, 'taps must be a list of 1 to 3'),
    (lambda a: {**a, 'taps': [a['taps'][0][:, :-1]]}, r'taps\[0\] must have shape'),
    (lambda a: {**a, 'taps': [a['taps'][0].float()]}, r'taps\[0\] must have dtype'),
    (lambda a: {**a, 'taps': [a['taps'][0][:, :, :0]]}, 'empty map'),
    (lambda a: {**a, 'shift': None}, 'scale and shift go together'),
    (lambda a: {**a, 'scale': a['scale'][:-1]}, 'scale must have shape'),
])
def test_invalid_inputs_are_named(change, message):
    maps, weights = levels((8, 8), divisors=((2, 2),))
    args = {'base': torch.zeros(2, 5, 8, 8, dtype=torch.float64),
            'taps': [per_tap(maps[0], weights[0])],
            'scale': torch.ones(5, dtype=torch.float64),
            'shift': torch.zeros(5, dtype=torch.float64)}
    args = change(args)
    with pytest.raises(ScanInputError, match=message):
        resize_tap_sum(args['base'], args['taps'], args['scale'], args['shift'])


def test_fake_impl_and_schema():
    maps, weights = levels((9, 14), dtype=torch.float32, divisors=((2, 2), (4, 4)))
    taps = [per_tap(x, w) for x, w in zip(maps, weights, strict=True)]
    torch.library.opcheck(resize_tap_sum_op, (torch.randn(2, 5, 9, 14), taps, torch.ones(5),
                                              torch.zeros(5), True),
                          test_utils=('test_schema', 'test_faketensor'))


def test_compiles_as_one_node():
    maps, weights = levels((10, 12), dtype=torch.float32, divisors=((2, 2),))
    base, taps = torch.randn(2, 5, 10, 12), [per_tap(maps[0], weights[0])]
    compiled = torch.compile(lambda b, t: resize_tap_sum(b, t) * 2, backend='aot_eager',
                             fullgraph=True)
    torch.testing.assert_close(compiled(base, taps), 2 * resize_tap_sum(base, taps))


@pytest.mark.skipif(not HAS_TRITON, reason='no triton')
def test_kernel_takes_only_images_whose_offsets_fit_int32():
    from mamba_perception_kernels.triton.resize import fits_int32

    base = torch.empty(2, 4, 8, 8)
    small = torch.empty(2, 36, 4, 4)
    assert fits_int32(base, [small, small])
    # one image of a level whose rows lie 2^28 elements apart: 3 rows span > 2^31 - 1
    huge = torch.empty_strided((2, 36, 9, 4), (0, 1, 2 ** 28, 36), device='meta')
    assert not fits_int32(base, [small, huge])
    assert not fits_int32(torch.empty(1, 2 ** 16, 2 ** 8, 2 ** 8, device='meta'), [small])


# --------------------------------------------------------------------------------------------
# Triton kernel (CUDA, or the interpreter in a subprocess)


@only_without_gpu
def test_triton_kernels_under_interpreter():
    run_under_interpreter(__file__, min_passed=4, keyword='triton_kernel_')


@needs_triton_device
@pytest.mark.parametrize('size, channels, dtype, layout, config', [
    # three levels (UperNet at strides 8 / 16 / 32 over stride 4), channels-last as the heads
    ((24, 40), 8, torch.float32, 'channels_last', dict(block_p=128)),
    # odd sizes, more channels than one block (the last one partial), partial pixel block, fp16
    ((17, 23), 40, torch.float16, 'channels_last', dict(block_c=32, block_p=128)),
    # NCHW-contiguous inputs (strided channel loads)
    ((12, 20), 8, torch.float32, 'contiguous', dict(block_p=128)),
    # bf16, a map smaller than its taps' reach
    ((4, 6), 8, torch.bfloat16, 'channels_last', None),
])
def test_triton_kernel_matches_torch_path(size, channels, dtype, layout, config):
    from mamba_perception_kernels.triton import resize

    maps, weights = levels(size, channels=channels, in_channels=7, dtype=torch.float32, seed=3)
    fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
    taps = [per_tap(x, w).to(TRITON_DEVICE, dtype).contiguous(memory_format=fmt)
            for x, w in zip(maps, weights, strict=True)]
    base = torch.randn(2, channels, *size).to(TRITON_DEVICE, dtype).contiguous(
        memory_format=fmt)
    scale = torch.linspace(0.5, 1.5, channels, device=TRITON_DEVICE)
    shift = torch.linspace(-0.3, 0.3, channels, device=TRITON_DEVICE)
    want = resize_tap_sum_torch(base, taps, scale, shift, True)
    got = resize.resize_tap_sum_fwd(base, taps, scale, shift, True, config)
    assert got.dtype == dtype and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    # both sum in fp32 and round once: apart only by summation order (and that rounding)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    # every level counts: dropping the last one changes the result
    fewer = resize.resize_tap_sum_fwd(base, taps[:-1], scale, shift, True, config)
    assert (fewer.float() - want.float()).abs().max() > 10 * tol
