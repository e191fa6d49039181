"""Depthwise convolutions over channels-last maps (+ bias, + SiLU): VMamba's and Vim's.

``dwconv2d_nhwc``: depthwise k x k convolution over a (B, H, W, C) map, optional bias and SiLU.
``dwconv1d_bidir_silu``: Vim's two 1-D convs of a token-major (B, L, E) map (causal for the
forward scan, anti-causal for the backward one) + bias + SiLU, written as (B, 2, L, E).

``dwconv2d_nhwc(x, weight, bias, silu)`` is the custom op ``mamba_perception::dwconv2d_nhwc``:
on CUDA a single Triton kernel (``triton/dwconv.py``) reads the NHWC activation in place and
writes NHWC; elsewhere (or with ``MAMBA_PERCEPTION_SCAN_BACKEND=torch-chunked``) ``F.conv2d``
runs on the NCHW view. Both return a new contiguous (B, H, W, C) tensor, which is also what the
fake impl describes (``torch.compile`` / inductor assert the real strides against it).

The backward is plain PyTorch (``torch.nn.grad`` convolution gradients on NCHW views, the SiLU
derivative from the recomputed pre-activation): correct on every device, not tuned for speed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
import torch.nn.functional as F

from .dispatch import ACT_DTYPES, backend_name, check_tensor
from .errors import ScanInputError

__all__ = ["dwconv1d_bidir_silu", "dwconv1d_bidir_silu_op", "dwconv1d_bidir_silu_torch",
           "dwconv2d_nhwc", "dwconv2d_nhwc_op", "dwconv2d_nhwc_torch"]

LIB = "mamba_perception"


def _nhwc_out(y_nchw: Tensor) -> Tensor:
    """(B, C, H, W) -> a contiguous (B, H, W, C) tensor with exactly the canonical strides.

    ``contiguous()`` keeps whatever stride a size-1 dimension happens to have, while the fake
    impl (``new_empty``) has canonical strides and inductor compares them, so copy when needed.
    """
    y = y_nchw.permute(0, 2, 3, 1)
    out_shape = tuple(y.shape)
    canonical = torch.empty(out_shape, device="meta").stride()
    if y.stride() == canonical:
        return y
    return torch.empty(out_shape, dtype=y.dtype, device=y.device).copy_(y)


def _compute_dtype(x: Tensor) -> torch.dtype:
    # The CPU has no fast / fp32-accumulating 16-bit convolution: compute in fp32 there (one
    # rounding at the end, as the Triton kernel does). CUDA convolutions accumulate in fp32
    # already, and the CUDA fallback should time what cuDNN does.
    if x.dtype in (torch.float32, torch.float64) or x.is_cuda:
        return x.dtype
    return torch.float32


def _preact(x_nchw: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """conv(x) + bias on NCHW, in x_nchw's dtype (the caller has cast everything)."""
    return F.conv2d(x_nchw, weight, bias, padding=weight.shape[-1] // 2,
                    groups=weight.shape[0])


def dwconv2d_nhwc_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                        silu: bool = False) -> Tensor:
    """PyTorch path of :func:`dwconv2d_nhwc` (no validation): F.conv2d on the NCHW view."""
    dtype = _compute_dtype(x)
    y = _preact(x.permute(0, 3, 1, 2).to(dtype), weight.to(dtype),
                None if bias is None else bias.to(dtype))
    if silu:
        y = F.silu(y)
    return _nhwc_out(y.to(x.dtype))


def _triton():
    """Import the Triton launcher lazily (Triton is never imported on the CPU path)."""
    from .triton import dwconv

    return dwconv


@torch.library.custom_op(f"{LIB}::dwconv2d_nhwc", mutates_args=())
def dwconv2d_nhwc_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    """Return (B, H, W, C) contiguous in x.dtype: depthwise conv, + bias, -> SiLU if asked."""
    if backend_name(x.device) == "triton":
        tri = _triton()
        # Offsets inside one image are int32 in the kernel; larger maps take the torch path.
        if tri.fits_int32(x, x.shape[3]):
            return tri.dwconv2d_nhwc_fwd(x, weight, bias, silu)
    return dwconv2d_nhwc_torch(x, weight, bias, silu)


@dwconv2d_nhwc_op.register_fake
def _(x, weight, bias, silu):
    # new_empty: contiguous (B, H, W, C), the strides both real paths return.
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu = silu


