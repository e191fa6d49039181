"""Depthwise conv ops (NHWC 2-D, Vim's bidirectional 1-D): CPU path, gradients, errors, fake
impl, and the Triton kernels.

The Triton tests (``test_triton_kernel_*``) need CUDA or the Triton interpreter. Without a GPU
``test_triton_kernels_under_interpreter`` reruns just those tests of this file in a subprocess
with ``TRITON_INTERPRET=1`` set from the start (see conftest.py for why not in-process); with a
GPU they run compiled kernels on CUDA in-process and the subprocess test skips.
"""

import importlib.util

from mamba_perception_kernels import ScanInputError
from mamba_perception_kernels.dwconv import (
    dwconv1d_bidir_silu,
    dwconv2d_nhwc,
    dwconv2d_nhwc_torch,
)
import pytest
from scan_inputs import non_contiguous
import torch
from torch.autograd import gradcheck
import torch.nn.functional as F
from triton_tests import (
    HAS_TRITON,
    INTERPRETER,
    TRITON_DEVICE,
    needs_triton_device,
    only_without_gpu,
    run_under_interpreter,
)


def reference(x, weight, bias=None, silu=False):
    """nn.Conv2d(C, C, k, padding=k//2, groups=C) on the NCHW view, in float64, as NHWC."""
    y = F.conv2d(x.double().permute(0, 3, 1, 2), weight.double(),
                 None if bias is None else bias.double(), padding=weight.shape[-1] // 2,
                 groups=weight.shape[0])
    return (F.silu(y) if silu else y).permute(0, 2, 3, 1)


def make(batch, height, width, channels, k, dtype=torch.float32, with_bias=True, device='cpu'):
    x = torch.randn(batch, height, width, channels).to(dtype=dtype, device=device)
    weight = (torch.randn(channels, 1, k, k) / k).to(device)
    bias = torch.randn(channels).to(device) if with_bias else None
    return x, weight, bias


TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5),
       torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def _close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol,
                               atol=atol)


def _assert_nhwc_contiguous(y, shape):
    assert tuple(y.shape) == tuple(shape)
    assert y.stride() == torch.empty(shape, device='meta').stride(), y.stride()


# ------------------------------------------------------------------------------- CPU path


@pytest.mark.parametrize('batch,height,width,channels,k,with_bias,silu,dtype', [
    (2, 7, 9, 5, 3, True, True, torch.float64),
    (2, 7, 9, 5, 3, False, False, torch.float64),
    (1, 11, 6, 3, 5, True, False, torch.float32),
    (2, 5, 13, 8, 5, False, True, torch.float32),
    (1, 1, 1, 4, 3, True, True, torch.float32),     # 1x1 map: every tap but the centre pads
    (1, 3, 4, 2, 1, True, True, torch.float32),     # k=1
    (2, 6, 5, 16, 3, True, True, torch.bfloat16),   # fp32 compute on CPU, one rounding
])
def test_matches_conv2d(batch, height, width, channels, k, with_bias, silu, dtype):
    x, weight, bias = make(batch, height, width, channels, k, dtype, with_bias)
    y = dwconv2d_nhwc(x, weight, bias, silu=silu)
    _assert_nhwc_contiguous(y, x.shape)
    _close(y, reference(x, weight, bias, silu), dtype)


def test_non_contiguous_inputs():
    x, weight, bias = make(2, 9, 7, 6, 3)
    ref = reference(x, weight, bias, True)
    # Channel stride 2, and an NCHW-contiguous tensor seen as NHWC (channel stride H*W).
    for xv in (non_contiguous(x), x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)):
        y = dwconv2d_nhwc(xv, non_contiguous(weight), non_contiguous(bias), silu=True)
        _assert_nhwc_contiguous(y, x.shape)
        _close(y, ref, torch.float32)


def test_weight_dtype_is_cast_to_input_dtype():
    x, weight, bias = make(1, 5, 6, 4, 3, dtype=torch.float32)
    y = dwconv2d_nhwc(x, weight.double(), bias.half(), silu=True)
    assert y.dtype == torch.float32
    _close(y, reference(x, weight, bias.half().float(), True), torch.float32)


def test_empty_batch():
    y = dwconv2d_nhwc(torch.randn(0, 3, 4, 5), torch.randn(5, 1, 3, 3))
    assert y.shape == (0, 3, 4, 5)


