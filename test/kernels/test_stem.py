"""VMamba's fused stem op (conv -> LN -> GELU -> conv -> LN): PyTorch path, errors, kernel.

The Triton tests (``test_triton_kernel_*``) need CUDA or the Triton interpreter; without a GPU
``test_triton_kernels_under_interpreter`` reruns them in a subprocess with
``TRITON_INTERPRET=1`` (see conftest.py for why not in-process).
"""

from mamba_perception_kernels import ScanInputError, conv_norm_stem
from mamba_perception_kernels.stem import conv_norm_stem_op, conv_norm_stem_torch
import pytest
from scan_inputs import non_contiguous
import torch
from torch import nn
from triton_tests import (
    STORE_DTYPES_16,
    TRITON_DEVICE,
    needs_triton_device,
    only_without_gpu,
    run_under_interpreter,
)


def make(c1, c2, dtype=torch.float16, size=(2, 3, 21, 30), bias=True, device='cpu', seed=0):
    """An image and the stem's modules (convs in ``dtype``, LayerNorms fp32, non-trivial)."""
    gen = torch.Generator().manual_seed(seed)
    conv1 = nn.Conv2d(size[1], c1, 3, stride=2, padding=1, bias=bias)
    conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=bias)
    norm1, norm2 = nn.LayerNorm(c1), nn.LayerNorm(c2)
    with torch.no_grad():
        for norm in (norm1, norm2):
            norm.weight.copy_(1 + 0.2 * torch.randn(norm.weight.shape, generator=gen))
            norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=gen))
    x = (torch.randn(*size, generator=gen) + 0.3).to(device)
    return (x, conv1.to(device, dtype), norm1.to(device), conv2.to(device, dtype),
            norm2.to(device))


def args_of(x, conv1, norm1, conv2, norm2):
    return (x, conv1.weight, conv1.bias, norm1.weight, norm1.bias, norm1.eps, conv2.weight,
            conv2.bias, norm2.weight, norm2.bias, norm2.eps)


def modules_fp64(x, conv1, norm1, conv2, norm2):
    """The modules in float64 on the same (rounded) weights: the oracle."""
    with torch.no_grad():
        return _modules_fp64(x, conv1, norm1, conv2, norm2)


def _modules_fp64(x, conv1, norm1, conv2, norm2):
    d = torch.float64
    f = nn.functional

    def bias(conv):
        return None if conv.bias is None else conv.bias.to(d)

    h = f.conv2d(x.to(d), conv1.weight.to(d), bias(conv1), stride=2, padding=1)
    h = f.layer_norm(h.permute(0, 2, 3, 1), norm1.normalized_shape, norm1.weight.to(d),
                     norm1.bias.to(d), norm1.eps)
    h = f.gelu(h).permute(0, 3, 1, 2)
    y = f.conv2d(h, conv2.weight.to(d), bias(conv2), stride=2, padding=1)
    return f.layer_norm(y.permute(0, 2, 3, 1), norm2.normalized_shape, norm2.weight.to(d),
                        norm2.bias.to(d), norm2.eps)


def rel_err(got, ref):
    return float((got.detach().double() - ref).norm() / ref.norm())


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-6), (torch.float16, 5e-3),
                                        (torch.bfloat16, 3e-2)])
def test_torch_path_matches_the_modules(dtype, tol):
    parts = make(8, 16, dtype)
    got = conv_norm_stem(*args_of(*parts))
    assert got.dtype == torch.float32 and got.shape == (2, 6, 8, 16) and got.is_contiguous()
    assert rel_err(got, modules_fp64(*parts)) < tol