def _backward(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    # fp32 (fp64 for fp64 inputs) throughout: 16-bit gradients are rounded once at the end.
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    ksize, channels = weight.shape[-1], weight.shape[0]
    pad = ksize // 2
    x_nchw = x.permute(0, 3, 1, 2).to(dtype)
    w = weight.to(dtype)
    g = dy.permute(0, 3, 1, 2).to(dtype)
    if ctx.silu:
        z = _preact(x_nchw, w, None if bias is None else bias.to(dtype))
        sig = torch.sigmoid(z)
        g = g * sig * (1 + z * (1 - sig))
    dx = dw = db = None
    if need_x:
        dx = torch.nn.grad.conv2d_input(x_nchw.shape, w, g, padding=pad, groups=channels)
        dx = dx.permute(0, 2, 3, 1).to(x.dtype)
    if need_w:
        dw = torch.nn.grad.conv2d_weight(x_nchw, w.shape, g, padding=pad, groups=channels)
        dw = dw.to(weight.dtype)
    if need_b and bias is not None:
        db = g.sum((0, 2, 3)).to(bias.dtype)
    return dx, dw, db, None


dwconv2d_nhwc_op.register_autograd(_backward, setup_context=_setup_context)


def check_dwconv(x, weight, bias) -> int:
    """Validate ``dwconv2d_nhwc`` arguments (ScanInputError names the tensor); returns k."""
    check_tensor("x", x, (None, None, None, None), ACT_DTYPES, None)
    channels = x.shape[3]
    check_tensor("weight", weight, (channels, 1, None, None), ACT_DTYPES, x.device)
    ksize = weight.shape[2]
    if weight.shape[3] != ksize or ksize % 2 == 0:
        raise ScanInputError(
            f"weight must be (C, 1, k, k) with odd k (stride 1, 'same' padding k//2); got "
            f"shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, (channels,), ACT_DTYPES, x.device)
    return ksize


def dwconv2d_nhwc(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  silu: bool = False) -> Tensor:
    """Depthwise k x k convolution (stride 1, zero 'same' padding) over a channels-last map.

    Same result as ``nn.Conv2d(C, C, k, padding=k // 2, groups=C)`` applied to
    ``x.permute(0, 3, 1, 2)`` (then ``F.silu`` when ``silu``), returned channels-last::

        x:       (B, H, W, C)  fp32 / fp16 / bf16 (fp64 on the CPU); any strides, channel
                               stride 1 is the fast path
        weight:  (C, 1, k, k)  odd k; the Conv2d's ``.weight``, any float dtype (cast)
        bias:    (C,)          optional
        returns  (B, H, W, C)  new contiguous tensor in x.dtype

    Triton kernel on CUDA (fp32 accumulation, one rounding), ``F.conv2d`` elsewhere; the op is
    ``torch.ops.mamba_perception.dwconv2d_nhwc`` with a fake impl and a registered backward.
    Raises ScanInputError (a ValueError) naming the offending tensor.
    """
    check_dwconv(x, weight, bias)
    return dwconv2d_nhwc_op(x, weight, bias, bool(silu))


# ----------------------------------------------------------------------- dwconv1d_bidir_silu


def dwconv1d_bidir_silu_torch(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """PyTorch path of :func:`dwconv1d_bidir_silu` (no validation).

    k shifted multiply-adds per direction on the token-major map, then bias + SiLU.
    """
    k, length = weight.shape[2], x.shape[1]
    w, b = weight.to(x.dtype), bias.to(x.dtype)
    xp = F.pad(x, (0, 0, k - 1, k - 1))  # [B, L + 2(k-1), E]
    x_f = b[0] + sum(xp[:, j:j + length] * w[0, :, j] for j in range(k))
    x_b = b[1] + sum(xp[:, k - 1 + j:k - 1 + j + length] * w[1, :, j] for j in range(k))
    return F.silu(torch.stack((x_f, x_b), dim=1))


@torch.library.custom_op(f"{LIB}::dwconv1d_bidir_silu", mutates_args=())
def dwconv1d_bidir_silu_op(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Return u (B, 2, L, E) contiguous in x.dtype."""
    if backend_name(x.device) == "triton" and x.stride(2) == 1:
        return _triton().dwconv1d_bidir_silu_fwd(x, weight, bias)
    return dwconv1d_bidir_silu_torch(x, weight, bias).contiguous()


@dwconv1d_bidir_silu_op.register_fake
def _(x, weight, bias):
    batch, length, channels = x.shape
    return x.new_empty(batch, 2, length, channels)


def _bidir_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bidir_backward(ctx, du):
    # Autograd through the PyTorch path, recomputed (the op is inference-tuned; this is exact).
    inputs = [t.detach().requires_grad_(need)
              for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad, strict=True)]
    with torch.enable_grad():
        u = dwconv1d_bidir_silu_torch(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(u, wanted, du))
    return tuple(next(grads) if t.requires_grad else None for t in inputs)


dwconv1d_bidir_silu_op.register_autograd(_bidir_backward, setup_context=_bidir_setup_context)


def dwconv1d_bidir_silu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Vim's two depthwise 1-D convs + bias + SiLU over a token-major map, in one pass.

    ``u[:, 0, t] = silu(bias[0] + sum_j weight[0, :, j] * x[:, t - (k-1) + j])`` (causal, as
    the forward branch's ``conv1d``) and ``u[:, 1, t] = silu(bias[1] + sum_j weight[1, :, j] *
    x[:, t + j])`` (anti-causal: the backward branch's causal conv over the reversed sequence
    with its kernel flipped), zero padding::

        x:       (B, L, E)     fp32 / fp16 / bf16 (fp64 on the CPU); channel stride 1 is the
                               Triton path, other strides the PyTorch one
        weight:  (2, E, k)     direction 1's taps already flipped; any float dtype (cast)
        bias:    (2, E)
        returns  (B, 2, L, E)  new contiguous tensor in x.dtype

    Triton kernel on CUDA (fp32 accumulation, one rounding per output), shifted multiply-adds
    elsewhere. Raises ScanInputError (a ValueError) naming the offending tensor.
    """
    check_tensor("x", x, (None, None, None), ACT_DTYPES, None)
    check_tensor("weight", weight, (2, x.shape[2], None), ACT_DTYPES, x.device)
    check_tensor("bias", bias, (2, x.shape[2]), ACT_DTYPES, x.device)
    return dwconv1d_bidir_silu_op(x, weight, bias)
