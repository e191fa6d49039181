"""VMamba's convolutional stem as one inference op (``triton/stem.py`` on CUDA).

``conv_norm_stem(x, w1, b1, n1_weight, n1_bias, eps1, w2, b2, n2_weight, n2_bias, eps2)`` =
``LN2(conv2(gelu(LN1(conv1(x)))))``: two 3x3 convs with stride 2 and padding 1, each followed by
a LayerNorm over channels, exact GELU between; NCHW image in, channels-last map out. That is
VMamba v2's patch embedding (official ``patch_embed`` indices 0, 2, 5, 7).

A custom op (``mamba_perception::conv_norm_stem``): on CUDA two Triton kernels; elsewhere
(CPU, ``MAMBA_PERCEPTION_SCAN_BACKEND=torch-chunked``) PyTorch runs the same math as separate
ops. Inference only: no backward (the model uses the op when gradients are off and its modules
otherwise).

Precision contract (both paths): the roundings of the modules under autocast. The image, each
conv's output (bias included) and the GELU output are rounded to the weights' dtype, convs
accumulate in fp32, LayerNorm and GELU run in fp32, the result is fp32 (VMamba's residual
stream under autocast). So an fp16 overflow of a conv output gives Inf and then NaN exactly
where the modules would, and Pipeline's non-finite check names the frame.
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

__all__ = ["MAX_CHANNELS", "conv_norm_stem", "conv_norm_stem_op", "conv_norm_stem_torch"]

LIB = "mamba_perception"
MAX_CHANNELS = 256  # the kernel holds a pixel's C2 (and C1) channels in registers


def conv_out_hw(height: int, width: int) -> tuple:
    """Spatial size after one of the stem's convs (kernel 3, stride 2, padding 1)."""
    return (height - 1) // 2 + 1, (width - 1) // 2 + 1


def stem_out_hw(height: int, width: int) -> tuple:
    """Spatial size after both convs."""
    return conv_out_hw(*conv_out_hw(height, width))


@without_autocast
def conv_norm_stem_torch(x: Tensor, w1: Tensor, b1: Optional[Tensor], n1_weight: Tensor,
                         n1_bias: Tensor, eps1: float, w2: Tensor, b2: Optional[Tensor],
                         n2_weight: Tensor, n2_bias: Tensor, eps2: float,
                         out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """PyTorch path of :func:`conv_norm_stem` (no validation), the kernel's roundings."""
    dtype = w1.dtype

    def f32(t):
        return None if t is None else t.float()

    h = F.conv2d(x.to(dtype).float(), w1.float(), f32(b1), stride=2, padding=1).to(dtype).float()
    h = F.layer_norm(h.permute(0, 2, 3, 1), (w1.shape[0],), f32(n1_weight), f32(n1_bias), eps1)
    h = F.gelu(h).to(dtype).float().permute(0, 3, 1, 2)
    y = F.conv2d(h, w2.float(), f32(b2), stride=2, padding=1).to(dtype).float()
    y = F.layer_norm(y.permute(0, 2, 3, 1), (w2.shape[0],), f32(n2_weight), f32(n2_bias), eps2)
    return y.to(out_dtype or torch.float32).contiguous()


@torch.library.custom_op(f"{LIB}::conv_norm_stem", mutates_args=())
def conv_norm_stem_op(x: Tensor, w1: Tensor, b1: Optional[Tensor], n1_weight: Tensor,
                      n1_bias: Tensor, eps1: float, w2: Tensor, b2: Optional[Tensor],
                      n2_weight: Tensor, n2_bias: Tensor, eps2: float,
                      out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Return ``LN2(conv2(gelu(LN1(conv1(x)))))``: (batch, H2, W2, C2) contiguous."""
    if backend_name(x.device) == "triton" and max(w1.shape[0], w2.shape[0]) <= MAX_CHANNELS:
        from .triton.stem import conv_norm_stem_fwd

        b1, n1_weight, n1_bias, b2, n2_weight, n2_bias = dense_vectors(
            b1, n1_weight, n1_bias, b2, n2_weight, n2_bias)
        return conv_norm_stem_fwd(x, w1, b1, n1_weight, n1_bias, eps1, w2, b2, n2_weight,
                                  n2_bias, eps2, out_dtype=out_dtype)
    return conv_norm_stem_torch(x, w1, b1, n1_weight, n1_bias, eps1, w2, b2, n2_weight,
                                n2_bias, eps2, out_dtype)


@conv_norm_stem_op.register_fake
def _(x, w1, b1, n1_weight, n1_bias, eps1, w2, b2, n2_weight, n2_bias, eps2, out_dtype=None):
    h2, w2_ = stem_out_hw(x.shape[2], x.shape[3])
    return x.new_empty((x.shape[0], h2, w2_, w2.shape[0]), dtype=out_dtype or torch.float32)


def conv_norm_stem(x: Tensor, w1: Tensor, b1: Optional[Tensor], n1_weight: Tensor,
                   n1_bias: Tensor, eps1: float, w2: Tensor, b2: Optional[Tensor],
                   n2_weight: Tensor, n2_bias: Tensor, eps2: float,
                   out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``LN2(conv2(gelu(LN1(conv1(x)))))``, channels-last out (two Triton kernels on CUDA).

    ``out_dtype`` (fp32 / fp16 / bf16; None: fp32): the final LayerNorm's fp32 result is
    rounded to it once (a 16-bit residual stream).

    Shapes (nn.Conv2d / nn.LayerNorm parameters as they are)::

        x:                    (batch, Cin, H, W)   fp32 / fp16 / bf16, any strides
        w1:                   (C1, Cin, 3, 3)      b1: (C1,) or None    the GEMM dtype
        n1_weight, n1_bias:   (C1,)
        w2:                   (C2, C1, 3, 3)       b2: (C2,) or None    same dtype as w1
        n2_weight, n2_bias:   (C2,)
        returns               (batch, H2, W2, C2)  new contiguous tensor in out_dtype, where
                              H2 = ceil(ceil(H / 2) / 2) (and W2 alike)

    Raises ScanInputError (a ValueError) naming the offending tensor or dtype.
    """
    check_out_dtype(out_dtype, OUT_DTYPES)
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ScanInputError(f"x must be a torch.Tensor of shape (batch, Cin, H, W); "
                             f"got {x!r:.80}")
    check_tensor("x", x, (None,) * 4, ACT_DTYPES, None)
    cin = x.shape[1]
    check_tensor("w1", w1, (None, cin, 3, 3), ACT_DTYPES, x.device)
    c1 = w1.shape[0]
    check_tensor("w2", w2, (None, c1, 3, 3), (w1.dtype,), x.device)
    c2 = w2.shape[0]
    for name, t, n in (("b1", b1, c1), ("n1_weight", n1_weight, c1), ("n1_bias", n1_bias, c1),
                       ("b2", b2, c2), ("n2_weight", n2_weight, c2), ("n2_bias", n2_bias, c2)):
        if t is not None or not name.startswith("b"):
            check_tensor(name, t, (n,), ACT_DTYPES, x.device)
    return conv_norm_stem_op(x, w1, b1, n1_weight, n1_bias, float(eps1), w2, b2, n2_weight,
                             n2_bias, float(eps2), out_dtype)
