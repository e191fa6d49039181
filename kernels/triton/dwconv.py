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

from .common import pow2_option, prepared

# Launch configuration, read at every call (bench/dwconv.py --tune sweeps and sets it). Tile
# sizes must be powers of two; each is clamped to the next power of two of the map's size, and
# block_c is an upper bound (see launch_config). Defaults not yet tuned on a GPU.
TUNING = {
    "block_h": 4,      # pixel rows per tile
    "block_w": 16,     # pixel columns per tile
    "block_c": 64,     # channels per program (64 fp16 = 128 bytes per pixel row)
    "num_warps": 4,
}

# Offsets inside one image are computed in int32 (the batch offset is int64).
_MAX_IMAGE_SPAN = 2**31 - 1


@triton.jit
def _dwconv_nhwc_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr, pw_ptr, proj_ptr,
        H, W, C, n_tiles_w, N_PROJ,
        sx_b, sx_h, sx_w, sx_c, sw_c, sw_h, sw_w, s_bias,
        KSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
        C_CONTIG: tl.constexpr, PROJ: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr):
    """Store the conv of one pixel tile: one channel block, or all of them with PROJ.

    PROJ: the program walks every channel block of its pixels, and each block's rounded
    output, besides being stored, is multiplied into ``proj`` = out @ pw (pw: the projection's
    (C, N_PROJ) weight, zero-padded to (whole channel blocks, BLOCK_N)); ``proj`` is stored
    once, rounded, as a (B, H, W, N_PROJ) map.
    """
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(2)
    PAD: tl.constexpr = KSIZE // 2

    offs_p = tl.arange(0, BLOCK_H * BLOCK_W)
    hh = (pid_t // n_tiles_w) * BLOCK_H + offs_p // BLOCK_W
    ww = (pid_t % n_tiles_w) * BLOCK_W + offs_p % BLOCK_W
    x_img = x_ptr + pid_b.to(tl.int64) * sx_b
    pix = hh * sx_h + ww * sx_w
    # The output is a fresh contiguous (B, H, W, C) tensor.
    out_off = (hh * W + ww) * C
    out_img = out_ptr + pid_b.to(tl.int64) * H * W * C
    out_ok = (hh < H) & (ww < W)
    if PROJ:
        c_first = 0
        n_blocks = tl.cdiv(C, BLOCK_C)
    else:
        c_first = tl.program_id(1) * BLOCK_C
        n_blocks = 1
    proj = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_N), dtype=tl.float32)
    for blk in range(n_blocks):
        cc = c_first + blk * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = cc < C
        # A constexpr unit stride lets the compiler vectorise the channel loads (the fast
        # path).
        if C_CONTIG:
            x_c = cc
        else:
            x_c = cc * sx_c
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
            acc += tl.load(bias_ptr + cc * s_bias, mask=mask_c,
                           other=0.0).to(tl.float32)[None, :]
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))  # exp overflow -> inf -> -0.0: the right limit
        y = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_img + out_off[:, None] + cc[None, :], y,
                 mask=out_ok[:, None] & mask_c[None, :])
        if PROJ:
            # The rounded output, as the projection GEMM would read it back; channels past C
            # meet zero rows of pw.
            pw = tl.load(pw_ptr + cc[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :])
            proj = tl.dot(y, pw, proj, input_precision=DOT_PRECISION)
    if PROJ:
        n = tl.arange(0, BLOCK_N)
        proj_img = proj_ptr + pid_b.to(tl.int64) * H * W * N_PROJ
        tl.store(proj_img + ((hh * W + ww) * N_PROJ)[:, None] + n[None, :],
                 proj.to(proj_ptr.dtype.element_ty), mask=out_ok[:, None] & (n < N_PROJ)[None, :])


def _pow2(name: str, value: int) -> int:
    return pow2_option("dwconv", name, value)


def launch_config(height: int, width: int, channels: int, config: dict | None = None) -> dict:
    """Return the tile sizes and num_warps used for one map size (TUNING + ``config``)."""
    cfg = {**TUNING, **(config or {})}
    unknown = set(cfg) - set(TUNING)
    if unknown:
        raise ValueError(f"unknown dwconv launch options {sorted(unknown)}; "
                         f"expected {sorted(TUNING)}")
    block_c = min(_pow2("block_c", cfg["block_c"]), triton.next_power_of_2(max(channels, 1)))
    # Halve the channel block (down to 16) until it divides C, so no program runs a partly
    # masked block: C=96 with block_c 64 would leave half of every second block idle.
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
            x, weight, bias if bias is not None else weight, out, out, out,
            height, width, channels, n_tiles_w, 0,
            *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
            bias.stride(0) if bias is not None else 0,
            KSIZE=ksize, HAS_BIAS=bias is not None, SILU=bool(silu), C_CONTIG=c_contig,
            PROJ=False, DOT_PRECISION="ieee", BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, BLOCK_N=16,
            num_warps=cfg["num_warps"])
    return out