# ------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize('with_bias,silu', [(True, True), (False, False), (True, False)])
def test_gradcheck(with_bias, silu):
    x, weight, bias = make(2, 4, 5, 3, 3, torch.float64, with_bias)
    weight = weight.double()
    bias = None if bias is None else bias.double().requires_grad_()
    inputs = (x.requires_grad_(), weight.requires_grad_(), bias)
    assert gradcheck(lambda a, b, c: dwconv2d_nhwc(a, b, c, silu=silu), inputs)


def test_gradients_match_conv2d_float32():
    x, weight, bias = make(2, 6, 7, 4, 5)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    dy = torch.randn(2, 6, 7, 4)
    (dwconv2d_nhwc(*leaves, silu=True) * dy).sum().backward()
    ref = F.silu(F.conv2d(ref_leaves[0].permute(0, 3, 1, 2), ref_leaves[1], ref_leaves[2],
                          padding=2, groups=4))
    (ref.permute(0, 2, 3, 1) * dy).sum().backward()
    for got, want in zip(leaves, ref_leaves, strict=True):
        assert got.grad.shape == want.grad.shape
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


def test_gradient_only_for_x():
    x, weight, _ = make(1, 4, 4, 2, 3)
    x.requires_grad_()
    (dx,) = torch.autograd.grad(dwconv2d_nhwc(x, weight, silu=True).sum(), [x])
    assert dx.shape == x.shape and torch.isfinite(dx).all()


# ------------------------------------------------------------------------------- errors


def _err(match, x, weight, bias=None):
    with pytest.raises(ScanInputError, match=match):
        dwconv2d_nhwc(x, weight, bias)


def test_errors_name_the_tensor():
    x, weight, bias = make(1, 4, 5, 6, 3)
    assert issubclass(ScanInputError, ValueError)
    _err(r'x must have shape \(\*, \*, \*, \*\); got shape \(6, 4, 5\)', x[0].permute(2, 0, 1),
         weight)
    _err(r'x must be a torch.Tensor', [1.0], weight)
    _err(r'x must have dtype .*torch.int64', torch.ones(1, 4, 5, 6, dtype=torch.long), weight)
    _err(r'weight must have shape \(6, 1, \*, \*\); got shape \(5, 1, 3, 3\)', x,
         torch.randn(5, 1, 3, 3))
    _err(r'weight must have shape \(6, 1, \*, \*\)', x, torch.randn(6, 3, 3))
    _err(r'weight must be \(C, 1, k, k\) with odd k.*\(6, 1, 2, 2\)', x, torch.randn(6, 1, 2, 2))
    _err(r'weight must be \(C, 1, k, k\) with odd k.*\(6, 1, 3, 5\)', x, torch.randn(6, 1, 3, 5))
    _err(r'bias must have shape \(6\); got shape \(5,\)', x, weight, torch.randn(5))
    _err(r'bias must have dtype', x, weight, torch.ones(6, dtype=torch.int32))
    meta = torch.randn(6, 1, 3, 3, device='meta')
    _err(r'weight must be on cpu like the first input; got .*device meta', x, meta)


# ------------------------------------------------------------------------------- custom op


def test_fake_strides_match_real():
    for shape, xform in [((2, 5, 7, 3), None), ((1, 1, 1, 1), None), ((1, 4, 1, 8), None),
                         ((2, 5, 7, 3), non_contiguous)]:
        x, weight, bias = make(*shape, 3)
        x = xform(x) if xform else x
        real = dwconv2d_nhwc(x, weight, bias, silu=True)
        with torch._subclasses.FakeTensorMode() as mode:
            fake = dwconv2d_nhwc(mode.from_tensor(x), mode.from_tensor(weight),
                                 mode.from_tensor(bias), silu=True)
        assert fake.shape == real.shape and fake.dtype == real.dtype
        assert fake.stride() == real.stride(), (shape, fake.stride(), real.stride())


def test_opcheck():
    x, weight, bias = make(1, 5, 4, 3, 3, torch.float64)
    # test_aot_dispatch_dynamic is left out: ~30 s on 2 cores; compile is tested below.
    torch.library.opcheck(
        torch.ops.mamba_perception.dwconv2d_nhwc.default,
        (x.requires_grad_(), weight.double().requires_grad_(), bias.double(), True),
        test_utils=('test_schema', 'test_autograd_registration', 'test_faketensor'))


