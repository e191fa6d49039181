"""Fused pre-norm ops (MLP, linear; + residual): PyTorch paths, errors, fake impls, kernels.

The Triton tests (``test_triton_kernel_*``) need CUDA or the Triton interpreter; without a GPU
``test_triton_kernels_under_interpreter`` reruns them in a subprocess with
``TRITON_INTERPRET=1`` (see conftest.py for why not in-process).
"""

from mamba_perception_kernels import (
    ScanInputError,
    norm_linear_residual,
    norm_mlp_residual,
)
from mamba_perception_kernels.prenorm import (
    norm_linear_residual_op,
    norm_linear_residual_torch,
    norm_mlp_residual_op,
    norm_mlp_residual_torch,
)
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


def make(channels, hidden, dtype=torch.float16, rows=(3, 5), bias=True, device='cpu', seed=0):
    """x (fp32 residual stream), LayerNorm and two Linear layers with weights in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    norm = nn.LayerNorm(channels)
    fc1, fc2 = nn.Linear(channels, hidden, bias=bias), nn.Linear(hidden, channels, bias=bias)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(channels, generator=gen))
        norm.bias.copy_(0.1 * torch.randn(channels, generator=gen))
    x = (2 * torch.randn(*rows, channels, generator=gen) + 0.5).to(device)
    fc1, fc2 = fc1.to(device, dtype), fc2.to(device, dtype)
    return x, norm.to(device), fc1, fc2


def args_of(x, norm, fc1, fc2):
    return (x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias)


def modules_fp64(x, norm, fc1, fc2):
    """The unfused modules in float64 on the same (rounded) weights: the oracle."""
    d = torch.float64
    h = nn.functional.layer_norm(x.to(d), norm.normalized_shape, norm.weight.to(d),
                                 norm.bias.to(d), norm.eps)
    h = nn.functional.gelu(nn.functional.linear(
        h, fc1.weight.to(d), None if fc1.bias is None else fc1.bias.to(d)))
    y = nn.functional.linear(h, fc2.weight.to(d), None if fc2.bias is None else fc2.bias.to(d))
    return x.to(d) + y


def rel_err(got, ref):
    got, ref = got.detach(), ref.detach()
    return float((got.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-6), (torch.float16, 2e-3),
                                        (torch.bfloat16, 1.5e-2)])
def test_torch_path_matches_the_modules(dtype, tol):
    x, norm, fc1, fc2 = make(24, 96, dtype)
    got = norm_mlp_residual(*args_of(x, norm, fc1, fc2))
    assert got.dtype == torch.float32 and got.shape == x.shape and got.is_contiguous()
    # Residual subtracted: the error is judged on the MLP branch itself.
    ref = modules_fp64(x, norm, fc1, fc2)
    assert rel_err(got - x, ref - x.double()) < tol


def test_torch_path_without_biases_and_16_bit_input():
    x, norm, fc1, fc2 = make(16, 40, torch.float16, bias=False)
    got = norm_mlp_residual(*args_of(x.half(), norm, fc1, fc2))
    ref = modules_fp64(x.half(), norm, fc1, fc2)
    assert rel_err(got - x.half().float(), ref - x.half().double()) < 2e-3


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_torch_path_adds_the_branch_first(dtype, tol):
    # branch = the block's first half (16-bit, like out_proj's output): s = x + branch in fp32
    # is LayerNormed, and the result is s + MLP(LN(s)), as the modules compute it.
    x, norm, fc1, fc2 = make(24, 96, dtype)
    branch = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = norm_mlp_residual(*args_of(x, norm, fc1, fc2), branch=branch)
    s = x + branch  # fp32 + 16-bit -> fp32, what the model's residual add does
    ref = modules_fp64(s, norm, fc1, fc2)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert rel_err(got - s, ref - s.double()) < tol
    torch.testing.assert_close(got, norm_mlp_residual(*args_of(s, norm, fc1, fc2)),
                               rtol=0, atol=0)
    with pytest.raises(ScanInputError, match='branch must have shape'):
        norm_mlp_residual(*args_of(x, norm, fc1, fc2), branch=branch[..., :-1, :])
    torch.library.opcheck(norm_mlp_residual_op, (*args_of(x, norm, fc1, fc2), branch),
                          test_utils=('test_schema', 'test_faketensor'))


def test_torch_path_rounds_once_to_out_dtype():
    # A 16-bit residual stream: the fp32 result (residual included) rounded once, 16-bit x and
    # branch in; out_dtype None is fp32; other dtypes are named errors.
    x, norm, fc1, fc2 = make(24, 96, torch.float16)
    x16 = x.half()
    branch = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).half()
    full = norm_mlp_residual(*args_of(x16, norm, fc1, fc2), branch=branch)
    assert full.dtype == torch.float32
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        got = norm_mlp_residual(*args_of(x16, norm, fc1, fc2), branch=branch, out_dtype=dtype)
        assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
        assert torch.equal(got, full.to(dtype))
    with pytest.raises(ScanInputError, match='out_dtype must be one of'):
        norm_mlp_residual(*args_of(x16, norm, fc1, fc2), out_dtype=torch.int8)
    torch.library.opcheck(norm_mlp_residual_op, (*args_of(x16, norm, fc1, fc2), branch,
                                                 torch.float16),
                          test_utils=('test_schema', 'test_faketensor'))


@pytest.mark.parametrize('change, message', [
    (lambda a: {**a, 4: a[4].t()}, 'w1 must have shape'),
    (lambda a: {**a, 6: a[6][:, :-1]}, 'w2 must have shape'),
    (lambda a: {**a, 6: a[6].float()}, 'w2 must have dtype'),
    (lambda a: {**a, 1: a[1][:-1]}, 'norm_weight must have shape'),
    (lambda a: {**a, 5: a[5][:-1]}, 'b1 must have shape'),
    (lambda a: {**a, 0: a[0].transpose(-1, -2)}, 'x must have shape|unit channel'),
    (lambda a: {**a, 0: torch.zeros(4, 48)[:, ::2]}, 'unit channel'),
    (lambda a: {**a, 0: 'x'}, 'x must be a torch.Tensor'),
])
def test_invalid_inputs_are_named(change, message):
    x, norm, fc1, fc2 = make(24, 96)
    args = dict(enumerate(args_of(x, norm, fc1, fc2)))
    args = change(args)
    with pytest.raises(ScanInputError, match=message):
        norm_mlp_residual(*[args[i] for i in range(8)])


def test_fake_impl_and_schema():
    x, norm, fc1, fc2 = make(24, 96)
    torch.library.opcheck(norm_mlp_residual_op, args_of(x, norm, fc1, fc2),
                          test_utils=('test_schema', 'test_faketensor'))


def test_compiles_as_one_node():
    x, norm, fc1, fc2 = make(24, 96)
    args = args_of(x, norm, fc1, fc2)
    compiled = torch.compile(lambda *a: norm_mlp_residual(*a) * 2, backend='aot_eager',
                             fullgraph=True)
    with torch.no_grad():  # inference-only op: no backward to trace
        torch.testing.assert_close(compiled(*args), 2 * norm_mlp_residual(*args))


# --------------------------------------------------------------------------------------------
# Triton kernel (CUDA, or the interpreter in a subprocess)


@only_without_gpu
def test_triton_kernels_under_interpreter():
    run_under_interpreter(__file__, min_passed=20, keyword='triton_kernel_')


def _launcher():
    from mamba_perception_kernels.triton import prenorm

    return prenorm


@needs_triton_device
@pytest.mark.parametrize('channels, hidden, rows, dtype, bias, config', [
    # several programs with a partial last one, hidden a multiple of the chunk
    (32, 128, (2, 7, 11), torch.float16, True, dict(block_m=32, block_h=32)),
    # C = 96 (VMamba-T stage 1) padded to 128 columns; 384 hidden in 64-unit chunks
    (96, 384, (1, 5, 9), torch.float16, True, None),
    pytest.param(96, 384, (1, 5, 9), torch.bfloat16, True, None, marks=pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason='the Triton interpreter (numpy) gets tl.dot of bfloat16 operands wrong')),
    # hidden not a multiple of the chunk, no biases, fp32 weights
    (24, 80, (37,), torch.float32, False, dict(block_m=16, block_h=32)),
    # C below the 16-wide minimum tile of tl.dot
    (8, 32, (19,), torch.float16, True, dict(block_m=16)),
])
@pytest.mark.parametrize('layout', ['linear', 'padded_t'])
def test_triton_kernel_matches_torch_path(channels, hidden, rows, dtype, bias, config, layout):
    x, norm, fc1, fc2 = make(channels, hidden, dtype, rows=rows, bias=bias, device=TRITON_DEVICE)
    args = args_of(x, norm, fc1, fc2)
    got = _launcher().norm_mlp_residual_fwd(*args, config={**(config or {}), 'layout': layout})
    ref = norm_mlp_residual_torch(*args)
    assert got.dtype == torch.float32 and got.shape == x.shape
    # Same roundings, different summation order; fp16 rounding of the GELU output can flip.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(got - x, (ref - x).double()) < tol
    assert rel_err(got, modules_fp64(x, norm, fc1, fc2)) < tol


@needs_triton_device
@pytest.mark.parametrize('out_dtype', STORE_DTYPES_16)
def test_triton_kernel_stores_out_dtype(out_dtype):
    # A 16-bit residual stream in and out (VMamba-T stage 1's widths): the kernel's fp32
    # result rounded once on the store, as the PyTorch path rounds it.
    x, norm, fc1, fc2 = make(96, 384, torch.float16, rows=(1, 5, 9), device=TRITON_DEVICE)
    x16 = x.half()
    branch = torch.randn(x.shape, device=TRITON_DEVICE).half()
    args = args_of(x16, norm, fc1, fc2)
    got = _launcher().norm_mlp_residual_fwd(*args, branch=branch, out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.shape == x.shape
    full = _launcher().norm_mlp_residual_fwd(*args, branch=branch)
    assert torch.equal(got, full.to(out_dtype))
    s = x16.float() + branch.float()
    ref = norm_mlp_residual_torch(*args, branch=branch, out_dtype=out_dtype)
    assert rel_err(got.float() - s, (ref.float() - s).double()) < 1e-2


@needs_triton_device
def test_triton_kernel_strided_rows_and_16_bit_input():
    # x is every other row of a wider map (row stride 2C) and fp16: read in place.
    x, norm, fc1, fc2 = make(32, 128, torch.float16, rows=(2, 6), device=TRITON_DEVICE)
    wide = torch.randn(2, 6, 64, device=TRITON_DEVICE).half()
    view = wide[..., :32]
    assert view.stride(-2) == 64
    args = args_of(view, norm, fc1, fc2)
    got = _launcher().norm_mlp_residual_fwd(view.reshape(-1, 32), *args[1:]).reshape(2, 6, 32)
    ref = norm_mlp_residual_torch(*args)
    assert rel_err(got - view.float(), (ref - view.float()).double()) < 2e-3


@needs_triton_device
@pytest.mark.parametrize('layout', ['linear', 'padded_t'])
def test_triton_kernel_adds_the_branch(layout):
    # C = 96 padded to 128 (VMamba-T stage 1), several programs; the branch is fp16 with a
    # row stride of its own (every other row of a wider map).
    x, norm, fc1, fc2 = make(96, 384, torch.float16, rows=(1, 5, 9), device=TRITON_DEVICE)
    wide = torch.randn(1, 5, 9, 192, device=TRITON_DEVICE).half()
    branch = wide[..., 96:]
    args = args_of(x, norm, fc1, fc2)
    got = _launcher().norm_mlp_residual_fwd(*args, config={'layout': layout}, branch=branch)
    ref = norm_mlp_residual_torch(*args, branch=branch)
    s = x + branch
    assert rel_err(got - s, (ref - s).double()) < 2e-3
    assert rel_err(got, modules_fp64(s, norm, fc1, fc2)) < 2e-3
    through_op = norm_mlp_residual(*args, branch=branch)
    assert rel_err(through_op, modules_fp64(s, norm, fc1, fc2)) < 2e-3


def _strided_vectors(args):
    """The same arguments with every 1-D tensor (norm weight / bias, biases) strided."""
    return tuple(non_contiguous(a) if isinstance(a, torch.Tensor) and a.dim() == 1 else a
                 for a in args)


@needs_triton_device
def test_triton_kernel_through_public_op():
    x, norm, fc1, fc2 = make(48, 192, torch.float16, rows=(1, 4, 6), device=TRITON_DEVICE)
    args = args_of(x, norm, fc1, fc2)
    got = norm_mlp_residual(*_strided_vectors(args))  # the op hands the kernel dense vectors
    if TRITON_DEVICE == 'cuda':  # on CUDA the public op is the kernel
        torch.testing.assert_close(got, _launcher().norm_mlp_residual_fwd(*args))
    assert rel_err(got, modules_fp64(x, norm, fc1, fc2)) < 2e-3


@needs_triton_device
def test_triton_kernel_rejects_bad_options():
    x, norm, fc1, fc2 = make(32, 128, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match='block_h'):
        _launcher().norm_mlp_residual_fwd(*args_of(x, norm, fc1, fc2), config=dict(block_h=48))
    with pytest.raises(ValueError, match='layout'):
        _launcher().norm_mlp_residual_fwd(*args_of(x, norm, fc1, fc2), config=dict(layout='t'))


@needs_triton_device
def test_triton_kernel_padded_weights_are_cached_and_follow_updates():
    # The padded, transposed copies are built once per weight tensor; an in-place update of
    # the weight (load_state_dict) must rebuild them, or the kernel would use stale weights.
    launcher = _launcher()
    x, norm, fc1, fc2 = make(24, 80, rows=(9,), device=TRITON_DEVICE)
    w1t, b1p, w2t, hp = launcher._padded_transposed(fc1.weight, fc1.bias, fc2.weight, 32, 32)
    assert (w1t.shape, b1p.shape, w2t.shape, hp) == ((32, 96), (96,), (96, 32), 96)
    torch.testing.assert_close(w1t[:24, :80], fc1.weight.t())
    assert w1t[24:].abs().sum() == 0 and w2t[80:].abs().sum() == 0 and b1p[80:].abs().sum() == 0
    again = launcher._padded_transposed(fc1.weight, fc1.bias, fc2.weight, 32, 32)
    assert all(a is b for a, b in zip(again[:3], (w1t, b1p, w2t), strict=True))
    args = args_of(x, norm, fc1, fc2)
    config = dict(layout='padded_t', block_h=32, block_m=16)
    before = launcher.norm_mlp_residual_fwd(*args, config=config)
    with torch.no_grad():
        fc2.weight.mul_(-1)
        fc2.bias.mul_(-1)
    after = launcher.norm_mlp_residual_fwd(*args, config=config)
    torch.testing.assert_close(after - x, -(before - x), atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# residual + linear(layer_norm(y))


def make_linear(channels, n_out, dtype=torch.float16, rows=(3, 5), bias=True, device='cpu',
                seed=0):
    """y (the scan's fp32 output), LayerNorm, a Linear in ``dtype`` and an fp32 residual."""
    gen = torch.Generator().manual_seed(seed)
    y, norm, _, _ = make(channels, 16, dtype, rows=rows, device=device, seed=seed)
    fc = nn.Linear(channels, n_out, bias=bias).to(device, dtype)
    residual = torch.randn(*rows, n_out, generator=gen).to(device)
    return y, norm, fc, residual


def linear_fp64(y, norm, fc, residual):
    d = torch.float64
    h = nn.functional.layer_norm(y.to(d), norm.normalized_shape, norm.weight.to(d),
                                 norm.bias.to(d), norm.eps)
    out = nn.functional.linear(h, fc.weight.to(d), None if fc.bias is None else fc.bias.to(d))
    return out if residual is None else residual.to(d) + out


def linear_args(y, norm, fc, residual):
    return (y, norm.weight, norm.bias, norm.eps, fc.weight, fc.bias, residual)


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-6), (torch.float16, 2e-3),
                                        (torch.bfloat16, 1.5e-2)])
