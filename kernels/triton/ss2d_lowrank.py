"""Fused SS2D forward for channels-last maps, with the Δ projection computed in the kernel.

Same math and same 3 passes as ``scan_fwd.py`` (segment aggregates, state pass, output), but
laid out for what VMamba's block produces: x is (batch, H, W, dim) with channels innermost, and
Δ is not read as a (batch, 4, dim, H, W) tensor. Instead each route's Δ is rebuilt in registers
from its low-rank factors, ``Δ_k[p, c] = Σ_r x_proj[p, k*P + r] · W_k[c, r] + bias_k[c]``
(P = R + 2N, W = ``dt_projs_weight``), so the kernel reads R numbers per pixel and route instead
of dim; Δ is two thirds of the bytes of the unfused scan.

A program owns a (BLOCK_R, BLOCK_C) pixel tile x BLOCK_D channels: every load and store moves
BLOCK_D contiguous channels per pixel (coalesced in NHWC, where the one-channel-per-program
kernel of ``scan_fwd.py`` strides by dim between pixels). Segments are tile rows (routes 0/2)
and tile columns (routes 1/3) exactly as in ``scan_fwd.py``; the per-segment states are stored
(batch, 4, segment, N, dim) with channels innermost. B and C are read straight out of x_proj.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .scan_fwd import _ssm_combine

# Tile (rows, cols, channels) and warps: swept on an H100 by bench/scan.py --tune-lowrank
# ((8, 16, 16) x 4 warps was the best of 16 configs). State pass: its only parallelism is
# routes x batch x dim / state_block_m programs; at the old 128 channels per program VMamba-T
# stage 1 ran 4 programs and took 421 of the 809 us (ncu); 4 channels x 512 segments per step
# was the best of 18 (bench/results/scan_lowrank_state_h100.json: 446 us in all). ``impl``
# picks the CUDA implementation: "expanded" (Δ by one GEMM, then the channel-first kernels of
# scan_fwd.py on a contiguous x) or "fused" (these kernels). The fused kernels are still
# slower (446 vs 362 us at that shape: their aggregate / output kernels hold 168 / 255
# registers per thread, 18 / 12 % occupancy), so "expanded" stays the default.
# Reading x / B / C in place and writing y NHWC instead of the layout copies was slower still
# (bench/results/scan_lowrank_inplace_h100.json): the scan_fwd.py kernels want channel-first.
TUNING = {"block": (8, 16, 16), "num_warps": 4, "state_block_s": 512, "state_block_m": 4,
          "impl": "expanded"}


@triton.jit
def _coords(pid_t, pid_c, H, W, DIM, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
            BLOCK_D: tl.constexpr):
    n_cb = tl.cdiv(W, BLOCK_C)
    rb = pid_t // n_cb
    cb = pid_t % n_cb
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    chans = pid_c * BLOCK_D + tl.arange(0, BLOCK_D)
    r3 = rows[:, None, None]
    c3 = cols[None, :, None]
    d3 = chans[None, None, :]
    pix = (r3 < H) & (c3 < W)
    return rb, cb, rows, cols, chans, r3, c3, d3, pix, d3 < DIM


@triton.jit
def _route_delta(p_ptr, w_ptr, bias_ptr, b, k, r3, c3, d3, pix, ch_ok, DIM, R,
                 sp_b, sp_h, sp_w, sp_c, sw_k, sw_c, sw_r,
                 P: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Route k's Δ over the tile, (BLOCK_R, BLOCK_C, BLOCK_D) fp32, from its rank-R factors."""
    row_ptr = p_ptr + b * sp_b + r3 * sp_h + c3 * sp_w + (k * P) * sp_c
    w_row = w_ptr + k * sw_k + d3 * sw_c
    dt = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_D], dtype=tl.float32)
    for r in range(R):
        v = tl.load(row_ptr + r * sp_c, mask=pix, other=0.0).to(tl.float32)
        w = tl.load(w_row + r * sw_r, mask=ch_ok, other=0.0).to(tl.float32)
        dt += v * w
    if HAS_BIAS:
        dt += tl.load(bias_ptr + k * DIM + d3, mask=ch_ok, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    return dt


@triton.jit
def _route_scan(dt, dtu, p_ptr, A_ptr, b, k, n, r3, c3, d3, pix, mask, ch_ok, DIM, R,
                sp_b, sp_h, sp_w, sp_c, sA_c, sA_n,
                P: tl.constexpr, COL: tl.constexpr, REV: tl.constexpr):
    """Scan every segment of the tile from a zero state for state n: (a_cum, h_local)."""
    a_coef = tl.load(A_ptr + (k * DIM + d3) * sA_c + n * sA_n, mask=ch_ok,
                     other=0.0).to(tl.float32) * 1.4426950408889634
    Bv = tl.load(p_ptr + b * sp_b + r3 * sp_h + c3 * sp_w + (k * P + R + n) * sp_c,
                 mask=pix, other=0.0).to(tl.float32)
    a = tl.where(mask, tl.exp2(dt * a_coef), 1.0)  # padding = identity pair (1, 0)
    x = dtu * Bv
    if COL:
        return tl.associative_scan((a, x), 0, _ssm_combine, reverse=REV)
    else:
        return tl.associative_scan((a, x), 1, _ssm_combine, reverse=REV)


@triton.jit
def _seg_rows(rb, cb, rows, cols, H, W, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
              COL: tl.constexpr):
    """Natural segment index of each segment of the tile, its validity, and the segment count."""
    if COL:
        n_rb = tl.cdiv(H, BLOCK_R)
        return cols * n_rb + rb, cols < W, W * n_rb
    else:
        n_cb = tl.cdiv(W, BLOCK_C)
        return rows * n_cb + cb, rows < H, H * n_cb


@triton.jit
def _agg_route(x_ptr, p_ptr, w_ptr, A_ptr, bias_ptr, agg_a_ptr, agg_h_ptr, u, b, k,
               rb, cb, rows, cols, chans, r3, c3, d3, pix, ch_ok, H, W, DIM, N, R, MAX_SEG,
               sp_b, sp_h, sp_w, sp_c, sw_k, sw_c, sw_r, sA_c, sA_n,
               P: tl.constexpr, COL: tl.constexpr, REV: tl.constexpr,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    mask = pix & ch_ok
    dt = _route_delta(p_ptr, w_ptr, bias_ptr, b, k, r3, c3, d3, pix, ch_ok, DIM, R,
                      sp_b, sp_h, sp_w, sp_c, sw_k, sw_c, sw_r, P, HAS_BIAS, SOFTPLUS,
                      BLOCK_R, BLOCK_C, BLOCK_D)
    dtu = dt * u
    seg, seg_ok, _ = _seg_rows(rb, cb, rows, cols, H, W, BLOCK_R, BLOCK_C, COL)
    # The aggregate sits where the segment's scan ends: last element, or first when reversed.
    if COL:
        if REV:
            pick = (tl.arange(0, BLOCK_R) == 0)[:, None, None]
        else:
            pick = (tl.arange(0, BLOCK_R) == BLOCK_R - 1)[:, None, None]
    else:
        if REV:
            pick = (tl.arange(0, BLOCK_C) == 0)[None, :, None]
        else:
            pick = (tl.arange(0, BLOCK_C) == BLOCK_C - 1)[None, :, None]
    ok = seg_ok[:, None] & (chans < DIM)[None, :]
    base = (b * 4 + k) * MAX_SEG * N * DIM
    for n in range(N):
        a_s, x_s = _route_scan(dt, dtu, p_ptr, A_ptr, b, k, n, r3, c3, d3, pix, mask, ch_ok,
                               DIM, R, sp_b, sp_h, sp_w, sp_c, sA_c, sA_n, P, COL, REV)
        if COL:
            a_agg = tl.sum(tl.where(pick, a_s, 0.0), 0)
            h_agg = tl.sum(tl.where(pick, x_s, 0.0), 0)
        else:
            a_agg = tl.sum(tl.where(pick, a_s, 0.0), 1)
            h_agg = tl.sum(tl.where(pick, x_s, 0.0), 1)
        off = base + (seg[:, None] * N + n) * DIM + chans[None, :]
        tl.store(agg_a_ptr + off, a_agg, mask=ok)
        tl.store(agg_h_ptr + off, h_agg, mask=ok)


@triton.jit
def _lowrank_agg_kernel(
    x_ptr, p_ptr, w_ptr, A_ptr, bias_ptr, agg_a_ptr, agg_h_ptr,
    H, W, DIM, N, R, MAX_SEG,
    sx_b, sx_h, sx_w, sx_c, sp_b, sp_h, sp_w, sp_c, sw_k, sw_c, sw_r, sA_c, sA_n,
    P: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rb, cb, rows, cols, chans, r3, c3, d3, pix, ch_ok = _coords(
        pid_t, pid_c, H, W, DIM, BLOCK_R, BLOCK_C, BLOCK_D)
    u = tl.load(x_ptr + b * sx_b + r3 * sx_h + c3 * sx_w + d3 * sx_c, mask=pix & ch_ok,
                other=0.0).to(tl.float32)
    # Route k: k=0 rows, k=1 columns, k=2 / k=3 their reverses (constexpr kinds).
    _agg_route(x_ptr, p_ptr, w_ptr, A_ptr, bias_ptr, agg_a_ptr, agg_h_ptr, u, b, 0,
               rb, cb, rows, cols, chans, r3, c3, d3, pix, ch_ok, H, W, DIM, N, R, MAX_SEG,
               sp_b, sp_h, sp_w, sp_c, sw_k, sw_c, sw_r, sA_c, sA_n,
               P, False, False, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, BLOCK_D)
    _agg_route(x_ptr, p_ptr, w_ptr, A_ptr, bias_ptr, agg_a_ptr, agg_h_ptr, u, b, 1,
               rb, cb, rows, cols, chans, r3, c3, d3, pix, ch_ok, H, W, DIM, N, R, MAX_SEG,
               sp_b, sp_h, sp_w, sp_c, sw_k, sw_c, sw_r, sA_c, sA_n,
               P, True, False, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, BLOCK_D)
    _agg_route(x_ptr, p_ptr, w_ptr, A_ptr, bias_ptr, agg_a_ptr, agg_h_ptr, u, b, 2,
               rb, cb, rows, cols, chans, r3, c3, d3, pix, ch_ok, H, W, DIM, N, R, MAX_SEG,
               sp_b, sp_h, sp_w, sp_c, sw_k, sw_c, sw_r, sA_c, sA_n,
               P, False, True, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, BLOCK_D)
    _agg_route(x_ptr, p_ptr, w_ptr, A_ptr, bias_ptr, agg_a_ptr, agg_h_ptr, u, b, 3,
               rb, cb, rows, cols, chans, r3, c3, d3, pix, ch_ok, H, W, DIM, N, R, MAX_SEG,
               sp_b, sp_h, sp_w, sp_c, sw_k, sw_c, sw_r, sA_c, sA_n,
               P, True, True, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, BLOCK_D)


@triton.jit
def _lowrank_state_kernel(agg_a_ptr, agg_h_ptr, H, W, M, MAX_SEG,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr):
    """Scan the segment aggregates of route k in route order; M = N * dim values per segment."""
    pid_m = tl.program_id(0)
    k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    is_col = (k % 2) == 1
    is_rev = k >= 2
    n_seg = tl.where(is_col, W * tl.cdiv(H, BLOCK_R), H * tl.cdiv(W, BLOCK_C))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    base = (b * 4 + k) * MAX_SEG * M
    carry = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t0 in range(0, n_seg, BLOCK_S):
        t = t0 + tl.arange(0, BLOCK_S)
        s = tl.where(is_rev, n_seg - 1 - t, t)  # step t of the route visits segment s
        ok = (t < n_seg)[:, None] & m_ok[None, :]
        ptr = base + s[:, None] * M + offs_m[None, :]
        a = tl.load(agg_a_ptr + ptr, mask=ok, other=1.0)
        h = tl.load(agg_h_ptr + ptr, mask=ok, other=0.0)
        a_s, h_s = tl.associative_scan((a, h), 0, _ssm_combine)
        h_s = h_s + a_s * carry[None, :]
        tl.store(agg_h_ptr + ptr, h_s, mask=ok)  # state after segment s
        carry = tl.sum(tl.where((tl.arange(0, BLOCK_S) == BLOCK_S - 1)[:, None], h_s, 0.0), 0)


@triton.jit
def _out_route(y, u, p_ptr, w_ptr, A_ptr, D_ptr, bias_ptr, agg_h_ptr, b, k,
               rb, cb, rows, cols, chans, r3, c3, d3, pix, ch_ok, H, W, DIM, N, R, MAX_SEG,
               sp_b, sp_h, sp_w, sp_c, sw_k, sw_c, sw_r, sA_c, sA_n,
               P: tl.constexpr, COL: tl.constexpr, REV: tl.constexpr, HAS_D: tl.constexpr,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    mask = pix & ch_ok
    dt = _route_delta(p_ptr, w_ptr, bias_ptr, b, k, r3, c3, d3, pix, ch_ok, DIM, R,
                      sp_b, sp_h, sp_w, sp_c, sw_k, sw_c, sw_r, P, HAS_BIAS, SOFTPLUS,
                      BLOCK_R, BLOCK_C, BLOCK_D)
    dtu = dt * u
    if HAS_D:
        y += u * tl.load(D_ptr + k * DIM + d3, mask=ch_ok, other=0.0).to(tl.float32)
    seg, seg_ok, n_seg = _seg_rows(rb, cb, rows, cols, H, W, BLOCK_R, BLOCK_C, COL)
    # State entering a segment = state after the previous segment in route order.
    if REV:
        prev = seg + 1
        has_prev = (prev < n_seg) & seg_ok
    else:
        prev = seg - 1
        has_prev = (seg > 0) & seg_ok
    ok = has_prev[:, None] & (chans < DIM)[None, :]
    base = (b * 4 + k) * MAX_SEG * N * DIM
    for n in range(N):
        a_s, x_s = _route_scan(dt, dtu, p_ptr, A_ptr, b, k, n, r3, c3, d3, pix, mask, ch_ok,
                               DIM, R, sp_b, sp_h, sp_w, sp_c, sA_c, sA_n, P, COL, REV)
        h_in = tl.load(agg_h_ptr + base + (prev[:, None] * N + n) * DIM + chans[None, :],
                       mask=ok, other=0.0)
        if COL:
            h = x_s + a_s * h_in[None, :, :]
        else:
            h = x_s + a_s * h_in[:, None, :]
        Cv = tl.load(p_ptr + b * sp_b + r3 * sp_h + c3 * sp_w + (k * P + R + N + n) * sp_c,
                     mask=pix, other=0.0).to(tl.float32)
        y += Cv * h
    return y


@triton.jit
def _lowrank_out_kernel(
    x_ptr, p_ptr, w_ptr, A_ptr, D_ptr, bias_ptr, agg_h_ptr, out_ptr,
    H, W, DIM, N, R, MAX_SEG,
    sx_b, sx_h, sx_w, sx_c, sp_b, sp_h, sp_w, sp_c, sw_k, sw_c, sw_r, sA_c, sA_n,
    so_b, so_h, so_w, so_c,
    P: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rb, cb, rows, cols, chans, r3, c3, d3, pix, ch_ok = _coords(
        pid_t, pid_c, H, W, DIM, BLOCK_R, BLOCK_C, BLOCK_D)
    mask = pix & ch_ok
    u = tl.load(x_ptr + b * sx_b + r3 * sx_h + c3 * sx_w + d3 * sx_c, mask=mask,
                other=0.0).to(tl.float32)
    y = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_D], dtype=tl.float32)
    y = _out_route(y, u, p_ptr, w_ptr, A_ptr, D_ptr, bias_ptr, agg_h_ptr, b, 0,
                   rb, cb, rows, cols, chans, r3, c3, d3, pix, ch_ok, H, W, DIM, N, R, MAX_SEG,
               sp_b, sp_h, sp_w, sp_c, sw_k, sw_c, sw_r, sA_c, sA_n,
                   P, False, False, HAS_D, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, BLOCK_D)
    y = _out_route(y, u, p_ptr, w_ptr, A_ptr, D_ptr, bias_ptr, agg_h_ptr, b, 1,
                   rb, cb, rows, cols, chans, r3, c3, d3, pix, ch_ok, H, W, DIM, N, R, MAX_SEG,
               sp_b, sp_h, sp_w, sp_c, sw_k, sw_c, sw_r, sA_c, sA_n,
                   P, True, False, HAS_D, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, BLOCK_D)
    y = _out_route(y, u, p_ptr, w_ptr, A_ptr, D_ptr, bias_ptr, agg_h_ptr, b, 2,
                   rb, cb, rows, cols, chans, r3, c3, d3, pix, ch_ok, H, W, DIM, N, R, MAX_SEG,
               sp_b, sp_h, sp_w, sp_c, sw_k, sw_c, sw_r, sA_c, sA_n,
                   P, False, True, HAS_D, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, BLOCK_D)
    y = _out_route(y, u, p_ptr, w_ptr, A_ptr, D_ptr, bias_ptr, agg_h_ptr, b, 3,
                   rb, cb, rows, cols, chans, r3, c3, d3, pix, ch_ok, H, W, DIM, N, R, MAX_SEG,
               sp_b, sp_h, sp_w, sp_c, sw_k, sw_c, sw_r, sA_c, sA_n,
                   P, True, True, HAS_D, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, BLOCK_D)
    tl.store(out_ptr + b * so_b + r3 * so_h + c3 * so_w + d3 * so_c,
             y.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(height, width, dim):
    block_r, block_c, block_d = TUNING["block"]
    return (min(block_r, triton.next_power_of_2(height)),
            min(block_c, triton.next_power_of_2(width)),
            min(block_d, max(16, triton.next_power_of_2(dim))))


def _expanded_fwd(x, x_proj, dt_weight, A, D, dt_bias, delta_softplus, out_dtype):
    """Δ expanded by one batched GEMM (einsum), then ss2d_fwd on a channel-first copy of x."""
    from ..reference import expand_lowrank
    from .ss2d import ss2d_fwd

    xc, delta, B, C = expand_lowrank(x, x_proj, dt_weight.to(x_proj.dtype), A.shape[1])
    y = ss2d_fwd(xc.contiguous(), delta, A, B.contiguous(), C.contiguous(), D, dt_bias,
                 delta_softplus, out_dtype)
    return y.permute(0, 2, 3, 1).contiguous()


def ss2d_lowrank_fwd(x, x_proj, dt_weight, A, D, dt_bias, delta_softplus, out_dtype):
    """Return y (batch, H, W, dim) contiguous in ``out_dtype``; see ``ss2d_scan_lowrank``."""
    if TUNING["impl"] == "expanded":
        return _expanded_fwd(x, x_proj, dt_weight, A, D, dt_bias, delta_softplus, out_dtype)
    batch, height, width, dim = x.shape
    dstate = A.shape[1]
    rank = dt_weight.shape[2]
    out = torch.empty(batch, height, width, dim, device=x.device, dtype=out_dtype)
    if height * width == 0 or batch == 0:
        return out
    br, bc, bd = _blocks(height, width, dim)
    n_rb, n_cb = triton.cdiv(height, br), triton.cdiv(width, bc)
    max_seg = max(height * n_cb, width * n_rb)
    agg_a = torch.empty(batch, 4, max_seg, dstate, dim, device=x.device, dtype=torch.float32)
    agg_h = torch.empty_like(agg_a)
    dummy = x
    common = (height, width, dim, dstate, rank, max_seg,
              *x.stride(), *x_proj.stride(), *dt_weight.stride(), *A.stride())
    meta = dict(P=rank + 2 * dstate, HAS_BIAS=dt_bias is not None, SOFTPLUS=delta_softplus,
                BLOCK_R=br, BLOCK_C=bc, BLOCK_D=bd, num_warps=TUNING["num_warps"])
    grid = (n_rb * n_cb, triton.cdiv(dim, bd), batch)
    _lowrank_agg_kernel[grid](
        x, x_proj, dt_weight, A, dt_bias if dt_bias is not None else dummy, agg_a, agg_h,
        *common, **meta)
    m = dstate * dim
    bm = min(TUNING["state_block_m"], triton.next_power_of_2(m))
    _lowrank_state_kernel[(triton.cdiv(m, bm), 4, batch)](
        agg_a, agg_h, height, width, m, max_seg, BLOCK_R=br, BLOCK_C=bc,
        BLOCK_S=TUNING["state_block_s"], BLOCK_M=bm, num_warps=4)
    _lowrank_out_kernel[grid](
        x, x_proj, dt_weight, A, D if D is not None else dummy,
        dt_bias if dt_bias is not None else dummy, agg_h, out, *common, *out.stride(),
        HAS_D=D is not None, **meta)
    return out
