"""Pre-norm linear layers fused with their residual (inference ops, ``triton/prenorm.py``).

* ``norm_mlp_residual(x, norm_weight, norm_bias, eps, w1, b1, w2, b2, branch)`` =
  ``s + fc2(gelu(fc1(layer_norm(s))))`` with ``s = x [+ branch]``: the second half of a VMamba
  block (and the first half's residual add), the hidden activation and s kept on chip;
* ``norm_linear_residual(y, norm_weight, norm_bias, eps, w, b, residual)`` =
  ``residual + linear(layer_norm(y))``: the end of VMamba's SS2D mixer and its residual add.

Both are custom ops (``mamba_perception::...``): on CUDA, for at most ``MAX_CHANNELS`` input
channels, one Triton kernel each; elsewhere (CPU, more channels,
``MAMBA_PERCEPTION_SCAN_BACKEND=torch-chunked``) PyTorch runs the same math as separate ops.
Inference only: no backward is registered (models use the ops when gradients are off and fall
back to their modules otherwise).

Precision contract (both paths): LayerNorm in fp32 on the fp32 (or 16-bit) input, its output
rounded once to the weights' dtype, fp32-accumulating GEMMs in that dtype, exact erf GELU,
fp32 result (the residual stream of VMamba under autocast, as the official code's), which
``norm_mlp_residual`` rounds once to ``out_dtype`` where given (a 16-bit residual stream).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
import torch.nn.functional as F

from .dispatch import (
    ACT_DTYPES,
    OUT_DTYPES,
    backend_name,
    check_out_dtype,
    check_tensor,
    dense_vectors,
    without_autocast,
)
from .errors import ScanInputError

__all__ = ["MAX_CHANNELS", "norm_linear_residual", "norm_linear_residual_op",
           "norm_linear_residual_torch", "norm_mlp_residual", "norm_mlp_residual_op",
           "norm_mlp_residual_torch"]

LIB = "mamba_perception"
MAX_CHANNELS = 256  # the Triton kernels hold a row of C channels in registers


@without_autocast
def norm_mlp_residual_torch(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                            w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                            b2: Optional[Tensor], branch: Optional[Tensor] = None,
                            out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """PyTorch path of :func:`norm_mlp_residual` (no validation).

    fp32 arithmetic on operands rounded where the kernel rounds them (the normalised rows and
    the GELU output, to the weights' dtype): the kernel's result up to summation order.
    """
    dtype = w1.dtype
    x = x.float() if branch is None else x.float() + branch.float()
    a = F.layer_norm(x, (x.shape[-1],), norm_weight.float(), norm_bias.float(), eps)
    h = F.linear(a.to(dtype).float(), w1.float(), None if b1 is None else b1.float())
    h = F.gelu(h).to(dtype).float()
    y = F.linear(h, w2.float(), None if b2 is None else b2.float())
    return (x + y).to(out_dtype or torch.float32)


def _triton():
    """Import the Triton launcher lazily (Triton is never imported on the CPU path)."""
    from .triton import prenorm

    return prenorm


@torch.library.custom_op(f"{LIB}::norm_mlp_residual", mutates_args=())
def norm_mlp_residual_op(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                         w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                         b2: Optional[Tensor], branch: Optional[Tensor] = None,
                         out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Return ``s + fc2(gelu(fc1(LN(s))))``, ``s = x [+ branch]``: new contiguous, like x."""
    if backend_name(x.device) == "triton" and x.shape[-1] <= MAX_CHANNELS:
        norm_weight, norm_bias, b1, b2 = dense_vectors(norm_weight, norm_bias, b1, b2)
        return _triton().norm_mlp_residual_fwd(
            x, norm_weight, norm_bias, eps, w1.contiguous(), b1, w2.contiguous(), b2,
            branch=branch, out_dtype=out_dtype)
    return norm_mlp_residual_torch(x, norm_weight, norm_bias, eps, w1, b1, w2, b2, branch,
                                   out_dtype)


@norm_mlp_residual_op.register_fake
def _(x, norm_weight, norm_bias, eps, w1, b1, w2, b2, branch=None, out_dtype=None):
    # contiguous, as both paths return
    return x.new_empty(x.shape, dtype=out_dtype or torch.float32)


def norm_mlp_residual(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                      w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                      b2: Optional[Tensor] = None, branch: Optional[Tensor] = None,
                      out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``s + fc2(gelu(fc1(layer_norm(s))))``, ``s = x [+ branch]``, in one pass on CUDA.

    ``branch`` is the output of the block's first half, whose residual add (fp32, as
    ``x + branch`` under autocast) is then done inside the op: s never goes to memory.
    ``out_dtype`` (fp32 / fp16 / bf16; None: fp32): the result, computed in fp32, is rounded
    to it once (a 16-bit residual stream).

    Shapes (nn.LayerNorm / nn.Linear parameters as they are)::

        x:            (..., C)   fp32 / fp16 / bf16, channel stride 1
        branch:       (..., C)   or None; x's shape, any of those dtypes, channel stride 1
        norm_weight:  (C,)       norm_bias: (C,)
        w1:           (HID, C)   b1: (HID,) or None     fp16 / bf16 / fp32: the GEMM dtype
        w2:           (C, HID)   b2: (C,) or None       same dtype as w1
        returns       (..., C)   new contiguous tensor in out_dtype (fp32 when None)

    Raises ScanInputError (a ValueError) naming the offending tensor or dtype.
    """
    channels = _check_rows("x", x)
    check_out_dtype(out_dtype, OUT_DTYPES)
    if branch is not None:
        _check_rows("branch", branch)
        check_tensor("branch", branch, tuple(x.shape), ACT_DTYPES, x.device)
    _check_norm(norm_weight, norm_bias, channels, x.device)
    check_tensor("w1", w1, (None, channels), ACT_DTYPES, x.device)
    hidden = w1.shape[0]
    check_tensor("w2", w2, (channels, hidden), (w1.dtype,), x.device)
    if b1 is not None:
        check_tensor("b1", b1, (hidden,), ACT_DTYPES, x.device)
    if b2 is not None:
        check_tensor("b2", b2, (channels,), ACT_DTYPES, x.device)
    return norm_mlp_residual_op(x, norm_weight, norm_bias, float(eps), w1, b1, w2, b2, branch,
                                out_dtype)


def _check_rows(name: str, x) -> int:
    """Validate a (..., C) activation with a unit channel stride; return C."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ScanInputError(f"{name} must be a torch.Tensor of shape (..., C); got {x!r:.80}")
    check_tensor(name, x, (None,) * x.dim(), ACT_DTYPES, None)
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ScanInputError(f"{name} must have a unit channel (last-dimension) stride; got "
                             f"strides {tuple(x.stride())}")
    return x.shape[-1]


def _check_norm(norm_weight, norm_bias, channels: int, device) -> None:
    check_tensor("norm_weight", norm_weight, (channels,), ACT_DTYPES, device)
    check_tensor("norm_bias", norm_bias, (channels,), ACT_DTYPES, device)


# --------------------------------------------------------------------------------------------
# residual + linear(layer_norm(y))


@without_autocast
def norm_linear_residual_torch(y: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                               w: Tensor, b: Optional[Tensor],
                               residual: Optional[Tensor]) -> Tensor:
    """PyTorch path of :func:`norm_linear_residual` (no validation), the kernel's roundings."""
    a = F.layer_norm(y.float(), (y.shape[-1],), norm_weight.float(), norm_bias.float(), eps)
    out = F.linear(a.to(w.dtype).float(), w.float(), None if b is None else b.float())
    return out if residual is None else residual.float() + out


@torch.library.custom_op(f"{LIB}::norm_linear_residual", mutates_args=())
def norm_linear_residual_op(y: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                            w: Tensor, b: Optional[Tensor],
                            residual: Optional[Tensor]) -> Tensor:
    """Return ``residual + linear(LN(y), w, b)``: a new contiguous fp32 tensor."""
    if backend_name(y.device) == "triton" and y.shape[-1] <= MAX_CHANNELS:
        norm_weight, norm_bias, b = dense_vectors(norm_weight, norm_bias, b)
        return _triton().norm_linear_residual_fwd(y, norm_weight, norm_bias, eps,
                                                  w.contiguous(), b, residual)
    return norm_linear_residual_torch(y, norm_weight, norm_bias, eps, w, b, residual)


@norm_linear_residual_op.register_fake
def _(y, norm_weight, norm_bias, eps, w, b, residual):
    return y.new_empty((*y.shape[:-1], w.shape[0]), dtype=torch.float32)


def norm_linear_residual(y: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                         w: Tensor, b: Optional[Tensor] = None,
                         residual: Optional[Tensor] = None) -> Tensor:
    """``residual + linear(layer_norm(y), w, b)`` over the last dimension, one pass on CUDA.

    Shapes (nn.LayerNorm / nn.Linear parameters as they are)::

        y:            (..., C)   fp32 / fp16 / bf16, channel stride 1
        norm_weight:  (C,)       norm_bias: (C,)
        w:            (N, C)     b: (N,) or None       fp16 / bf16 / fp32: the GEMM dtype
        residual:     (..., N)   or None; y's leading shape, channel stride 1
        returns       (..., N)   new contiguous fp32 tensor

    Raises ScanInputError (a ValueError) naming the offending tensor.
    """
    channels = _check_rows("y", y)
    _check_norm(norm_weight, norm_bias, channels, y.device)
    check_tensor("w", w, (None, channels), ACT_DTYPES, y.device)
    n_out = w.shape[0]
    if b is not None:
        check_tensor("b", b, (n_out,), ACT_DTYPES, y.device)
    if residual is not None:
        _check_rows("residual", residual)
        check_tensor("residual", residual, (*y.shape[:-1], n_out), ACT_DTYPES, y.device)
    return norm_linear_residual_op(y, norm_weight, norm_bias, float(eps), w, b, residual)
