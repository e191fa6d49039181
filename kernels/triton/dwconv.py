"""Depthwise k x k convolution (stride 1, 'same' zero padding) over channels-last (NHWC) maps.

VMamba's SS2D block runs ``in_proj -> depthwise conv 3x3 -> SiLU`` on a (B, H, W, C) activation.
cuDNN handles that layout with a generic kernel plus layout transposes; the op is memory bound
(k*k multiply-adds per element), so one pass that reads x once and writes y once is the goal.

One program owns a (BLOCK_H x BLOCK_W) tile of pixels times BLOCK_C channels of one image.
Channels are the contiguous axis, so every load and store is a row of BLOCK_C consecutive
elements per pixel (coalesced, vectorised when the channel stride is 1). For each of the k*k
taps the program loads the shifted tile with the out-of-image pixels masked to zero (the 'same'
zero padding) and accumulates ``x * w`` in fp32. The k*k shifted tiles overlap, so apart from
the first one they are served by L1/L2: HBM traffic stays close to one read of x (plus a halo
per tile) and one write of y. Bias and SiLU are applied in fp32 before the single store in the
input dtype.

Launch order: axis 0 walks the pixel tiles of one (channel block, image), row-major, so tiles
running at the same time are spatial neighbours and share their halos in L2.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .common import pow2_option

# Launch configuration, read at every call (bench/dwconv.py --tune sweeps and sets it). Tile
# sizes must be powers of two; each is clamped to the next power of two of the map's size, and
# block_c is an upper bound (see launch_config).
TUNING = {
    "block_h": 4,      # pixel rows per tile
    "block_w": 16,     # pixel columns per tile
    "block_c": 64,     # channels per program (64 fp16 = 128 bytes per pixel row)
    "num_warps": 4,
    # Maps this wide (and wider) take WIDE_TUNING's tile instead (0: never).
    "wide_min_channels": 384,
}
# Wide, small maps (VMamba-T's stages 3-4: 384 / 768 channels at 45x80 / 23x40 for 1280x720)
# are served best by fewer pixels and more channels per program. H200, fp16, per call
# (bench/results/dwconv_b{1,4}_h200.json, one sweep of 46 tiles each): 4x16x64 vs 2x16x128
# at batch 1 7.0 -> 6.0 us (stage 3) and 6.1 -> 5.2 (stage 4), at batch 4 16.5 -> 13.6 and
# 11.7 -> 9.7: -10 / -27 us a VMamba-T forward (stage 3 runs 8 times). At 192 channels the
# same tile is no faster (10.8 / 31.3 vs 10.8 / 30.6 us), hence the threshold.
WIDE_TUNING = {"block_h": 2, "block_w": 16, "block_c": 128}

# Offsets inside one image are computed in int32 (the batch offset is int64).
_MAX_IMAGE_SPAN = 2**31 - 1


@triton.jit
def _dwconv_nhwc_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr,
        H, W, C, n_tiles_w,
        sx_b, sx_h, sx_w, sx_c, sw_c, sw_h, sw_w, s_bias,
        KSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
        C_CONTIG: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    PAD: tl.constexpr = KSIZE // 2

    offs_p = tl.arange(0, BLOCK_H * BLOCK_W)
    hh = (pid_t // n_tiles_w) * BLOCK_H + offs_p // BLOCK_W
    ww = (pid_t % n_tiles_w) * BLOCK_W + offs_p % BLOCK_W
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cc < C
    # A constexpr unit stride lets the compiler vectorise the channel loads (the fast path).
    if C_CONTIG:
        x_c = cc
    else:
        x_c = cc * sx_c
    x_img = x_ptr + pid_b.to(tl.int64) * sx_b
    pix = hh * sx_h + ww * sx_w

    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(KSIZE):
        h_in = hh + (i - PAD)
        row_ok = (h_in >= 0) & (h_in < H)
        for j in tl.static_range(KSIZE):
            w_in = ww + (j - PAD)
            ok = row_ok & (w_in >= 0) & (w_in < W)
            tap = tl.load(w_ptr + cc * sw_c + i * sw_h + j * sw_w, mask=mask_c,
                          other=0.0).to(tl.float32)
            # Masked lanes are the zero padding (and never dereferenced, so negative or
            # past-the-end offsets are harmless).
            xv = tl.load(x_img + (pix + ((i - PAD) * sx_h + (j - PAD) * sx_w))[:, None]
                         + x_c[None, :], mask=ok[:, None] & mask_c[None, :], other=0.0)
            acc += xv.to(tl.float32) * tap[None, :]

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cc * s_bias, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))  # exp overflow -> inf -> -0.0: the right limit

    # The output is a fresh contiguous (B, H, W, C) tensor.
    out_off = (hh * W + ww) * C
    out_img = out_ptr + pid_b.to(tl.int64) * H * W * C
    out_ok = (hh < H) & (ww < W)
    tl.store(out_img + out_off[:, None] + cc[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=out_ok[:, None] & mask_c[None, :])


def _pow2(name: str, value: int) -> int:
    return pow2_option("dwconv", name, value)


def launch_config(height: int, width: int, channels: int, config: dict | None = None) -> dict:
    """Return the tile sizes and num_warps used for one map size.

    TUNING, then WIDE_TUNING where ``channels`` reaches TUNING's ``wide_min_channels``, then
    ``config``.
    """
    cfg = {**TUNING, **(config or {})}
    unknown = set(cfg) - set(TUNING)
    if unknown:
        raise ValueError(f"unknown dwconv launch options {sorted(unknown)}; "
                         f"expected {sorted(TUNING)}")
    if 0 < cfg["wide_min_channels"] <= channels:
        cfg = {**cfg, **WIDE_TUNING, **(config or {})}
    block_c = min(_pow2("block_c", cfg["block_c"]), triton.next_power_of_2(max(channels, 1)))
    # Halve the channel block (down to 16) until it divides C, so no program runs a partly
    # masked block: C=96 with block_c 64 would leave half of every second block idle. (One
    # masked block over whole pixels, 128 at C = 96, was slower at stop 32: PERF_NOTES.)
    while block_c > 16 and channels % block_c:
        block_c //= 2
    return dict(
        block_h=min(_pow2("block_h", cfg["block_h"]), triton.next_power_of_2(max(height, 1))),
        block_w=min(_pow2("block_w", cfg["block_w"]), triton.next_power_of_2(max(width, 1))),
        block_c=block_c,
        num_warps=_pow2("num_warps", cfg["num_warps"]))


def fits_int32(x: torch.Tensor, out_channels: int) -> bool:
    """Whether one image's input and output offsets fit the kernel's int32 arithmetic."""
    _, height, width, _ = x.shape
    span = sum(abs(s) * max(n - 1, 0) for s, n in zip(x.stride()[1:], x.shape[1:], strict=True))
    return max(span, height * width * out_channels) <= _MAX_IMAGE_SPAN


def dwconv2d_nhwc_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      silu: bool, config: dict | None = None) -> torch.Tensor:
    """Return conv(x) [+ bias] [-> SiLU] as a new contiguous (B, H, W, C) tensor in x.dtype.

    ``x`` (B, H, W, C) with any strides (channel stride 1 is the fast path), ``weight``
    (C, 1, k, k) with odd k, ``bias`` (C,) or None, validated by the caller. ``config``
    overrides :data:`TUNING` entries for this call.
    """
    batch, height, width, channels = x.shape
    ksize = weight.shape[-1]
    out = torch.empty((batch, height, width, channels), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    cfg = launch_config(height, width, channels, config)
    bh, bw, bc = cfg["block_h"], cfg["block_w"], cfg["block_c"]
    n_tiles_w = triton.cdiv(width, bw)
    grid = (triton.cdiv(height, bh) * n_tiles_w, triton.cdiv(channels, bc), batch)
    c_contig = x.stride(3) == 1 or channels == 1
    # Triton launches on the current CUDA device; x may live on another one.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _dwconv_nhwc_kernel[grid](
            x, weight, bias if bias is not None else weight, out,
            height, width, channels, n_tiles_w,
            *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
            bias.stride(0) if bias is not None else 0,
            KSIZE=ksize, HAS_BIAS=bias is not None, SILU=bool(silu), C_CONTIG=c_contig,
            BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, num_warps=cfg["num_warps"])
    return out



# Vim's two depthwise 1-D convs (+ bias + SiLU) of one token-major (B, L, E) map: direction 0
# causal (taps t-k+1..t), direction 1 anti-causal (taps t..t+k-1), written as u (B, 2, L, E).
# One program owns BLOCK_L tokens x BLOCK_E channels; the 2k-1 shifted rows it reads overlap
# its neighbours' (L1/L2), so HBM sees about one read of x and one write of u. Not yet swept.
BIDIR_TUNING = {"block_l": 32, "block_e": 64, "num_warps": 4}


@triton.jit
def _dwconv1d_bidir_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr, L, E, sx_b, sx_l, sw_d, sw_e, sw_k, sb_d, sb_e,
        KSIZE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr):
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    b = tl.program_id(2).to(tl.int64)
    e_ok = e < E
    x_b = x_ptr + b * sx_b + e[None, :]
    acc0 = tl.zeros((BLOCK_L, BLOCK_E), dtype=tl.float32) + tl.load(
        bias_ptr + e * sb_e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    acc1 = tl.zeros((BLOCK_L, BLOCK_E), dtype=tl.float32) + tl.load(
        bias_ptr + sb_d + e * sb_e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    for s in tl.static_range(2 * KSIZE - 1):  # token t + s - (k-1): both directions share it
        src = t + (s - (KSIZE - 1))
        ok = (src >= 0) & (src < L)
        xv = tl.load(x_b + src[:, None] * sx_l, mask=ok[:, None] & e_ok[None, :],
                     other=0.0).to(tl.float32)
        if s < KSIZE:  # causal tap s of direction 0
            acc0 += xv * tl.load(w_ptr + e * sw_e + s * sw_k, mask=e_ok,
                                 other=0.0).to(tl.float32)[None, :]
        if s >= KSIZE - 1:  # anti-causal tap s-(k-1) of direction 1
            acc1 += xv * tl.load(w_ptr + sw_d + e * sw_e + (s - (KSIZE - 1)) * sw_k, mask=e_ok,
                                 other=0.0).to(tl.float32)[None, :]
    ok = (t < L)[:, None] & e_ok[None, :]
    out = out_ptr + b * 2 * L * E + t[:, None] * E + e[None, :]
    tl.store(out, (acc0 / (1.0 + tl.exp(-acc0))).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out + L * E, (acc1 / (1.0 + tl.exp(-acc1))).to(out_ptr.dtype.element_ty), mask=ok)


def dwconv1d_bidir_silu_fwd(x: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor) -> torch.Tensor:
    """Return u (B, 2, L, E) contiguous in x.dtype; see ``dwconv1d_bidir_silu`` (validated)."""
    batch, length, channels = x.shape
    out = torch.empty(batch, 2, length, channels, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    bl = min(pow2_option("dwconv1d_bidir", "block_l", BIDIR_TUNING["block_l"]),
             triton.next_power_of_2(length))
    be = min(pow2_option("dwconv1d_bidir", "block_e", BIDIR_TUNING["block_e"]),
             triton.next_power_of_2(channels))
    grid = (triton.cdiv(length, bl), triton.cdiv(channels, be), batch)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _dwconv1d_bidir_kernel[grid](
            x, weight, bias, out, length, channels, x.stride(0), x.stride(1),
            *weight.stride(), *bias.stride(), KSIZE=weight.shape[2], BLOCK_L=bl, BLOCK_E=be,
            num_warps=pow2_option("dwconv1d_bidir", "num_warps", BIDIR_TUNING["num_warps"]))
    return out
