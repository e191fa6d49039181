"""Resize-shift-sum of per-tap maps: a 3x3 conv of a bilinearly upsampled map, done coarse.

``conv2d(resize(x, (H, W)), W3x3, padding=1)`` equals, tap by tap, the resized 1x1 products
``W3x3[:, :, ky, kx] x`` shifted by ``(ky - 1, kx - 1)`` (the resize mixes no channels, the
product no pixels). UperNet's fusion conv runs its three coarse levels that way
(``mamba_perception.models.heads.segmentation``): one GEMM per level at the level's own
resolution gives ``taps`` (B, 9 C, h, w), tap-major channels (tap = 3 ky + kx), and this op
sums what the resized, shifted taps give at (H, W).

``resize_tap_sum(base, taps, scale, shift, relu)`` =
``relu(scale * (base + sum over levels and taps of shift_tap(resize(taps[level][tap]))) + shift)``
per channel; ``base`` (B, C, H, W) is the finest level's conv output. A custom op
(``mamba_perception::resize_tap_sum``): on CUDA one Triton kernel for all levels
(``triton/resize.py``); elsewhere the same math as PyTorch ops. Inference only (no backward).

Precision contract (both paths): every input read as it is and accumulated in fp32 (float64 on
the CPU for float64 inputs), the resize's source indices and weights as
``F.interpolate(mode='bilinear', align_corners=False)`` computes them, one rounding to
``base``'s dtype at the end. The result is a new channels-last (B, C, H, W) tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
import torch.nn.functional as F

from .dispatch import ACT_DTYPES, backend_name, check_tensor, dense_vectors, without_autocast
from .errors import ScanInputError

__all__ = ["MAX_LEVELS", "resize_tap_sum", "resize_tap_sum_op", "resize_tap_sum_torch"]

LIB = "mamba_perception"
MAX_LEVELS = 3  # tap maps per call: the Triton kernel sums them in one pass


@without_autocast
def resize_tap_sum_torch(base: Tensor, taps: list[Tensor], scale: Optional[Tensor],
                         shift: Optional[Tensor], relu: bool) -> Tensor:
    """PyTorch path of :func:`resize_tap_sum` (no validation), the kernel's roundings."""
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    channels, height, width = base.shape[1:]
    total = base.to(dtype)
    for level in taps:
        level = level.to(dtype)
        for tap in range(9):
            ky, kx = divmod(tap, 3)
            resized = F.interpolate(level[:, tap * channels:(tap + 1) * channels],
                                    size=(height, width), mode='bilinear', align_corners=False)
            # tap (ky, kx) of a padding-1 conv reads (y + ky - 1, x + kx - 1), zero outside
            total = total + F.pad(resized, (1, 1, 1, 1))[:, :, ky:ky + height, kx:kx + width]
    if scale is not None:
        total = total * scale.to(dtype)[:, None, None] + shift.to(dtype)[:, None, None]
    if relu:
        total = total.clamp_min(0)
    return total.to(base.dtype).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op(f"{LIB}::resize_tap_sum", mutates_args=())
def resize_tap_sum_op(base: Tensor, taps: list[Tensor], scale: Optional[Tensor],
                      shift: Optional[Tensor], relu: bool) -> Tensor:
    """Return the resize-shift-sum (module docstring): (B, C, H, W) channels-last."""
    if backend_name(base.device) == "triton":
        from .triton.resize import fits_int32, resize_tap_sum_fwd

        if fits_int32(base, taps):  # the kernel's offsets inside an image are int32
            if scale is not None:
                scale, shift = (t.float() for t in dense_vectors(scale, shift))
            return resize_tap_sum_fwd(base, list(taps), scale, shift, relu)
    return resize_tap_sum_torch(base, list(taps), scale, shift, relu)


@resize_tap_sum_op.register_fake
def _(base, taps, scale, shift, relu):
    return torch.empty_like(base, memory_format=torch.channels_last)


def resize_tap_sum(base: Tensor, taps: list[Tensor], scale: Optional[Tensor] = None,
                   shift: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """Add the resized, shifted tap maps of each level to ``base`` (module docstring).

    Shapes::

        base:          (B, C, H, W)        fp32 / fp16 / bf16 (float64 on the CPU), any strides
        taps:          list of 1 to 3 (B, 9 C, h, w) maps, h and w per level, same dtype
                       and device as base, any strides (channels-last is the fast layout)
        scale, shift:  (C,) or both None   per-channel affine after the sum (a folded BatchNorm)
        returns        (B, C, H, W)        new channels-last tensor in base's dtype

    Raises ScanInputError (a ValueError) naming the offending tensor.
    """
    if not isinstance(base, Tensor) or base.dim() != 4:
        raise ScanInputError(f"base must be a torch.Tensor of shape (B, C, H, W); "
                             f"got {base!r:.80}")
    check_tensor("base", base, (None,) * 4, ACT_DTYPES, None)
    batch, channels = base.shape[:2]
    if not isinstance(taps, (list, tuple)) or not 1 <= len(taps) <= MAX_LEVELS:
        raise ScanInputError(f"taps must be a list of 1 to {MAX_LEVELS} (B, 9 C, h, w) "
                             f"tensors; got {taps!r:.80}")
    for i, level in enumerate(taps):
        check_tensor(f"taps[{i}]", level, (batch, 9 * channels, None, None), (base.dtype,),
                     base.device)
        if level.shape[2] == 0 or level.shape[3] == 0:
            raise ScanInputError(f"taps[{i}] has an empty map: shape {tuple(level.shape)}")
    if (scale is None) != (shift is None):
        raise ScanInputError("scale and shift go together: pass both or neither")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            check_tensor(name, t, (channels,), ACT_DTYPES, base.device)
    return resize_tap_sum_op(base, list(taps), scale, shift, bool(relu))