def test_torch_path_with_the_stem_modules_of_vmamba():
    # Same numbers as the model's own modules (fp32 weights: no rounding anywhere).
    from mamba_perception.models.vmamba import PatchEmbedV2

    torch.manual_seed(0)
    stem = PatchEmbedV2(3, 16).eval()
    x = torch.randn(1, 3, 17, 26)
    c1, n1, c2, n2 = stem[0], stem[2], stem[5], stem[7]
    got = conv_norm_stem(x, c1.weight, c1.bias, n1.weight, n1.bias, n1.eps, c2.weight, c2.bias,
                         n2.weight, n2.bias, n2.eps)
    torch.testing.assert_close(got, stem(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('change, message', [
    (lambda a: {**a, 0: a[0][0]}, 'x must be a torch.Tensor of shape'),
    (lambda a: {**a, 1: a[1][:, :2]}, 'w1 must have shape'),
    (lambda a: {**a, 6: a[6][:, :-1]}, 'w2 must have shape'),
    (lambda a: {**a, 6: a[6].float()}, 'w2 must have dtype'),
    (lambda a: {**a, 3: a[3][:-1]}, 'n1_weight must have shape'),
    (lambda a: {**a, 7: a[7][:-1]}, 'b2 must have shape'),
    (lambda a: {**a, 9: None}, 'n2_bias must be a torch.Tensor'),
    (lambda a: {**a, 0: a[0].long()}, 'x must have dtype'),
])
def test_invalid_inputs_are_named(change, message):
    args = dict(enumerate(args_of(*make(8, 16))))
    args = change(args)
    with pytest.raises(ScanInputError, match=message):
        conv_norm_stem(*[args[i] for i in range(11)])


def test_fake_impl_and_schema():
    torch.library.opcheck(conv_norm_stem_op, args_of(*make(8, 16, size=(1, 3, 9, 14))),
                          test_utils=('test_schema', 'test_faketensor'))


def test_out_dtype_rounds_the_fp32_result_once():
    # A 16-bit residual stream starts at the stem: its fp32 result rounded to out_dtype.
    args = args_of(*make(8, 16, size=(1, 3, 9, 14)))
    full = conv_norm_stem(*args)
    assert full.dtype == torch.float32
    for dtype in (torch.float16, torch.bfloat16):
        got = conv_norm_stem(*args, out_dtype=dtype)
        assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, full.to(dtype))
        torch.library.opcheck(conv_norm_stem_op, (*args, dtype),
                              test_utils=('test_schema', 'test_faketensor'))
    with pytest.raises(ScanInputError, match='out_dtype must be one of'):
        conv_norm_stem(*args, out_dtype=torch.float64)


def test_compiles_as_one_node():
    args = args_of(*make(8, 16, size=(1, 3, 11, 10)))
    compiled = torch.compile(lambda *a: conv_norm_stem(*a) * 2, backend='aot_eager',
                             fullgraph=True)
    with torch.no_grad():  # inference-only op: no backward to trace
        torch.testing.assert_close(compiled(*args), 2 * conv_norm_stem(*args))


# --------------------------------------------------------------------------------------------
# Triton kernel (CUDA, or the interpreter in a subprocess)


@only_without_gpu
def test_triton_kernels_under_interpreter():
    run_under_interpreter(__file__, min_passed=14, keyword='triton_kernel_')


def _launcher():
    from mamba_perception_kernels.triton import stem

    return stem


@needs_triton_device
@pytest.mark.parametrize('c1, c2, size, dtype, bias, config', [
    # VMamba-T's widths (48 -> 96, padded to 64 / 128), odd sizes, two programs a frame
    (48, 96, (2, 3, 35, 47), torch.float16, True, None),
    # widths below tl.dot's 16-wide tile (vmamba_test: 8 -> 16), partial last program
    (8, 16, (1, 3, 13, 18), torch.float16, True, dict(block_m=16)),
    # fp32 weights (a true fp32 product), no biases, tiny image (one stage-1 pixel row)
    (24, 40, (3, 3, 4, 9), torch.float32, False, dict(block_m=16)),
    # one input channel, batch 2, widths not powers of two
    (12, 20, (2, 1, 16, 16), torch.float16, True, dict(block_m=32, num_warps=2)),
])
@pytest.mark.parametrize('conv1_rows', [128, 32])
def test_triton_kernel_matches_torch_path(c1, c2, size, dtype, bias, config, conv1_rows):
    parts = make(c1, c2, dtype, size=size, bias=bias, device=TRITON_DEVICE)
    args = args_of(*parts)
    config = {**(config or {}), 'block_m_conv1': conv1_rows}
    got = _launcher().conv_norm_stem_fwd(*args, config=config)
    ref = conv_norm_stem_torch(*args)
    assert got.dtype == torch.float32 and got.shape == ref.shape and got.is_contiguous()
    # Same roundings, different summation order; the 16-bit rounding of a GELU output can flip.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    assert rel_err(got, ref.double()) < tol
    assert rel_err(got, modules_fp64(*parts)) < {torch.float32: 1e-5, torch.float16: 5e-3}[dtype]


@needs_triton_device
@pytest.mark.parametrize('out_dtype', STORE_DTYPES_16)
def test_triton_kernel_stores_out_dtype(out_dtype):
    # A 16-bit residual stream starts here: the final LayerNorm's fp32 result rounded once.
    parts = make(48, 96, torch.float16, size=(1, 3, 21, 30), device=TRITON_DEVICE)
    args = args_of(*parts)
    got = _launcher().conv_norm_stem_fwd(*args, out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.is_contiguous()
    assert torch.equal(got, _launcher().conv_norm_stem_fwd(*args).to(out_dtype))
    ref = conv_norm_stem_torch(*args, out_dtype=out_dtype)
    assert ref.dtype == out_dtype
    assert rel_err(got, ref.double()) < 1e-2


@needs_triton_device
def test_triton_kernel_reads_strided_16_bit_images_in_place():
    # A channels-last fp16 image and a cropped view: the kernel reads both through strides.
    x, conv1, norm1, conv2, norm2 = make(16, 32, size=(1, 3, 19, 28), device=TRITON_DEVICE)
    wide = torch.randn(1, 3, 19, 40, device=TRITON_DEVICE).half()
    for image in (x.half().contiguous(memory_format=torch.channels_last), wide[..., 5:33]):
        args = args_of(image, conv1, norm1, conv2, norm2)
        got = _launcher().conv_norm_stem_fwd(*args)
        assert rel_err(got, conv_norm_stem_torch(*args).double()) < 2e-3


@needs_triton_device
def test_triton_kernel_through_public_op():
    parts = make(16, 32, size=(1, 3, 24, 33), device=TRITON_DEVICE)
    args = args_of(*parts)
    strided = tuple(non_contiguous(a) if isinstance(a, torch.Tensor) and a.dim() == 1 else a
                    for a in args)
    got = conv_norm_stem(*strided)  # the op hands the kernel dense vectors
    if TRITON_DEVICE == 'cuda':  # on CUDA the public op is the kernel
        torch.testing.assert_close(got, _launcher().conv_norm_stem_fwd(*args))
    assert rel_err(got, modules_fp64(*parts)) < 5e-3


@needs_triton_device
def test_triton_kernel_rejects_bad_options():
    args = args_of(*make(8, 16, size=(1, 3, 10, 12), device=TRITON_DEVICE))
    with pytest.raises(ValueError, match='block_m_conv1'):
        _launcher().conv_norm_stem_fwd(*args, config=dict(block_m_conv1=100))
    with pytest.raises(ValueError, match='block_m'):
        _launcher().conv_norm_stem_fwd(*args, config=dict(block_m=48))


@needs_triton_device
def test_triton_kernel_prepared_weights_follow_updates():
    # The padded weight copies are built once per weight tensor and rebuilt after an in-place
    # update (common.prepared keys on the tensor's version).
    parts = make(8, 16, size=(1, 3, 10, 12), device=TRITON_DEVICE)
    x, conv1, norm1, conv2, norm2 = parts
    before = _launcher().conv_norm_stem_fwd(*args_of(*parts))
    with torch.no_grad():
        conv2.weight.mul_(-1.0)
    after = _launcher().conv_norm_stem_fwd(*args_of(*parts))
    assert rel_err(after, conv_norm_stem_torch(*args_of(*parts)).double()) < 2e-3
    assert rel_err(after, before.double()) > 0.1


@needs_triton_device
def test_triton_kernel_fp16_overflow_is_nan_like_the_modules():
    # A conv1 output above fp16's range rounds to Inf and the LayerNorm makes it NaN, as the
    # modules do under autocast (Pipeline's non-finite check relies on it); the rest is finite.
    x, conv1, norm1, conv2, norm2 = make(8, 16, size=(1, 3, 12, 12), device=TRITON_DEVICE)
    with torch.no_grad():
        conv1.weight[0].fill_(1.0)
        conv1.bias[0] = 0.0
    x = torch.zeros_like(x)
    x[..., 0, 0] = 3e4  # 3 channels x 3e4 > 65504: the top-left conv1 output only
    args = args_of(x, conv1, norm1, conv2, norm2)
    for got in (_launcher().conv_norm_stem_fwd(*args), conv_norm_stem_torch(*args)):
        assert torch.isnan(got[0, 0, 0]).all()
        assert torch.isfinite(got[0, 1:]).all() and torch.isfinite(got[0, :, 1:]).all()


def test_torch_path_ignores_a_callers_autocast():
    # The model calls the op under autocast: the PyTorch path's fp32 convs must stay fp32.
    args = args_of(*make(8, 16))
    plain = conv_norm_stem(*args)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.equal(conv_norm_stem(*args), plain)