# The conv with the per-pixel projection after it (VMamba's x_proj) in the same pass
# (dwconv2d_proj_nhwc_fwd): a program owns a pixel tile with all its channels, so the tiles are
# smaller than the plain conv's and shrink further (block_h first, then block_w, down to
# min_pixels pixels: tl.dot's least M is 16) while the launch has fewer than min_programs
# programs. block_c: channels per step of the program's walk (a divisor of C where one exists,
# as launch_config). max_width: the widest projection run fused (its fp32 accumulator is
# (pixels, width) in registers); wider ones run as the conv and a GEMM. num_stages 1: with
# Triton's default (3) the pipeliner staged the conv's tap loads through shared memory (82 KB a
# program at 4x16x32, scalar LDGSTS instead of 16-byte loads; sm_90 SASS offline) and the op
# ran 3-6x slower than the conv plus cuBLAS's GEMM (H200, bench/results/
# dwconv_proj_sweep_stages3_h200.json). Not yet swept at 1 stage.
PROJ_TUNING = {
    "block_h": 4,
    "block_w": 16,
    "block_c": 32,
    "num_warps": 4,
    "num_stages": 1,
    "min_programs": 264,
    "min_pixels": 16,
    "max_width": 256,
}


def proj_launch_config(batch: int, height: int, width: int, channels: int,
                       config: dict | None = None) -> dict:
    """Return the tile sizes and num_warps of ``dwconv2d_proj_nhwc_fwd`` for one map size."""
    cfg = {**PROJ_TUNING, **(config or {})}
    unknown = set(cfg) - set(PROJ_TUNING)
    if unknown:
        raise ValueError(f"unknown dwconv proj launch options {sorted(unknown)}; "
                         f"expected {sorted(PROJ_TUNING)}")
    name = "dwconv proj"
    bh = min(pow2_option(name, "block_h", cfg["block_h"]), triton.next_power_of_2(height))
    bw = min(pow2_option(name, "block_w", cfg["block_w"]), triton.next_power_of_2(width))
    least = max(16, pow2_option(name, "min_pixels", cfg["min_pixels"]))

    def programs(bh, bw):
        return triton.cdiv(height, bh) * triton.cdiv(width, bw) * batch

    while bh * bw > least and programs(bh, bw) < cfg["min_programs"]:
        if bh > 1:
            bh //= 2
        else:
            bw //= 2
    while bh * bw < least:  # tiny maps: a masked tile at least tl.dot's size
        bw *= 2
    bc = min(pow2_option(name, "block_c", cfg["block_c"]),
             max(16, triton.next_power_of_2(channels)))
    while bc > 16 and channels % bc:
        bc //= 2
    return dict(block_h=bh, block_w=bw, block_c=bc,
                num_warps=pow2_option(name, "num_warps", cfg["num_warps"]),
                num_stages=int(cfg["num_stages"]))


def proj_fits(x: torch.Tensor, proj_width: int) -> bool:
    """Whether ``dwconv2d_proj_nhwc_fwd`` takes this call (else: the conv, then a GEMM)."""
    return (proj_width <= PROJ_TUNING["max_width"] and fits_int32(x, x.shape[3])
            and fits_int32(x, proj_width))


def _proj_weight(proj_weight: torch.Tensor, dtype, rows: int, block_n: int) -> torch.Tensor:
    """Return the projection (N, C) as a zero-padded (rows, block_n) transpose, cached."""
    def build():
        c = proj_weight.shape[-1]
        w = proj_weight.detach().reshape(-1, c)
        out = torch.zeros(rows, block_n, device=proj_weight.device, dtype=dtype)
        out[:c, :w.shape[0]] = w.t()
        return out

    return prepared(proj_weight, ("dwconv_proj", dtype, rows, block_n), build)


def dwconv2d_proj_nhwc_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           proj_weight: torch.Tensor, silu: bool, config: dict | None = None):
    """Return (u, proj): u = conv(x) [+ bias] [-> SiLU], proj = u @ proj_weight^T.

    Both new contiguous tensors in x.dtype, (B, H, W, C) and (B, H, W, N) for a projection
    ``proj_weight`` (N, C) (leading dims flattened: VMamba's (k, R, C) x_proj weight as it is,
    so the cached padded copy is keyed by the parameter itself); ``proj`` is the product of
    the rounded ``u`` in fp32, rounded once. Validated by the caller; ``proj_fits`` holds.
    """
    batch, height, width, channels = x.shape
    n_proj = proj_weight.numel() // max(proj_weight.shape[-1], 1)
    out = torch.empty((batch, height, width, channels), device=x.device, dtype=x.dtype)
    proj = torch.empty((batch, height, width, n_proj), device=x.device, dtype=x.dtype)
    if out.numel() == 0 or proj.numel() == 0:
        if proj.numel() and out.numel() == 0:
            proj.zero_()  # no channels: an empty sum
        return out, proj
    cfg = proj_launch_config(batch, height, width, channels, config)
    bh, bw, bc = cfg["block_h"], cfg["block_w"], cfg["block_c"]
    block_n = max(16, triton.next_power_of_2(n_proj))
    pw = _proj_weight(proj_weight, x.dtype, triton.cdiv(channels, bc) * bc, block_n)
    n_tiles_w = triton.cdiv(width, bw)
    grid = (triton.cdiv(height, bh) * n_tiles_w, 1, batch)
    c_contig = x.stride(3) == 1 or channels == 1
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _dwconv_nhwc_kernel[grid](
            x, weight, bias if bias is not None else weight, out, pw, proj,
            height, width, channels, n_tiles_w, n_proj,
            *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
            bias.stride(0) if bias is not None else 0,
            KSIZE=weight.shape[-1], HAS_BIAS=bias is not None, SILU=bool(silu),
            C_CONTIG=c_contig, PROJ=True,
            # fp32 maps: a true fp32 product (tl.dot would use TF32 on tensor cores).
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, BLOCK_N=block_n, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
    return out, proj



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