def test_inductor_compile_fullgraph():
    # Inductor asserts the op's real output strides against the fake impl's (the bug this op
    # must not have); the permute afterwards makes a wrong layout assumption observable.
    x, weight, bias = make(1, 5, 6, 4, 3)

    def block(t):
        y = dwconv2d_nhwc(t * 2, weight, bias, silu=True)
        return (y + 1).permute(0, 3, 1, 2)

    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x))


def test_compiled_backward_uses_registered_autograd():
    x, weight, bias = make(1, 5, 6, 4, 3)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    compiled = torch.compile(lambda a, b, c: dwconv2d_nhwc(a, b, c, silu=True).square().sum(),
                             fullgraph=True, backend='aot_eager')
    compiled(*leaves).backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    reference(*ref_leaves, silu=True).square().sum().backward()
    for got, want in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad.float(), rtol=1e-4, atol=1e-4)


def test_export_shows_one_custom_op_node():
    _, weight, bias = make(1, 5, 6, 4, 3)

    class Block(torch.nn.Module):
        def forward(self, t):
            return dwconv2d_nhwc(t, weight, bias, silu=True) * 2

    ep = torch.export.export(Block(), (torch.randn(1, 5, 6, 4),))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == 'call_function']
    ours = [t for t in targets if t.startswith('mamba_perception.')]
    assert ours == ['mamba_perception.dwconv2d_nhwc.default'], targets


# --------------------------------------------------------------- dwconv1d_bidir_silu, CPU


def bidir_reference(x, weight_f, weight_b, bias):
    """Vim's official composition in float64: conv1d (causal) of x for the forward branch,
    conv1d of the reversed sequence flipped back for the backward one, then SiLU."""
    k, length = weight_f.shape[-1], x.shape[1]
    xc = x.double().transpose(1, 2)  # (B, E, L)

    def causal(seq, w, b):
        return F.conv1d(seq, w.double()[:, None], b.double(), padding=k - 1,
                        groups=w.shape[0])[..., :length]

    y_f = causal(xc, weight_f, bias[0])
    y_b = causal(xc.flip(-1), weight_b, bias[1]).flip(-1)
    return F.silu(torch.stack((y_f, y_b), 1)).transpose(2, 3)  # (B, 2, L, E)


def make_bidir_conv(batch, length, channels, k=4, dtype=torch.float32, device='cpu'):
    x = torch.randn(batch, length, channels).to(dtype=dtype, device=device)
    weight_f, weight_b = (torch.randn(channels, k) / k for _ in range(2))
    bias = torch.randn(2, channels)
    # The op takes direction 1's kernel flipped (the anti-causal form of the official conv).
    weight = torch.stack((weight_f, weight_b.flip(-1)))
    return x, weight.to(device), bias.to(device), (weight_f.to(device), weight_b.to(device))


@pytest.mark.parametrize('batch,length,channels,k,dtype', [
    (2, 9, 5, 4, torch.float64), (1, 3, 4, 4, torch.float32),   # L < k: padding on both sides
    (1, 17, 8, 2, torch.float32), (2, 6, 16, 4, torch.bfloat16)])
def test_bidir_conv1d_matches_official_composition(batch, length, channels, k, dtype):
    x, weight, bias, (w_f, w_b) = make_bidir_conv(batch, length, channels, k, dtype)
    u = dwconv1d_bidir_silu(x, weight, bias)
    assert u.shape == (batch, 2, length, channels) and u.is_contiguous()
    _close(u, bidir_reference(x, w_f, w_b, bias), dtype)


def test_bidir_conv1d_strided_input_gradcheck_and_fake():
    x, weight, bias, (w_f, w_b) = make_bidir_conv(1, 7, 3, dtype=torch.float64)
    weight, bias = weight.double(), bias.double()
    xz = torch.cat((x, torch.randn_like(x)), -1)  # x as Vim's in_proj half: row stride 2E
    _close(dwconv1d_bidir_silu(xz[..., :3], weight, bias), bidir_reference(x, w_f, w_b, bias),
           torch.float64)
    assert gradcheck(dwconv1d_bidir_silu, (x.requires_grad_(), weight.requires_grad_(),
                                           bias.requires_grad_()))
    with torch._subclasses.FakeTensorMode() as mode:
        fake = dwconv1d_bidir_silu(*(mode.from_tensor(t) for t in (x, weight, bias)))
    assert fake.shape == (1, 2, 7, 3) and fake.stride() == (42, 21, 3, 1)
    with pytest.raises(ScanInputError, match=r'weight must have shape \(2, 3, \*\)'):
        dwconv1d_bidir_silu(x, weight[:, :2], bias)


