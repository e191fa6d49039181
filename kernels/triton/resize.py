"""Sum of nine bilinearly resized, shifted tap maps (+ base, + per-channel affine, + ReLU).

UperNet's fusion conv split by input level (``mamba_perception.models.heads.segmentation``):
a coarse level's 3x3 conv over its map resized to stride 4 equals, tap by tap, the resized 1x1
products of the coarse map (computed at its own resolution by one GEMM into ``taps``, tap-major
channels) shifted by the tap's offset. This kernel does the resize-shift-sum of up to three
levels, adds it to ``base`` (the finest level's conv output) and applies the BatchNorm (folded
to ``scale``, ``shift``) and the ReLU.

One program owns BLOCK_P output pixels (row-major over the map) times BLOCK_C channels of one
image. For each tap and output pixel it reads the four coarse neighbours of the shifted
position, BLOCK_C channels each (contiguous in a channels-last map), and accumulates the
bilinear blend in fp32; positions the shift moves outside the map contribute zero (the conv's
zero padding). The source index and weights follow ``F.interpolate(mode='bilinear',
align_corners=False)`` with an output size: ``src = (dst + 0.5) * in / out - 0.5`` clamped at 0,
its neighbour clamped at the last row / column. Neighbouring programs share most of their
coarse reads, so HBM sees about one read of ``taps`` and ``base`` and one write of the output.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..resize import MAX_LEVELS
from .common import pow2_option

# Launch configuration, read at every call. Powers of two: the best of bench/resize.py --tune
# on an H100 (UperNet's 1280x720 shapes, 512 channels, fp16): 16 x 128 x 4 warps 619 / 2446 us
# at batch 1 / 4 vs 706 / 2793 for the first guess, 32 x 64 x 4 (resize_tune_h100.json).
TUNING = {
    "block_p": 16,     # output pixels per program
    "block_c": 128,    # channels per program
    "num_warps": 4,
}


@triton.jit
def _tap_blend(taps_img, ys, y_ok, xs, x_ok, ch, t_y, t_x, h_in, w_in, scale_h, scale_w,
               mask):
    # Bilinear sample (align_corners=False) of the coarse map at the output positions (ys, xs)
    # for the channel offsets ``ch``; zero where (ys, xs) is outside the output map.
    sy = tl.maximum((ys.to(tl.float32) + 0.5) * scale_h - 0.5, 0.0)
    sx = tl.maximum((xs.to(tl.float32) + 0.5) * scale_w - 0.5, 0.0)
    # sy >= 0, so truncation is floor; the clamp keeps masked lanes' addresses in the map
    y0 = tl.minimum(sy.to(tl.int32), h_in - 1)
    x0 = tl.minimum(sx.to(tl.int32), w_in - 1)
    ly = sy - y0.to(tl.float32)
    lx = sx - x0.to(tl.float32)
    y1 = tl.minimum(y0 + 1, h_in - 1)
    x1 = tl.minimum(x0 + 1, w_in - 1)
    m = mask & (y_ok & x_ok)[:, None]
    v00 = tl.load(taps_img + (y0 * t_y + x0 * t_x)[:, None] + ch, mask=m, other=0.0)
    v01 = tl.load(taps_img + (y0 * t_y + x1 * t_x)[:, None] + ch, mask=m, other=0.0)
    v10 = tl.load(taps_img + (y1 * t_y + x0 * t_x)[:, None] + ch, mask=m, other=0.0)
    v11 = tl.load(taps_img + (y1 * t_y + x1 * t_x)[:, None] + ch, mask=m, other=0.0)
    wy = ly[:, None]
    wx = lx[:, None]
    top = (1.0 - wx) * v00.to(tl.float32) + wx * v01.to(tl.float32)
    bottom = (1.0 - wx) * v10.to(tl.float32) + wx * v11.to(tl.float32)
    return (1.0 - wy) * top + wy * bottom


@triton.jit
def _level_sum(taps_ptr, pid_b, t_b, t_c, t_y, t_x, h_in, w_in, scale_h, scale_w, y, x, c, C,
               H, W, mask):
    # One level's nine resized, shifted taps at the output pixels (y, x), channels c (fp32).
    taps_img = taps_ptr + pid_b.to(tl.int64) * t_b
    total = tl.zeros(mask.shape, dtype=tl.float32)
    # A loop, not unrolled: nine copies of the four gathers made the three-level kernel ~26k
    # lines of PTX (~55 s to compile, 5.5k and ~3 s as a loop); not yet timed either way.
    for tap in range(9):
        ys = y + (tap // 3 - 1)
        xs = x + (tap % 3 - 1)
        y_ok = (ys >= 0) & (ys < H)
        x_ok = (xs >= 0) & (xs < W)
        ch = (tap * C + c)[None, :] * t_c
        total += _tap_blend(taps_img, ys, y_ok, xs, x_ok, ch, t_y, t_x, h_in, w_in,
                            scale_h, scale_w, mask)
    return total


@triton.jit
def _resize_tap_sum_kernel(
        base_ptr, out_ptr, scale_ptr, shift_ptr, C, H, W,
        s_b, s_c, s_y, s_x, o_b, o_c, o_y, o_x,
        t1_ptr, h1, w1, sh1, sw1, t1_b, t1_c, t1_y, t1_x,
        t2_ptr, h2, w2, sh2, sw2, t2_b, t2_c, t2_y, t2_x,
        t3_ptr, h3, w3, sh3, sw3, t3_b, t3_c, t3_y, t3_x,
        LEVELS: tl.constexpr, AFFINE: tl.constexpr, RELU: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < H * W
    c_ok = c < C
    mask = p_ok[:, None] & c_ok[None, :]
    y = p // W
    x = p % W
    total = tl.load(base_ptr + pid_b.to(tl.int64) * s_b + (y * s_y + x * s_x)[:, None]
                    + (c * s_c)[None, :], mask=mask, other=0.0).to(tl.float32)
    # All levels in one pass: one read of base, one rounding, one write.
    total += _level_sum(t1_ptr, pid_b, t1_b, t1_c, t1_y, t1_x, h1, w1, sh1, sw1, y, x, c, C,
                        H, W, mask)
    if LEVELS >= 2:
        total += _level_sum(t2_ptr, pid_b, t2_b, t2_c, t2_y, t2_x, h2, w2, sh2, sw2, y, x, c,
                            C, H, W, mask)
    if LEVELS >= 3:
        total += _level_sum(t3_ptr, pid_b, t3_b, t3_c, t3_y, t3_x, h3, w3, sh3, sw3, y, x, c,
                            C, H, W, mask)
    if AFFINE:
        total = (total * tl.load(scale_ptr + c, mask=c_ok, other=0.0)[None, :]
                 + tl.load(shift_ptr + c, mask=c_ok, other=0.0)[None, :])
    if RELU:
        total = tl.maximum(total, 0.0)
    tl.store(out_ptr + pid_b.to(tl.int64) * o_b + (y * o_y + x * o_x)[:, None]
             + (c * o_c)[None, :], total.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(channels: int, config: dict | None = None) -> dict:
    """Return the block sizes and num_warps for ``channels`` (TUNING + ``config``)."""
    cfg = {**TUNING, **(config or {})}
    unknown = set(cfg) - set(TUNING)
    if unknown:
        raise ValueError(f"unknown resize_tap_sum launch options {sorted(unknown)}; "
                         f"expected {sorted(TUNING)}")
    block_c = min(pow2_option("resize", "block_c", cfg["block_c"]),
                  triton.next_power_of_2(max(channels, 1)))
    return dict(block_p=pow2_option("resize", "block_p", cfg["block_p"]), block_c=block_c,
                num_warps=pow2_option("resize", "num_warps", cfg["num_warps"]))


_MAX_IMAGE_SPAN = 2**31 - 1  # offsets inside one image are int32 (the batch offset int64)


def fits_int32(base: torch.Tensor, taps: list) -> bool:
    """Whether every image's offsets in ``base``, ``taps`` and the output fit int32."""
    def span(t):
        return sum(abs(st) * max(n - 1, 0)
                   for st, n in zip(t.stride()[1:], t.shape[1:], strict=True))

    return (max(span(t) for t in (base, *taps)) <= _MAX_IMAGE_SPAN
            and base[0].numel() <= _MAX_IMAGE_SPAN)