def test_linear_torch_path_matches_the_modules(dtype, tol):
    y, norm, fc, residual = make_linear(24, 40, dtype)
    got = norm_linear_residual(*linear_args(y, norm, fc, residual))
    assert got.dtype == torch.float32 and got.shape == residual.shape and got.is_contiguous()
    ref = linear_fp64(y, norm, fc, residual)
    assert rel_err(got - residual, ref - residual.double()) < tol
    no_res = norm_linear_residual(*linear_args(y, norm, fc, None))
    torch.testing.assert_close(no_res + residual, got)


@pytest.mark.parametrize('change, message', [
    (lambda a: {**a, 4: a[4].t()}, 'w must have shape'),
    (lambda a: {**a, 5: a[5][:-1]}, 'b must have shape'),
    (lambda a: {**a, 6: a[6][..., :-1]}, 'residual must have shape'),
    (lambda a: {**a, 6: a[6].transpose(0, 1)}, 'residual must have shape'),
    (lambda a: {**a, 6: torch.zeros(3, 5, 80)[..., ::2]}, 'residual must have a unit channel'),
    (lambda a: {**a, 2: a[2][:-1]}, 'norm_bias must have shape'),
    (lambda a: {**a, 0: None}, 'y must be a torch.Tensor'),
])
def test_linear_invalid_inputs_are_named(change, message):
    y, norm, fc, residual = make_linear(24, 40)
    args = change(dict(enumerate(linear_args(y, norm, fc, residual))))
    with pytest.raises(ScanInputError, match=message):
        norm_linear_residual(*[args[i] for i in range(7)])