# ------------------------------------------------------------------------------- Triton


@only_without_gpu
def test_triton_kernels_under_interpreter():
    run_under_interpreter(__file__, min_passed=8, keyword='triton_kernel_')


def _launcher():
    from mamba_perception_kernels.triton import dwconv

    return dwconv


@needs_triton_device
@pytest.mark.parametrize('shape,k,dtype,with_bias,silu,config', [
    # Several tiles along H and W with partial edge tiles, a partial channel block, batch 2.
    ((2, 13, 11, 40), 3, torch.float32, True, True, dict(block_h=4, block_w=8, block_c=16)),
    ((1, 9, 18, 24), 3, torch.float16, False, True, dict(block_h=2, block_w=16, block_c=32)),
    ((1, 10, 7, 48), 3, torch.bfloat16, True, False, None),
    ((1, 7, 5, 3), 5, torch.float32, True, True, None),      # k=5, C=3: masked channels
    ((1, 1, 1, 2), 3, torch.float16, True, True, None),      # everything but the centre pads
    ((1, 5, 18, 384), 3, torch.float16, False, True, None),   # WIDE_TUNING's tile, edge tiles
])
def test_triton_kernel_matches_conv2d(shape, k, dtype, with_bias, silu, config):
    x, weight, bias = make(*shape, k, dtype, with_bias, TRITON_DEVICE)
    y = _launcher().dwconv2d_nhwc_fwd(x, weight, bias, silu, config)
    _assert_nhwc_contiguous(y, shape)
    _close(y, reference(x, weight, bias, silu), dtype)


@needs_triton_device
def test_triton_kernel_strided_inputs():
    x, weight, bias = make(2, 6, 9, 12, 3, device=TRITON_DEVICE)
    ref = reference(x, weight, bias, True)
    cfg = dict(block_h=2, block_w=4, block_c=8)
    launcher = _launcher()
    # Channel stride 2 (the general path) and an NCHW-contiguous tensor viewed as NHWC.
    for xv in (non_contiguous(x), x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)):
        y = launcher.dwconv2d_nhwc_fwd(xv, non_contiguous(weight), non_contiguous(bias), True,
                                       cfg)
        _assert_nhwc_contiguous(y, x.shape)
        _close(y, ref, torch.float32)


@needs_triton_device
def test_triton_kernel_fp32_weight_for_fp16_input():
    # The model's Conv2d weight may stay fp32 while activations are fp16: no cast needed.
    x, weight, bias = make(1, 4, 6, 8, 3, torch.float16, device=TRITON_DEVICE)
    y = _launcher().dwconv2d_nhwc_fwd(x, weight.float(), bias.half(), True)
    _close(y, reference(x, weight, bias.half(), True), torch.float16)


@needs_triton_device
def test_triton_kernel_launch_config_errors():
    launcher = _launcher()
    with pytest.raises(ValueError, match='power of two'):
        launcher.launch_config(8, 8, 8, dict(block_c=24))
    with pytest.raises(ValueError, match='unknown dwconv launch options'):
        launcher.launch_config(8, 8, 8, dict(block_k=4))
    # Tiles are clamped to the map: a 3x5 map with 6 channels gets a 4x8x8 tile.
    cfg = launcher.launch_config(3, 5, 6, dict(block_h=16, block_w=16, block_c=64))
    assert (cfg['block_h'], cfg['block_w'], cfg['block_c']) == (4, 8, 8)
    # The channel block shrinks to a divisor of C (down to 16): C=96 gets 32, not 64.
    assert launcher.launch_config(180, 320, 96, dict(block_c=64))['block_c'] == 32
    assert launcher.launch_config(180, 320, 40, dict(block_c=64))['block_c'] == 16
    # From wide_min_channels on, WIDE_TUNING's tile; an explicit config still wins; 0 = off.
    wide = launcher.launch_config(45, 80, 384)
    assert {k: wide[k] for k in launcher.WIDE_TUNING} == launcher.WIDE_TUNING
    narrow = launcher.launch_config(90, 160, 192)
    assert (narrow['block_h'], narrow['block_w'], narrow['block_c']) == (
        launcher.TUNING['block_h'], launcher.TUNING['block_w'], 64)
    assert launcher.launch_config(45, 80, 384, dict(block_c=32))['block_c'] == 32
    off = launcher.launch_config(45, 80, 768, dict(wide_min_channels=0))
    assert (off['block_h'], off['block_c']) == (launcher.TUNING['block_h'],
                                                launcher.TUNING['block_c'])


