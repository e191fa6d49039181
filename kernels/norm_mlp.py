"""Pre-norm MLP block half with its residual, fused: ``x + fc2(gelu(fc1(layer_norm(x))))``.

``norm_mlp_residual(x, norm_weight, norm_bias, eps, w1, b1, w2, b2)`` is the custom op
``mamba_perception::norm_mlp_residual``: on CUDA, for at most ``MAX_CHANNELS`` channels, one
Triton kernel (``triton/norm_mlp.py``) keeps the hidden activation on chip; elsewhere (CPU,
more channels, ``MAMBA_PERCEPTION_SCAN_BACKEND=torch-chunked``) PyTorch runs the same math
as separate ops. Inference only: no backward is registered (models use the op when gradients
are off and fall back to their modules otherwise).

Precision contract (both paths): LayerNorm in fp32 on the fp32 (or 16-bit) input, its output
rounded once to the weights' dtype, fp32-accumulating GEMMs in that dtype, exact erf GELU,
fp32 result (the residual stream of VMamba stays fp32 under autocast, as the official code's).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
import torch.nn.functional as F

from .dispatch import ACT_DTYPES, backend_name, check_tensor
from .errors import ScanInputError

__all__ = ["MAX_CHANNELS", "norm_mlp_residual", "norm_mlp_residual_op", "norm_mlp_residual_torch"]

LIB = "mamba_perception"
MAX_CHANNELS = 256  # the Triton kernel holds a row of C channels in registers (triton/norm_mlp)


def norm_mlp_residual_torch(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                            w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                            b2: Optional[Tensor]) -> Tensor:
    """PyTorch path of :func:`norm_mlp_residual` (no validation).

    fp32 arithmetic on operands rounded where the kernel rounds them (the normalised rows and
    the GELU output, to the weights' dtype): the kernel's result up to summation order.
    """
    dtype = w1.dtype
    a = F.layer_norm(x.float(), (x.shape[-1],), norm_weight.float(), norm_bias.float(), eps)
    h = F.linear(a.to(dtype).float(), w1.float(), None if b1 is None else b1.float())
    h = F.gelu(h).to(dtype).float()
    y = F.linear(h, w2.float(), None if b2 is None else b2.float())
    return x.float() + y


def _triton():
    """Import the Triton launcher lazily (Triton is never imported on the CPU path)."""
    from .triton import norm_mlp

    return norm_mlp


@torch.library.custom_op(f"{LIB}::norm_mlp_residual", mutates_args=())
def norm_mlp_residual_op(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                         w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                         b2: Optional[Tensor]) -> Tensor:
    """Return ``x + fc2(gelu(fc1(LN(x))))``: a new contiguous fp32 tensor shaped like x."""
    if backend_name(x.device) == "triton" and x.shape[-1] <= MAX_CHANNELS:
        return _triton().norm_mlp_residual_fwd(
            x, norm_weight, norm_bias, eps, w1.contiguous(), b1, w2.contiguous(), b2)
    return norm_mlp_residual_torch(x, norm_weight, norm_bias, eps, w1, b1, w2, b2)


@norm_mlp_residual_op.register_fake
def _(x, norm_weight, norm_bias, eps, w1, b1, w2, b2):
    return x.new_empty(x.shape, dtype=torch.float32)  # contiguous, as both paths return


def norm_mlp_residual(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                      w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                      b2: Optional[Tensor] = None) -> Tensor:
    """``x + fc2(gelu(fc1(layer_norm(x))))`` over the last dimension, in one pass on CUDA.

    Shapes (nn.LayerNorm / nn.Linear parameters as they are)::

        x:            (..., C)   fp32 / fp16 / bf16, channel stride 1
        norm_weight:  (C,)       norm_bias: (C,)
        w1:           (HID, C)   b1: (HID,) or None     fp16 / bf16 / fp32: the GEMM dtype
        w2:           (C, HID)   b2: (C,) or None       same dtype as w1
        returns       (..., C)   new contiguous fp32 tensor

    Raises ScanInputError (a ValueError) naming the offending tensor.
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ScanInputError(f"x must be a torch.Tensor of shape (..., C); got {x!r:.80}")
    check_tensor("x", x, (None,) * x.dim(), ACT_DTYPES, None)
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ScanInputError(f"x must have a unit channel (last-dimension) stride; got strides "
                             f"{tuple(x.stride())}")
    channels = x.shape[-1]
    check_tensor("norm_weight", norm_weight, (channels,), ACT_DTYPES, x.device)
    check_tensor("norm_bias", norm_bias, (channels,), ACT_DTYPES, x.device)
    check_tensor("w1", w1, (None, channels), ACT_DTYPES, x.device)
    hidden = w1.shape[0]
    check_tensor("w2", w2, (channels, hidden), (w1.dtype,), x.device)
    if b1 is not None:
        check_tensor("b1", b1, (hidden,), ACT_DTYPES, x.device)
    if b2 is not None:
        check_tensor("b2", b2, (channels,), ACT_DTYPES, x.device)
    return norm_mlp_residual_op(x, norm_weight, norm_bias, float(eps), w1, b1, w2, b2)