def resize_tap_sum_fwd(base: torch.Tensor, taps: list, scale: torch.Tensor | None,
                       shift: torch.Tensor | None, relu: bool,
                       config: dict | None = None) -> torch.Tensor:
    """See ``mamba_perception_kernels.resize.resize_tap_sum`` (inputs validated there).

    One launch for 1 to MAX_LEVELS tap maps: base read once, every level summed in fp32, one
    rounding and one write. ``scale`` / ``shift``: fp32 and contiguous, or None.
    """
    if not 1 <= len(taps) <= MAX_LEVELS:
        raise ValueError(f"resize_tap_sum_fwd takes 1 to {MAX_LEVELS} tap maps, got {len(taps)}")
    batch, channels, height, width = base.shape
    out = torch.empty_like(base, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    cfg = launch_config(channels, config)
    grid = (triton.cdiv(height * width, cfg["block_p"]), triton.cdiv(channels, cfg["block_c"]),
            batch)
    levels = []
    for i in range(MAX_LEVELS):
        level = taps[min(i, len(taps) - 1)]  # unused slots repeat the last one
        h_in, w_in = level.shape[-2:]
        levels += [level, h_in, w_in, h_in / height, w_in / width, *level.stride()]
    with torch.cuda.device(base.device) if base.is_cuda else contextlib.nullcontext():
        _resize_tap_sum_kernel[grid](
            base, out, scale if scale is not None else out, shift if shift is not None else out,
            channels, height, width, *base.stride(), *out.stride(), *levels,
            LEVELS=len(taps), AFFINE=scale is not None, RELU=bool(relu),
            BLOCK_P=cfg["block_p"], BLOCK_C=cfg["block_c"], num_warps=cfg["num_warps"])
    return out