@needs_triton_device
@pytest.mark.skipif(not torch.cuda.is_available(), reason='the op dispatches to Triton on CUDA')
def test_triton_kernel_through_public_op():
    x, weight, bias = make(2, 9, 10, 32, 3, torch.float16, device='cuda')
    y = dwconv2d_nhwc(x, weight, bias, silu=True)
    _close(y, reference(x, weight, bias, True), torch.float16)
    torch.testing.assert_close(y, dwconv2d_nhwc_torch(x, weight, bias, True), rtol=2e-3,
                               atol=2e-3)


@pytest.mark.skipif(not HAS_TRITON or INTERPRETER, reason='needs the Triton compiler')
@pytest.mark.parametrize('silu,has_bias,c_contig', [(True, True, True), (False, False, False)])
def test_kernel_compiles_for_sm90(silu, has_bias, c_contig):
    # The interpreter accepts code the compiler rejects; lower the kernel to PTX for an H100.
    if importlib.util.find_spec('triton.backends.nvidia') is None:
        pytest.skip('triton has no NVIDIA backend here')
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _launcher()._dwconv_nhwc_kernel
    cfg = _launcher().TUNING
    consts = dict(KSIZE=3, HAS_BIAS=has_bias, SILU=silu, C_CONTIG=c_contig,
                  BLOCK_H=cfg['block_h'], BLOCK_W=cfg['block_w'], BLOCK_C=cfg['block_c'])
    ptr_types = {'x_ptr': '*fp16', 'out_ptr': '*fp16', 'w_ptr': '*fp32', 'bias_ptr': '*fp32'}
    sig = {n: 'constexpr' if n in consts else ptr_types.get(n, 'i32') for n in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                              target=GPUTarget('cuda', 90, 32))
    assert compiled.asm['ptx']


@needs_triton_device
@pytest.mark.parametrize('batch,length,channels,dtype,cfg', [
    # several token blocks with a partial last one, a partial channel block, batch 2
    (2, 37, 40, torch.float32, dict(block_l=8, block_e=16)),
    (1, 3, 8, torch.float16, None),                              # L < k
    (1, 50, 24, torch.bfloat16, dict(block_l=16, block_e=32)),
])
def test_triton_kernel_bidir_conv1d(batch, length, channels, dtype, cfg, monkeypatch):
    launcher = _launcher()
    for key, value in (cfg or {}).items():
        monkeypatch.setitem(launcher.BIDIR_TUNING, key, value)
    x, weight, bias, (w_f, w_b) = make_bidir_conv(batch, length, channels, dtype=dtype,
                                                  device=TRITON_DEVICE)
    xz = torch.cat((x, torch.zeros_like(x)), -1)[..., :channels]  # row stride 2E, as Vim's
    # strided weight and bias (channel stride 2): the kernel reads them through their strides
    u = launcher.dwconv1d_bidir_silu_fwd(xz, non_contiguous(weight.transpose(1, 2)).transpose(
        1, 2), non_contiguous(bias))
    assert u.shape == (batch, 2, length, channels) and u.is_contiguous()
    _close(u, bidir_reference(x, w_f, w_b, bias), dtype)


@pytest.mark.skipif(not HAS_TRITON or INTERPRETER, reason='needs the Triton compiler')
def test_bidir_conv1d_kernel_compiles_for_sm90():
    if importlib.util.find_spec('triton.backends.nvidia') is None:
        pytest.skip('triton has no NVIDIA backend here')
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _launcher()._dwconv1d_bidir_kernel
    consts = dict(KSIZE=4, BLOCK_L=32, BLOCK_E=64)
    ptr_types = {'x_ptr': '*fp16', 'out_ptr': '*fp16', 'w_ptr': '*fp16', 'bias_ptr': '*fp32'}
    sig = {n: 'constexpr' if n in consts else ptr_types.get(n, 'i32') for n in fn.arg_names}
    assert triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                          target=GPUTarget('cuda', 90, 32)).asm['ptx']
