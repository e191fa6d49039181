"""VMamba's convolutional stem as two Triton kernels: image -> stage-1 map (``stem.py``).

``conv -> LayerNorm -> GELU -> conv -> LayerNorm``, both convs 3x3 with stride 2 and padding 1,
LayerNorm over channels. As modules under autocast and torch.compile this is ~8 kernels
(the input cast, cuDNN's conv for 3 input channels, layout permutes, LayerNorms split into a
statistics and an apply kernel): 133 us at 1280x720 and 737 us at 2048x2048 on an H100
(bench/results/stem_h100.json). Worse, the LayerNorm output left the residual stream of stage 1
in a strided layout, and inductor then split every stage-1 add + LayerNorm into two kernels:
with this op's contiguous NHWC output the whole VMamba-T forward went from 2.67 to 2.23 ms.

1. ``_stem_conv1_kernel``: a program owns BLOCK_M conv1 outputs. conv1 is an implicit GEMM:
   each output's 3x3xCin image patch (k = (c, dy, dx) flattened, padded to K1) gathered from
   the image into a (BLOCK_M, K1) tile, times the (K1, C1) weight; then + bias, rounded to
   the weights' dtype (as autocast's conv output), LayerNorm and exact GELU in fp32, stored in
   the weights' dtype as a (batch, H1, W1, C1) map.
2. ``_stem_conv2_kernel``: a program owns BLOCK_M stage-1 pixels with all C2 channels. conv2
   is 9 accumulated (BLOCK_M, C1) x (C1, C2) GEMMs, one per tap, reading rows of that map;
   then + bias, rounded likewise, LayerNorm in fp32, fp32 store (NHWC).

Weights are read as copies prepared once per weight tensor (``common.prepared``): conv1's as
(K1, BLOCK_C1), conv2's as (9, BLOCK_C1, BLOCK_C2), zero-padded, so the tile loads need no
masks. One kernel doing both (conv1 recomputed under each of conv2's taps, the C1 map never
written) was tried: 417 us at 1280x720 (bench/results/profile_vmamba_tiny_720p_stem_h100.json),
5x the two kernels' 80: removed.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..stem import conv_out_hw
from .common import gelu_erf, layer_norm_rows, pow2_option, prepared

# block_m: stage-1 pixels per program of the second kernel, block_m_conv1: conv1 outputs per
# program of the first. Swept on an H100 (bench/stem.py --tune: bench/results/stem_h100.json):
# 128 / 128 / 4 warps best at 1280x720 and 2048x2048 (80 / 329 us; 64 / 128: 84 / 336).
# num_stages pipelines conv2's tap loop (stem_loop_h100.json, one card): 1 / 2 / 3 stages
# 85 / 77 / 74 us at 1280x720, 337 / 323 / 303 us at 2048x2048.
TUNING = {"block_m": 128, "block_m_conv1": 128, "num_warps": 4, "num_stages": 3}


@triton.jit
def _conv1_rows(x_b, i1, j1, ok, H, W, sx_c, sx_h, sx_w, w1, b1, n1w_ptr, n1b_ptr, c1, c1_ok,
                C1, eps1, CIN: tl.constexpr, HAS_B1: tl.constexpr, K1: tl.constexpr,
                DOT_PRECISION: tl.constexpr, FAST_MATH: tl.constexpr):
    """GELU(LN1(conv1(x))) at conv1 row i1, columns j1, as (BLOCK_M, BLOCK_C1) fp32.

    conv1 as an implicit GEMM: the 3x3xCIN image patch of each output, k = (c, dy, dx)
    flattened and padded to K1, gathered from the image, times the (K1, BLOCK_C1) weight.
    Columns not ``ok`` read zeros (their rows are not stored).
    """
    k = tl.arange(0, K1)
    iy = 2 * i1 + (k % 9) // 3 - 1  # one input row per k: the tile's rows share it
    ix = 2 * j1[:, None] + (k % 3)[None, :] - 1
    k_ok = (k < CIN * 9) & (iy >= 0) & (iy < H)
    patch_ok = ok[:, None] & k_ok[None, :] & (ix >= 0) & (ix < W)
    patch = tl.load(x_b + ((k // 9) * sx_c + iy * sx_h)[None, :] + ix * sx_w, mask=patch_ok,
                    other=0.0).to(w1.dtype)
    h = tl.dot(patch, w1, input_precision=DOT_PRECISION)
    if HAS_B1:
        h += b1[None, :]
    # Rounded to 16 bits as autocast's conv output is: an fp16 overflow here (Inf, then NaN
    # from the LayerNorm) is what the modules would give, and Pipeline reports it.
    h = h.to(w1.dtype).to(tl.float32)
    h = layer_norm_rows(h, c1_ok, n1w_ptr, n1b_ptr, c1, C1, eps1)
    return gelu_erf(h, FAST_MATH)


@triton.jit
def _stem_conv1_kernel(
    x_ptr, mid_ptr, w1_ptr, b1_ptr, n1w_ptr, n1b_ptr, H, W, H1, W1, C1, sx_b, sx_c, sx_h, sx_w,
    eps1, CIN: tl.constexpr, HAS_B1: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, K1: tl.constexpr, BLOCK_C1: tl.constexpr, FAST_MATH: tl.constexpr,
):
    """Write GELU(LN1(conv1(x))) as a (batch, H1, W1, C1) map in the weights' dtype.

    A program owns BLOCK_M outputs of one conv1 row (grid: row blocks, rows, images): the row
    is the program's id, not a division of a flat pixel index by the runtime W1, which the
    compiler repeated for every element of the patch tile (this kernel is issue-bound: ncu,
    bench/results/ncu_stem_h100.txt).
    """
    b = tl.program_id(2).to(tl.int64)
    i1 = tl.program_id(1)
    j1 = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    j1_ok = j1 < W1
    c1 = tl.arange(0, BLOCK_C1)
    c1_ok = c1 < C1
    k = tl.arange(0, K1)
    w1 = tl.load(w1_ptr + k[:, None] * BLOCK_C1 + c1[None, :])
    b1 = tl.load(b1_ptr + c1, mask=c1_ok, other=0.0).to(tl.float32)  # unused without HAS_B1
    h = _conv1_rows(x_ptr + b * sx_b, i1, j1, j1_ok, H, W, sx_c, sx_h, sx_w, w1,
                    b1, n1w_ptr, n1b_ptr, c1, c1_ok, C1, eps1, CIN, HAS_B1, K1, DOT_PRECISION,
                    FAST_MATH)
    mid = mid_ptr + ((b * H1 + i1) * W1 + j1[:, None]) * C1 + c1[None, :]
    tl.store(mid, h.to(mid_ptr.dtype.element_ty), mask=j1_ok[:, None] & c1_ok[None, :])


@triton.jit
def _stem_conv2_kernel(
    mid_ptr, out_ptr, w2_ptr, b2_ptr, n2w_ptr, n2b_ptr, H1, W1, H2, W2, C1, C2, eps2,
    HAS_B2: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C1: tl.constexpr, BLOCK_C2: tl.constexpr,
):
    """Store LN2(conv2(mid)) fp32, conv2 as 9 accumulated tap GEMMs."""
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pix_ok = pix < H2 * W2
    i2 = pix // W2
    j2 = pix % W2
    c1 = tl.arange(0, BLOCK_C1)
    c1_ok = c1 < C1
    c2 = tl.arange(0, BLOCK_C2)
    c2_ok = c2 < C2
    mid_b = mid_ptr + b * H1 * W1 * C1
    acc = tl.zeros((BLOCK_M, BLOCK_C2), dtype=tl.float32)
    # A loop, not unrolled: with num_stages > 1 the pipeliner issues the next taps' loads
    # (asynchronous copies to shared memory) while this tap's dot runs; unrolled, each tap
    # waited for its own loads (ncu at 1280x720: 12.5 % occupancy at 255 registers, issue
    # slots 19 % busy, bench/results/ncu_stem_h100.txt).
    for tap in range(9):
        i1 = 2 * i2 + (tap // 3) - 1
        j1 = 2 * j2 + (tap % 3) - 1
        in1 = pix_ok & (i1 >= 0) & (i1 < H1) & (j1 >= 0) & (j1 < W1)
        a = tl.load(mid_b + (i1 * W1 + j1)[:, None] * C1 + c1[None, :],
                    mask=in1[:, None] & c1_ok[None, :], other=0.0)
        w2 = tl.load(w2_ptr + (tap * BLOCK_C1 + c1[:, None]) * BLOCK_C2 + c2[None, :])
        acc = tl.dot(a, w2, acc, input_precision=DOT_PRECISION)
    if HAS_B2:
        acc += tl.load(b2_ptr + c2, mask=c2_ok, other=0.0).to(tl.float32)[None, :]
    acc = acc.to(w2_ptr.dtype.element_ty).to(tl.float32)  # autocast's rounding, as conv1's
    y = layer_norm_rows(acc, c2_ok, n2w_ptr, n2b_ptr, c2, C2, eps2)
    out = out_ptr + (b * H2 * W2 + pix[:, None]) * C2 + c2[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=pix_ok[:, None] & c2_ok[None, :])


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot tiles are at least 16 wide


def _prepared_weights(w1: torch.Tensor, w2: torch.Tensor):
    """conv1's weight as (K1, BLOCK_C1), conv2's as (9, BLOCK_C1, BLOCK_C2), zero-padded."""
    c1, cin = w1.shape[:2]
    c2 = w2.shape[0]
    k1, bc1, bc2 = _block(cin * 9), _block(c1), _block(c2)

    def conv1():
        out = torch.zeros(k1, bc1, device=w1.device, dtype=w1.dtype)
        out[:cin * 9, :c1] = w1.detach().reshape(c1, cin * 9).t()
        return out

    def conv2():
        out = torch.zeros(9, bc1, bc2, device=w2.device, dtype=w2.dtype)
        out[:, :c1, :c2] = w2.detach().permute(2, 3, 1, 0).reshape(9, c1, c2)
        return out

    key = ("conv_norm_stem", k1, bc1, bc2)
    return prepared(w1, key, conv1), prepared(w2, key, conv2), k1, bc1, bc2


def conv_norm_stem_fwd(x, w1, b1, n1_weight, n1_bias, eps1, w2, b2, n2_weight, n2_bias, eps2,
                       config=None, out_dtype=None) -> torch.Tensor:
    """Return the stage-1 map (batch, H2, W2, C2) contiguous; see ``stem.conv_norm_stem``.

    The second LayerNorm's fp32 result is stored in ``out_dtype`` (None: fp32).

    Arguments validated by the caller; norm weights / biases and conv biases dense vectors.
    ``config`` overrides TUNING (bench sweeps).
    """
    cfg = {**TUNING, **(config or {})}
    opts = {name: pow2_option("stem TUNING", name, int(cfg[name]))
            for name in ("block_m", "num_warps", "block_m_conv1")}
    batch, cin, height, width = x.shape
    c1, c2 = w1.shape[0], w2.shape[0]
    h1, w1_ = conv_out_hw(height, width)
    h2, w2_ = conv_out_hw(h1, w1_)
    out = torch.empty(batch, h2, w2_, c2, device=x.device, dtype=out_dtype or torch.float32)
    if out.numel() == 0:
        return out
    w1p, w2p, k1, bc1, bc2 = _prepared_weights(w1, w2)
    b1 = b1 if b1 is not None else w1p
    b2_ = b2 if b2 is not None else w2p
    # fp32 weights: a true fp32 product (tl.dot would use TF32 on tensor cores).
    precision = "ieee" if w1.dtype == torch.float32 else "tf32"
    launch = dict(num_warps=opts["num_warps"], num_stages=int(cfg["num_stages"]))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        mid = torch.empty(batch, h1, w1_, c1, device=x.device, dtype=w1.dtype)
        _stem_conv1_kernel[(triton.cdiv(w1_, opts["block_m_conv1"]), h1, batch)](
            x, mid, w1p, b1, n1_weight, n1_bias, height, width, h1, w1_, c1, *x.stride(),
            float(eps1), CIN=cin, HAS_B1=b1 is not w1p, DOT_PRECISION=precision,
            BLOCK_M=opts["block_m_conv1"], K1=k1, BLOCK_C1=bc1,
            FAST_MATH=x.is_cuda,  # PTX approximations (common.gelu_erf); the interpreter: exact
            **launch)
        _stem_conv2_kernel[(triton.cdiv(h2 * w2_, opts["block_m"]), batch)](
            mid, out, w2p, b2_, n2_weight, n2_bias, h1, w1_, h2, w2_, c1, c2, float(eps2),
            HAS_B2=b2 is not None, DOT_PRECISION=precision, BLOCK_M=opts["block_m"],
            BLOCK_C1=bc1, BLOCK_C2=bc2, **launch)
    return out