def test_linear_fake_impl_and_schema():
    y, norm, fc, residual = make_linear(24, 40)
    for res in (residual, None):
        torch.library.opcheck(norm_linear_residual_op, linear_args(y, norm, fc, res),
                              test_utils=('test_schema', 'test_faketensor'))


@needs_triton_device
@pytest.mark.parametrize('channels, n_out, rows, dtype, bias, residual, config', [
    # C = 96 -> 96 (VMamba-T stage 1 out_proj, no bias), several programs and output chunks
    (96, 96, (1, 5, 9), torch.float16, False, True, dict(block_m=16, block_n=32)),
    # N not a multiple of the chunk, bias, no residual, fp32 weights (exact dot)
    (24, 40, (37,), torch.float32, True, False, dict(block_m=16, block_n=16)),
    # C below the 16-wide minimum tile of tl.dot, default config
    (8, 16, (2, 11), torch.float16, True, True, None),
    pytest.param(192, 96, (3, 7), torch.bfloat16, False, True, None, marks=pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason='the Triton interpreter (numpy) gets tl.dot of bfloat16 operands wrong')),
])
def test_triton_kernel_linear_matches_torch_path(channels, n_out, rows, dtype, bias, residual,
                                                 config):
    y, norm, fc, res = make_linear(channels, n_out, dtype, rows=rows, bias=bias,
                                   device=TRITON_DEVICE)
    args = linear_args(y, norm, fc, res if residual else None)
    got = _launcher().norm_linear_residual_fwd(*args, config=config)
    ref = norm_linear_residual_torch(*args)
    assert got.dtype == torch.float32 and got.shape == (*rows, n_out)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    base = res if residual else torch.zeros_like(res)
    assert rel_err(got - base, (ref - base).double()) < tol
    assert rel_err(got, linear_fp64(*args[:1], norm, fc, args[6])) < tol


