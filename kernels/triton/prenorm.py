"""Pre-norm linear layers fused with their residual, one pass over rows of C <= 256 channels.

Two kernels share one prologue (``_normed_rows``): a program owns BLOCK_M rows (pixels) with
all C channels (padded to a power of two), LayerNorms them in fp32 and rounds them once to the
weights' dtype -- the A operand of the GEMMs that follow, kept in registers for the whole
program. Weights are nn.Linear's (out, in) matrices, read by every program from L2.

``_norm_mlp_kernel``: ``x + fc2(gelu(fc1(layer_norm(x))))``, the second half of every VMamba
block, optionally on ``x = residual + branch`` (the first half's residual add, done in the
prologue so that its fp32 sum never goes to memory). Run as separate kernels it reads and
writes the hidden activation (4x the channels) twice and launches ~5 kernels (add +
LayerNorm, fc1, GELU, fc2, the residual add in the next kernel); at stage 1 of VMamba-T at
1280x720 the GELU pass alone moves 88 MB. Here the program loops over the hidden units
BLOCK_H at a time: ``h = A @ W1[chunk].T + b1`` (fp32 accumulation), exact (erf) GELU in
fp32 (``common.gelu_erf``), rounded to the weights' dtype, accumulated as ``h @ W2[:, chunk].T``
into the (BLOCK_M, C) fp32 output: the hidden activation never leaves the chip. Then + b2 +
the residual (reloaded: it is in L2, and keeping it live across the loop costs registers the
dot tiles need), stored fp32. (The SS2D tail, out_norm -> out_proj on the scan's fp32
output, also run in this prologue was slower on an H100 at stop 21: 2.096 vs 2.055 ms for
VMamba-T at 1280x720, bench/results/backbone_speed_tail_in_mlp_h100.json; removed.)

``_norm_linear_kernel``: ``residual + linear(layer_norm(y))``, the end of VMamba's SS2D mixer
(out_norm -> out_proj on the scan's fp32 output, then the block's residual add): the program
loops over the outputs BLOCK_N at a time, one dot each, adds bias and residual and stores fp32.
(A GELU variant, norm -> fc1 -> GELU with cuBLAS's fc2 after it, was no faster than the compiled
modules at stage 2 and was removed at stop 19: the split MLP is now one cuBLASLt GEMM with the
GELU epilogue, ``mamba_perception.models.layers.linear_gelu_tanh``.)

Rounding differs from the unfused modules only in that GEMM outputs are not rounded to 16 bits
before GELU / before the residual add (fewer roundings).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .common import gelu_erf, layer_norm_rows, pow2_option, prepared

# MLP launch configuration per padded channel width (<= 128, and wider), read at every call.
# Swept on an H100 over VMamba-T's stage 1 / 2 shapes at 1280x720 and 2048x2048
# (bench/prenorm.py --tune --ops mlp fc1 linear: bench/results/prenorm_h100.json).
# ``layout``: "linear" reads W1 / W2 as nn.Linear holds them, with masked, transposed tile
# loads; "padded_t" reads copies transposed and zero-padded to whole tiles once (cached per
# weight tensor, common.prepared): unmasked loads along the contiguous N axis of each dot's B
# operand, which the pipeliner can stage asynchronously. padded_t won the sweep at both widths
# (C <= 128: 98 -> 69 us per stage-1 block at 1280x720; C = 256 is still slower than the
# compiled modules, 77 vs 64 us, so FUSED_MLP_MAX_CHANNELS keeps it off).
TUNING = {
    128: {"block_m": 64, "block_h": 64, "num_warps": 4, "num_stages": 3, "layout": "padded_t"},
    256: {"block_m": 64, "block_h": 32, "num_warps": 4, "num_stages": 2, "layout": "padded_t"},
}
LAYOUTS = ("linear", "padded_t")
# norm -> linear: not swept (a first guess by analogy with the MLP); timed against the
# compiled modules in prenorm_h100.json (43 vs 42 us at stage 1, 19 vs 24 at stage 2, 720p).
LINEAR_TUNING = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 2}
MAX_CHANNELS = 256  # the (BLOCK_M, C) fp32 output tile and the A operand live in registers


@triton.jit
def _normed_rows(x_ptr, offs, tile_ok, cols, col_ok, nw_ptr, nb_ptr, channels, eps,
                 DTYPE: tl.constexpr):
    """LayerNorm (fp32 statistics) of the (BLOCK_M, BLOCK_C) rows at ``offs``, as DTYPE.

    Padded columns load as zero, are excluded from the statistics and come out zero.
    """
    x = tl.load(x_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
    return layer_norm_rows(x, col_ok, nw_ptr, nb_ptr, cols, channels, eps).to(DTYPE)


@triton.jit
def _norm_mlp_kernel(
    x_ptr, br_ptr, out_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    n_rows, channels, hidden, stride_x, stride_br, stride_out, eps,
    HAS_BRANCH: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PADDED_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
    FAST_MATH: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < channels
    tile_ok = row_ok[:, None] & col_ok[None, :]
    x_offs = rows[:, None] * stride_x + cols[None, :]
    br_offs = rows[:, None] * stride_br + cols[None, :]

    # 1. (x + branch, fp32) LayerNormed in fp32, rounded once: fc1's A operand.
    x = _residual_in(x_ptr, x_offs, br_ptr, br_offs, tile_ok, HAS_BRANCH)
    a = layer_norm_rows(x, col_ok, nw_ptr, nb_ptr, cols, channels, eps).to(
        w1_ptr.dtype.element_ty)

    # 2. fc1 -> GELU -> fc2, BLOCK_H hidden units at a time.
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        hid = h0 + tl.arange(0, BLOCK_H)
        hid_ok = hid < hidden
        if PADDED_T:
            # W1.T (BLOCK_C, hidden) and W2.T (hidden, BLOCK_C), zero-padded: no masks.
            w1 = tl.load(w1_ptr + cols[:, None] * hidden + hid[None, :])
        else:
            # W1[hid, c] as a (C, BLOCK_H) tile.
            w1 = tl.load(w1_ptr + hid[None, :] * channels + cols[:, None],
                         mask=col_ok[:, None] & hid_ok[None, :], other=0.0)
        h = tl.dot(a, w1, input_precision=DOT_PRECISION)
        if HAS_B1:
            if PADDED_T:
                h += tl.load(b1_ptr + hid).to(tl.float32)[None, :]
            else:
                h += tl.load(b1_ptr + hid, mask=hid_ok, other=0.0).to(tl.float32)[None, :]
        h = gelu_erf(h, FAST_MATH)
        if PADDED_T:
            w2 = tl.load(w2_ptr + hid[:, None] * BLOCK_C + cols[None, :])
        else:
            # W2[c, hid] as a (BLOCK_H, C) tile.
            w2 = tl.load(w2_ptr + cols[None, :] * hidden + hid[:, None],
                         mask=hid_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(h.to(w2_ptr.dtype.element_ty), w2, acc, input_precision=DOT_PRECISION)

    # 3. + b2 + residual in fp32, rounded once to the output's dtype.
    if HAS_B2:
        acc += tl.load(b2_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc += _residual_in(x_ptr, x_offs, br_ptr, br_offs, tile_ok, HAS_BRANCH)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _residual_in(x_ptr, x_offs, br_ptr, br_offs, tile_ok, HAS_BRANCH: tl.constexpr):
    """Return the residual stream entering the MLP, x or x + branch (fp32 sum), as fp32."""
    x = tl.load(x_ptr + x_offs, mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        x += tl.load(br_ptr + br_offs, mask=tile_ok, other=0.0).to(tl.float32)
    return x


@triton.jit
def _norm_linear_kernel(
    y_ptr, res_ptr, out_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr,
    n_rows, channels, n_out, stride_y, stride_res, stride_out, eps,
    HAS_B: tl.constexpr, HAS_RES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < channels
    a = _normed_rows(y_ptr, rows[:, None] * stride_y + cols[None, :],
                     row_ok[:, None] & col_ok[None, :], cols, col_ok, nw_ptr, nb_ptr, channels,
                     eps, w_ptr.dtype.element_ty)
    for n0 in range(0, n_out, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        out_ok = outs < n_out
        # W[outs, c] as a (C, BLOCK_N) tile.
        w = tl.load(w_ptr + outs[None, :] * channels + cols[:, None],
                    mask=col_ok[:, None] & out_ok[None, :], other=0.0)
        acc = tl.dot(a, w, input_precision=DOT_PRECISION)
        if HAS_B:
            acc += tl.load(b_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        ok = row_ok[:, None] & out_ok[None, :]
        if HAS_RES:
            acc += tl.load(res_ptr + rows[:, None] * stride_res + outs[None, :], mask=ok,
                           other=0.0).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * stride_out + outs[None, :], acc, mask=ok)


def mlp_launch_config(n_rows: int, channels: int, hidden: int, config: dict | None = None) -> dict:
    """MLP TUNING of the channel width (overridden by ``config``), clamped to the problem."""
    block_c = max(16, triton.next_power_of_2(channels))  # tl.dot: every tile dim >= 16
    cfg = {**TUNING[128 if block_c <= 128 else 256], **(config or {})}
    out = {name: pow2_option("norm_mlp TUNING", name, int(cfg[name]))
           for name in ("block_m", "block_h", "num_warps")}
    out["num_stages"] = int(cfg["num_stages"])
    if cfg["layout"] not in LAYOUTS:
        raise ValueError(f"norm_mlp TUNING['layout']={cfg['layout']!r} is not one of {LAYOUTS}")
    out["layout"] = cfg["layout"]
    out["block_c"] = block_c
    out["block_h"] = max(16, min(out["block_h"], triton.next_power_of_2(hidden)))
    out["block_m"] = max(16, min(out["block_m"], triton.next_power_of_2(max(n_rows, 1))))
    return out


def _padded_transposed(w1, b1, w2, block_c, block_h):
    """Return W1.T (block_c, HP), b1 (HP,), W2.T (HP, block_c) zero-padded, and HP.

    HP is the hidden width rounded up to block_h; the padded hidden units add GELU(0) * 0 = 0.
    Cached per weight tensor (``common.prepared``).
    """
    hidden, channels = w1.shape
    hp = triton.cdiv(hidden, block_h) * block_h
    key = ("norm_mlp_padded_t", block_c, hp)

    def pad2(src, rows, cols):
        out = torch.zeros(rows, cols, device=src.device, dtype=src.dtype)
        out[:src.shape[0], :src.shape[1]] = src.detach()
        return out

    w1t = prepared(w1, key, lambda: pad2(w1.t(), block_c, hp))
    w2t = prepared(w2, key, lambda: pad2(w2.t(), hp, block_c))
    b1p = None if b1 is None else prepared(b1, key, lambda: pad2(b1[None], 1, hp)[0])
    return w1t, b1p, w2t, hp


def norm_mlp_residual_fwd(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                          eps: float, w1: torch.Tensor, b1: torch.Tensor | None,
                          w2: torch.Tensor, b2: torch.Tensor | None,
                          config: dict | None = None,
                          branch: torch.Tensor | None = None,
                          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``s + fc2(gelu(fc1(LN(s))))``, ``s = x [+ branch]``, new contiguous like ``x``.

    The result is computed in fp32 and stored in ``out_dtype`` (None: fp32).

    ``x`` and ``branch`` (..., C) with unit channel strides and rows that flatten to one stride
    (validated by the caller, C <= MAX_CHANNELS), weights contiguous in nn.Linear layout,
    W1 / W2 in the GEMM dtype (fp16 / bf16 / fp32).
    """
    channels = x.shape[-1]
    hidden = w1.shape[0]
    rows = x.reshape(-1, channels)
    br = rows if branch is None else branch.reshape(-1, channels)
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype or torch.float32)
    n_rows = rows.shape[0]
    if n_rows == 0:
        return out
    cfg = mlp_launch_config(n_rows, channels, hidden, config)
    padded_t = cfg["layout"] == "padded_t"
    if padded_t:  # the kernel's "hidden" is then the padded width: whole BLOCK_H chunks
        w1, b1, w2, hidden = _padded_transposed(w1, b1, w2, cfg["block_c"], cfg["block_h"])
    grid = (triton.cdiv(n_rows, cfg["block_m"]),)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _norm_mlp_kernel[grid](
            rows, br, out, norm_weight, norm_bias, w1, b1 if b1 is not None else w1,
            w2, b2 if b2 is not None else w2,
            n_rows, channels, hidden, rows.stride(0), br.stride(0), channels, float(eps),
            HAS_BRANCH=branch is not None, HAS_B1=b1 is not None, HAS_B2=b2 is not None,
            # fp32 weights: a true fp32 product (tl.dot would use TF32 on tensor cores).
            DOT_PRECISION="ieee" if w1.dtype == torch.float32 else "tf32", PADDED_T=padded_t,
            BLOCK_M=cfg["block_m"], BLOCK_C=cfg["block_c"], BLOCK_H=cfg["block_h"],
            FAST_MATH=x.is_cuda,  # PTX approximations (common.gelu_erf); the interpreter: exact
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def linear_launch_config(n_rows: int, channels: int, n_out: int,
                         config: dict | None = None) -> dict:
    """LINEAR_TUNING (overridden by ``config``), clamped to the problem; powers of two."""
    cfg = {**LINEAR_TUNING, **(config or {})}
    out = {name: pow2_option("prenorm LINEAR_TUNING", name, int(cfg[name]))
           for name in ("block_m", "block_n", "num_warps")}
    out["num_stages"] = int(cfg["num_stages"])
    out["block_c"] = max(16, triton.next_power_of_2(channels))
    out["block_n"] = max(16, min(out["block_n"], triton.next_power_of_2(n_out)))
    out["block_m"] = max(16, min(out["block_m"], triton.next_power_of_2(max(n_rows, 1))))
    return out


def norm_linear_residual_fwd(y: torch.Tensor, norm_weight: torch.Tensor,
                             norm_bias: torch.Tensor, eps: float, w: torch.Tensor,
                             b: torch.Tensor | None, residual: torch.Tensor | None = None,
                             config: dict | None = None) -> torch.Tensor:
    """Return ``linear(LN(y), w, b) [+ residual]`` as a new contiguous fp32 tensor.

    ``y`` (..., C) and ``residual`` (..., N) with unit channel strides and rows that flatten to
    one stride (validated by the caller, C <= MAX_CHANNELS), ``w`` (N, C) contiguous in the
    GEMM dtype. The output has ``y``'s leading shape by N.
    """
    channels, n_out = y.shape[-1], w.shape[0]
    rows = y.reshape(-1, channels)
    res = None if residual is None else residual.reshape(-1, n_out)
    out = torch.empty((*y.shape[:-1], n_out), device=y.device, dtype=torch.float32)
    n_rows = rows.shape[0]
    if n_rows == 0:
        return out
    cfg = linear_launch_config(n_rows, channels, n_out, config)
    grid = (triton.cdiv(n_rows, cfg["block_m"]),)
    with torch.cuda.device(y.device) if y.is_cuda else contextlib.nullcontext():
        _norm_linear_kernel[grid](
            rows, res if res is not None else rows, out, norm_weight, norm_bias, w,
            b if b is not None else w,
            n_rows, channels, n_out, rows.stride(0), res.stride(0) if res is not None else 0,
            n_out, float(eps),
            HAS_B=b is not None, HAS_RES=res is not None,
            DOT_PRECISION="ieee" if w.dtype == torch.float32 else "tf32",
            BLOCK_M=cfg["block_m"], BLOCK_C=cfg["block_c"], BLOCK_N=cfg["block_n"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
