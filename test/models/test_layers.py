"""Shared model helpers: cast_autocast_weights, linear_gelu_tanh."""

import copy

import pytest
import torch

from mamba_perception.models import create_model
from mamba_perception.models.layers import cast_autocast_weights, linear_gelu_tanh


@pytest.mark.parametrize('name', ['vmamba_test', 'vim_test'])
def test_cast_weights_give_the_same_autocast_output(name):
    # The cast is what autocast does to these weights on every call, done once: under the
    # same autocast the outputs must be identical, not merely close.
    torch.manual_seed(0)
    model = create_model(name, num_classes=0).eval()
    cast = cast_autocast_weights(copy.deepcopy(model), torch.bfloat16)
    x = torch.randn(1, 3, 64, 96)
    # Gradients on: the module path everywhere (no grad-free fused inference ops).
    with torch.enable_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        ref = model.forward_intermediates(x)
        got = cast.forward_intermediates(x)
    for g, r in zip(got, ref, strict=True):
        assert torch.isfinite(r).all()
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_cast_weights_pick_matmul_operands_only():
    vmamba = cast_autocast_weights(create_model('vmamba_test'), torch.float16)
    dtypes = {n: p.dtype for n, p in vmamba.named_parameters()}
    block = 'layers.0.blocks.0.'
    for name in ('op.in_proj.weight', 'op.out_proj.weight', 'op.conv2d.weight',
                 'op.x_proj_weight', 'mlp.fc1.weight', 'mlp.fc1.bias'):
        assert dtypes[block + name] == torch.float16, name
    for name in ('norm.weight', 'op.out_norm.weight', 'op.A_logs', 'op.Ds',
                 'op.dt_projs_weight', 'op.dt_projs_bias'):
        assert dtypes[block + name] == torch.float32, name
    assert dtypes['patch_embed.0.weight'] == torch.float16  # a Conv2d

    vim = cast_autocast_weights(create_model('vim_test'), torch.float16)
    dtypes = {n: p.dtype for n, p in vim.named_parameters()}
    mixer = next(n for n in dtypes if n.endswith('.x_proj.weight')).rsplit('x_proj.', 1)[0]
    assert dtypes[mixer + 'in_proj.weight'] == torch.float16
    assert dtypes[mixer + 'dt_proj.weight'] == torch.float16
    # read as the scan's fp32 delta_bias: rounding it to 16 bits would change the model
    assert dtypes[mixer + 'dt_proj.bias'] == torch.float32
    assert dtypes[mixer + 'dt_proj_b.bias'] == torch.float32


@pytest.mark.parametrize('device, dtype', [
    ('cpu', torch.bfloat16), ('cpu', torch.float32),
    pytest.param('cuda', torch.float16, marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason='the cuBLASLt GELU epilogue needs CUDA')),
    pytest.param('cuda', torch.bfloat16, marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason='the cuBLASLt GELU epilogue needs CUDA')),
])
def test_linear_gelu_tanh_is_the_tanh_gelu_of_the_linear(device, dtype):
    # (B, H, W, C) rows as VMamba's MLP feeds them; pre-activations spread over [-6, 6], where
    # the tanh form and erf differ most (|x| ~ 2.7 and the negative tail).
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 48, generator=gen).to(device, dtype)
    weight = (torch.randn(192, 48, generator=gen) / 3).to(device, dtype)
    bias = torch.randn(192, generator=gen).to(device, dtype)
    got = linear_gelu_tanh(x, weight, bias)
    assert got.shape == (2, 5, 7, 192) and got.dtype == dtype
    pre = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    assert pre.abs().max() > 4  # the test reaches the tails
    ref = torch.nn.functional.gelu(pre, approximate='tanh')
    # One rounding of the fp32 result to ``dtype`` (the GPU epilogue rounds the accumulator's
    # GELU once; the CPU path rounds the GEMM output, then the GELU output).
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    err = (got.double() - ref).norm() / ref.norm()
    assert err < tol
    # ... and it is the tanh form, not erf: against erf the error is at least the forms' gap
    # where that gap exceeds the rounding (fp32 only; 16-bit rounding hides it).
    if dtype == torch.float32:
        erf = torch.nn.functional.gelu(pre)
        gap = (erf - ref).abs() > 1e-4
        assert gap.any()
        assert ((got.double() - ref).abs()[gap] < (got.double() - erf).abs()[gap]).all()