@needs_triton_device
def test_triton_kernel_linear_strided_residual_through_public_op():
    # The residual is every other pixel of a wider map: read in place, not copied wrong.
    y, norm, fc, _ = make_linear(32, 48, rows=(4, 6), device=TRITON_DEVICE)
    wide = torch.randn(4, 12, 48, device=TRITON_DEVICE)
    residual = wide[:, ::2]
    got = norm_linear_residual(*_strided_vectors(linear_args(y, norm, fc, residual)))
    assert rel_err(got, linear_fp64(y, norm, fc, residual)) < 2e-3


def test_torch_paths_ignore_a_callers_autocast():
    # The models call these ops under autocast; the PyTorch paths round only where the kernels
    # do, so autocast must not turn their fp32 GEMMs into bf16 ones.
    x, norm, fc1, fc2 = make(24, 96, torch.float16)
    args = args_of(x, norm, fc1, fc2)
    plain = norm_mlp_residual(*args)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.equal(norm_mlp_residual(*args), plain)
        lin = (*args[:6], None)
        assert torch.equal(norm_linear_residual(*lin), norm_linear_residual_torch(*lin))


try:  # a module-level kernel: Triton resolves a kernel's names in its module's globals
    from mamba_perception_kernels.triton.common import gelu_erf
    import triton
    import triton.language as tl

    @triton.jit
    def _gelu_kernel(x_ptr, y_ptr, n, FAST: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        x = tl.load(x_ptr + offs, mask=ok, other=0.0)
        tl.store(y_ptr + offs, gelu_erf(x, FAST), mask=ok)
except ImportError:  # no triton: the kernel tests skip
    pass


@needs_triton_device
@pytest.mark.parametrize('fast', [False, pytest.param(True, marks=pytest.mark.skipif(
    TRITON_DEVICE != 'cuda', reason='PTX approximations: CUDA only'))])
def test_triton_kernel_gelu_erf_is_exact_gelu(fast):
    # The shared GELU of the fused MLP and the stem (erf by Abramowitz & Stegun 7.1.26) vs the
    # exact GELU in float64: within 5e-7 absolute everywhere (torch's fp32 GELU: 1.2e-6).
    x = torch.cat([torch.linspace(-12, 12, 48_001), 3 * torch.randn(16_000,
                   generator=torch.Generator().manual_seed(0)),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0])]).to(TRITON_DEVICE)
    y = torch.empty_like(x)
    _gelu_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), FAST=fast, BLOCK=1024)
    exact = 0.5 * x.double() * (1 + torch.erf(x.double() / 2 ** 0.5))
    err = (y.double() - exact).abs()
    assert err.max() < 5e-7, float(err.max())
    assert torch.isfinite(y).all() and y[x > 10].equal(x[x > 10])  # the tails: x and ~0
    # rounded to fp16 (as the kernels do next): at most one fp16 ulp from the exact value's
    # rounding (torch's fp32 GELU is not a better oracle: 1 + erf cancels below x ~ -5)
    ulp = (y.half().double() - exact.half().double()).abs()
    assert (ulp <= 2.0 ** -10 * exact.abs().clamp(min=2.0 ** -14)).all()
