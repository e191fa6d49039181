"""Input factories and tolerances shared by the kernel tests (not a test module)."""

import torch


def rand(*shape, dtype=torch.float32, device='cpu', scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype=dtype, device=device)


def neg_a(*shape, device='cpu', dtype=torch.float32):
    """A negative A, as -exp(A_logs) in the models."""
    return (-(torch.rand(*shape) * 1.5 + 0.05)).to(dtype=dtype, device=device)


def make_selective(batch, dim, length, groups, dstate, dtype=torch.float32, device='cpu',
                   with_d=True, with_z=True, with_bias=True, param_dtype=torch.float32):
    return dict(
        u=rand(batch, dim, length, dtype=dtype, device=device),
        delta=rand(batch, dim, length, dtype=dtype, device=device, scale=0.5),
        A=neg_a(dim, dstate, device=device, dtype=param_dtype),
        B=rand(batch, groups, dstate, length, dtype=dtype, device=device),
        C=rand(batch, groups, dstate, length, dtype=dtype, device=device),
        D=rand(dim, device=device, dtype=param_dtype) if with_d else None,
        z=rand(batch, dim, length, dtype=dtype, device=device) if with_z else None,
        delta_bias=(rand(dim, device=device, scale=0.5, dtype=param_dtype)
                    if with_bias else None),
    )


def make_ss2d(batch, dim, height, width, dstate, dtype=torch.float32, device='cpu',
              with_d=True, with_bias=True, param_dtype=torch.float32):
    return dict(
        x=rand(batch, dim, height, width, dtype=dtype, device=device),
        delta=rand(batch, 4, dim, height, width, dtype=dtype, device=device, scale=0.5),
        A=neg_a(4 * dim, dstate, device=device, dtype=param_dtype),
        B=rand(batch, 4, dstate, height, width, dtype=dtype, device=device),
        C=rand(batch, 4, dstate, height, width, dtype=dtype, device=device),
        D=rand(4 * dim, device=device, dtype=param_dtype) if with_d else None,
        delta_bias=(rand(4 * dim, device=device, scale=0.5, dtype=param_dtype)
                    if with_bias else None),
    )


def make_ss2d_lowrank(batch, height, width, dim, rank, dstate, dtype=torch.float32,
                      device='cpu', with_d=True, with_bias=True):
    """Arguments of ``ss2d_scan_lowrank``: NHWC x, packed x_proj, (4, dim, R) dt weight."""
    return dict(
        x=rand(batch, height, width, dim, dtype=dtype, device=device),
        x_proj=rand(batch, height, width, 4 * (rank + 2 * dstate), dtype=dtype, device=device,
                    scale=0.5),
        dt_weight=rand(4, dim, rank, device=device, scale=rank ** -0.5),
        A=neg_a(4 * dim, dstate, device=device),
        D=rand(4 * dim, device=device) if with_d else None,
        dt_bias=rand(4 * dim, device=device, scale=0.5) if with_bias else None,
    )


def make_bidir(batch, dim, length, dstate, dtype=torch.float32, device='cpu', with_d=True,
               with_z=True, with_bias=True, param_dtype=torch.float32):
    return dict(
        u=rand(batch, 2, dim, length, dtype=dtype, device=device),
        delta=rand(batch, 2, dim, length, dtype=dtype, device=device, scale=0.5),
        A=neg_a(2, dim, dstate, device=device, dtype=param_dtype),
        B=rand(batch, 2, dstate, length, dtype=dtype, device=device),
        C=rand(batch, 2, dstate, length, dtype=dtype, device=device),
        D=rand(2, dim, device=device, dtype=param_dtype) if with_d else None,
        z=rand(batch, dim, length, dtype=dtype, device=device) if with_z else None,
        delta_bias=(rand(2, dim, device=device, scale=0.5, dtype=param_dtype)
                    if with_bias else None),
    )


def non_contiguous(t):
    """Same values, non-contiguous strides (last axis included): a strided view of a copy."""
    if t is None or t.dim() == 0:
        return t
    big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    out = big[..., ::2]
    assert not out.is_contiguous() or out.numel() <= 1
    return out


def tol(dtype):
    """(rtol, atol) for comparing an op against the fp32 reference at the given input dtype."""
    return {torch.float32: (2e-4, 2e-4), torch.float64: (1e-9, 1e-9),
            torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)}[dtype]


def token_major(t):
    """Same values as a view of a copy with the last two axes swapped in memory: a (.., dim, L)
    channel-first view of (.., L, dim) token-major maps, as Vim's block passes them."""
    if t is None:
        return t
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)
