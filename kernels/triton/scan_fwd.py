"""Forward selective-scan kernels: one generic 3-pass chunked scan, addressed by index arithmetic.

Every op is a set of K "routes" (K=1 selective_scan, K=2 bidir, K=4 SS2D) over a 2-D grid of
positions (r, c), r < R, c < COLS; position p = r*COLS + c is valid when p < L_TOTAL. A 1-D
sequence of length L is laid out as rows of COLS = BLOCK_C steps (row r holds l = r*COLS + c);
an SS2D feature map uses (r, c) = (h, w). Each tensor is addressed through its own strides, so
no permuted, flipped or contiguous copy is ever made. Route kinds:

* row route:    visits rows in order, each row left to right (selective_scan, bidir dir 0,
  SS2D k=0 row-major);
* column route: visits columns in order, each top to bottom (SS2D k=1 column-major);
* reversed:     the same visit order backwards (bidir dir 1, SS2D k=2, k=3).

A *segment* is the part of one line (row for row routes, column for column routes) inside one
(BLOCK_R, BLOCK_C) tile: a row route's tile holds BLOCK_R segments, a column route's BLOCK_C.
Route order visits segments in a fixed order, so the recurrence across segments is again a
linear recurrence over a short sequence (one pair per segment). Passes:

1. ``_segment_agg_kernel``: per tile, scan each segment from a zero state with
   ``tl.associative_scan`` (``reverse=True`` for reversed routes) and store the segment's
   aggregate pair (prod a, local state) per state n. fp32, O(batch*K*dim*N*L/segment_len).
2. ``_state_pass_kernel``: per (batch, route, channel) scan the aggregates in route order
   (blocked associative scan with a carried prefix) and store the state after every segment.
3. ``_output_kernel``: per tile, recompute the segment scans, add the incoming state
   ``h = b_local + a_local * h_in``, accumulate ``y += C.h`` over states and routes, add D*u,
   gate with silu(z) and store y once (the SS2D cross-merge is this register sum).

Only the per-segment pairs go through HBM; the O(B*L*D*N) discretised tensors never do.
Host-side launch (geometry, strides, buffers) is in ``common.py``; ``launch.py``, ``ss2d.py``
and ``bidir.py`` map each op's tensors onto it. exp uses ``exp2`` with A pre-scaled by log2(e)
(1.4426950408889634), as mamba's CUDA kernel does.
The scan operator is mamba's ``SSMScanOp``: (a0, b0) o (a1, b1) = (a0*a1, a1*b0 + b1).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _ssm_combine(a0, b0, a1, b1):
    return a0 * a1, a1 * b0 + b1


@triton.jit
def _softplus_delta(delta_ptr, bias_ptr, b, k, ch, rr, cc, mask,
                    sd_b, sd_k, sd_c, sd_r, sd_col, sbias_k, sbias_c,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Load route k's delta tile, add the bias and apply softplus (identity above 20)."""
    ptrs = delta_ptr + b * sd_b + k * sd_k + ch * sd_c + rr * sd_r + cc * sd_col
    dt = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt = dt + tl.load(bias_ptr + k * sbias_k + ch * sbias_c).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    return dt


@triton.jit
def _segment_scan(dt, dtu, A_ptr, Bm_ptr, b, k, ch, n, rr, cc, mask,
                  sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col, DPG,
                  COL: tl.constexpr, REV: tl.constexpr):
    """Scan every segment of the tile from a zero state for state n; returns (a_cum, h_local)."""
    a_coef = tl.load(A_ptr + k * sA_k + ch * sA_c + n * sA_n).to(tl.float32) * 1.4426950408889634
    g = ch // DPG
    Bv = tl.load(Bm_ptr + b * sB_b + k * sB_k + g * sB_g + n * sB_n + rr * sB_r + cc * sB_col,
                 mask=mask, other=0.0).to(tl.float32)
    # Padding is the identity pair (1, 0), so it never changes a carried state.
    a = tl.where(mask, tl.exp2(dt * a_coef), 1.0)
    x = dtu * Bv
    if COL:
        a_s, x_s = tl.associative_scan((a, x), 0, _ssm_combine, reverse=REV)
    else:
        a_s, x_s = tl.associative_scan((a, x), 1, _ssm_combine, reverse=REV)
    return a_s, x_s


@triton.jit
def _tile_coords(pid_t, R, COLS, L_TOTAL, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    n_cb = tl.cdiv(COLS, BLOCK_C)
    rb = pid_t // n_cb
    cb = pid_t % n_cb
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    rr = rows[:, None]
    cc = cols[None, :]
    mask = (rr < R) & (cc < COLS) & (rr * COLS + cc < L_TOTAL)
    return rb, cb, rows, cols, rr, cc, mask


@triton.jit
def _segment_index(rb, cb, rows, cols, R, COLS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                   COL: tl.constexpr):
    """Natural segment index of each segment in the tile, and the route's segment count."""
    if COL:
        n_rb = tl.cdiv(R, BLOCK_R)
        return cols * n_rb + rb, COLS * n_rb
    else:
        n_cb = tl.cdiv(COLS, BLOCK_C)
        return rows * n_cb + cb, R * n_cb


@triton.jit
def _agg_route(u_ptr, delta_ptr, A_ptr, Bm_ptr, bias_ptr, agg_a_ptr, agg_h_ptr,
               b, k, ch, rb, cb, rows, cols, rr, cc, mask,
               DIM, N, R, COLS, DPG, MAX_SEG,
               su_b, su_k, su_c, su_r, su_col, sd_b, sd_k, sd_c, sd_r, sd_col,
               sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col, sbias_k, sbias_c,
               K: tl.constexpr, COL: tl.constexpr, REV: tl.constexpr,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, UNROLL_N: tl.constexpr):
    """Pass 1 for one route: store every segment's aggregate pair for each state n."""
    u = tl.load(u_ptr + b * su_b + k * su_k + ch * su_c + rr * su_r + cc * su_col,
                mask=mask, other=0.0).to(tl.float32)
    dt = _softplus_delta(delta_ptr, bias_ptr, b, k, ch, rr, cc, mask, sd_b, sd_k, sd_c,
                         sd_r, sd_col, sbias_k, sbias_c, HAS_BIAS, SOFTPLUS)
    dtu = dt * u
    seg, _ = _segment_index(rb, cb, rows, cols, R, COLS, BLOCK_R, BLOCK_C, COL)
    if COL:
        seg_ok = cols < COLS
    else:
        seg_ok = rows < R
    base = ((b * K + k) * DIM + ch) * MAX_SEG * N
    # The aggregate sits where the scan ends: the last element, or the first when reversed.
    if COL:
        if REV:
            pick = (tl.arange(0, BLOCK_R) == 0)[:, None]
        else:
            pick = (tl.arange(0, BLOCK_R) == BLOCK_R - 1)[:, None]
    else:
        if REV:
            pick = (tl.arange(0, BLOCK_C) == 0)[None, :]
        else:
            pick = (tl.arange(0, BLOCK_C) == BLOCK_C - 1)[None, :]
    for n in tl.range(0, N, loop_unroll_factor=UNROLL_N):
        a_s, x_s = _segment_scan(dt, dtu, A_ptr, Bm_ptr, b, k, ch, n, rr, cc, mask,
                                 sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col,
                                 DPG, COL, REV)
        if COL:
            a_agg = tl.sum(tl.where(pick, a_s, 0.0), 0)
            h_agg = tl.sum(tl.where(pick, x_s, 0.0), 0)
        else:
            a_agg = tl.sum(tl.where(pick, a_s, 0.0), 1)
            h_agg = tl.sum(tl.where(pick, x_s, 0.0), 1)
        tl.store(agg_a_ptr + base + seg * N + n, a_agg, mask=seg_ok)
        tl.store(agg_h_ptr + base + seg * N + n, h_agg, mask=seg_ok)


@triton.jit
def _segment_agg_kernel(
    u_ptr, delta_ptr, A_ptr, Bm_ptr, bias_ptr, agg_a_ptr, agg_h_ptr,
    DIM, N, R, COLS, L_TOTAL, DPG, MAX_SEG,
    su_b, su_k, su_c, su_r, su_col,
    sd_b, sd_k, sd_c, sd_r, sd_col,
    sA_k, sA_c, sA_n,
    sB_b, sB_k, sB_g, sB_n, sB_r, sB_col,
    sbias_k, sbias_c,
    MODE: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, UNROLL_N: tl.constexpr,
):
    pid_t = tl.program_id(0)
    ch = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rb, cb, rows, cols, rr, cc, mask = _tile_coords(pid_t, R, COLS, L_TOTAL, BLOCK_R, BLOCK_C)
    # Routes are unrolled with their kind as constexpr (MODE 0 selective, 1 bidir, 2 SS2D).
    _agg_route(u_ptr, delta_ptr, A_ptr, Bm_ptr, bias_ptr, agg_a_ptr, agg_h_ptr,
               b, 0, ch, rb, cb, rows, cols, rr, cc, mask, DIM, N, R, COLS, DPG, MAX_SEG,
               su_b, su_k, su_c, su_r, su_col, sd_b, sd_k, sd_c, sd_r, sd_col,
               sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col, sbias_k, sbias_c,
               K, False, False, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, UNROLL_N)
    if MODE == 1:
        _agg_route(u_ptr, delta_ptr, A_ptr, Bm_ptr, bias_ptr, agg_a_ptr, agg_h_ptr,
                   b, 1, ch, rb, cb, rows, cols, rr, cc, mask, DIM, N, R, COLS, DPG, MAX_SEG,
                   su_b, su_k, su_c, su_r, su_col, sd_b, sd_k, sd_c, sd_r, sd_col,
                   sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col, sbias_k, sbias_c,
                   K, False, True, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, UNROLL_N)
    if MODE == 2:
        _agg_route(u_ptr, delta_ptr, A_ptr, Bm_ptr, bias_ptr, agg_a_ptr, agg_h_ptr,
                   b, 1, ch, rb, cb, rows, cols, rr, cc, mask, DIM, N, R, COLS, DPG, MAX_SEG,
                   su_b, su_k, su_c, su_r, su_col, sd_b, sd_k, sd_c, sd_r, sd_col,
                   sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col, sbias_k, sbias_c,
                   K, True, False, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, UNROLL_N)
        _agg_route(u_ptr, delta_ptr, A_ptr, Bm_ptr, bias_ptr, agg_a_ptr, agg_h_ptr,
                   b, 2, ch, rb, cb, rows, cols, rr, cc, mask, DIM, N, R, COLS, DPG, MAX_SEG,
                   su_b, su_k, su_c, su_r, su_col, sd_b, sd_k, sd_c, sd_r, sd_col,
                   sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col, sbias_k, sbias_c,
                   K, False, True, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, UNROLL_N)
        _agg_route(u_ptr, delta_ptr, A_ptr, Bm_ptr, bias_ptr, agg_a_ptr, agg_h_ptr,
                   b, 3, ch, rb, cb, rows, cols, rr, cc, mask, DIM, N, R, COLS, DPG, MAX_SEG,
                   su_b, su_k, su_c, su_r, su_col, sd_b, sd_k, sd_c, sd_r, sd_col,
                   sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col, sbias_k, sbias_c,
                   K, True, True, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, UNROLL_N)


@triton.jit
def _state_pass_kernel(
    agg_a_ptr, agg_h_ptr, last_ptr,
    DIM, N, R, COLS, MAX_SEG,
    MODE: tl.constexpr, K: tl.constexpr, STORE_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
    INVERT: tl.constexpr = False,
):
    # INVERT walks every route backwards (the backward pass's reverse recurrence).
    ch = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    # Route kind at run time (k is a program id here).
    if MODE == 2:
        is_col = (k % 2) == 1
        is_rev = k >= 2
    elif MODE == 1:
        is_col = k < 0
        is_rev = k == 1
    else:
        is_col = k < 0
        is_rev = k < 0
    if INVERT:
        is_rev = is_rev == 0
    n_rb = tl.cdiv(R, BLOCK_R)
    n_cb = tl.cdiv(COLS, BLOCK_C)
    n_seg = tl.where(is_col, COLS * n_rb, R * n_cb)
    base = ((b * K + k) * DIM + ch) * MAX_SEG * N
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    carry = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t0 in range(0, n_seg, BLOCK_S):
        t = t0 + tl.arange(0, BLOCK_S)
        # Step t of the route visits segment s; reversed routes walk the segments backwards.
        s = tl.where(is_rev, n_seg - 1 - t, t)
        ok = (t < n_seg)[:, None] & n_ok[None, :]
        ptr = base + s[:, None] * N + offs_n[None, :]
        a = tl.load(agg_a_ptr + ptr, mask=ok, other=1.0)
        h = tl.load(agg_h_ptr + ptr, mask=ok, other=0.0)
        a_s, h_s = tl.associative_scan((a, h), 0, _ssm_combine)
        h_s = h_s + a_s * carry[None, :]
        tl.store(agg_h_ptr + ptr, h_s, mask=ok)  # state after segment s (route order)
        carry = tl.sum(tl.where((tl.arange(0, BLOCK_S) == BLOCK_S - 1)[:, None], h_s, 0.0), 0)
    if STORE_LAST:
        tl.store(last_ptr + (b * K * DIM + k * DIM + ch) * N + offs_n, carry, mask=n_ok)


@triton.jit
def _out_route(y, u, u_ptr, delta_ptr, A_ptr, Bm_ptr, Cm_ptr, D_ptr, bias_ptr, agg_h_ptr,
               b, k, ch, rb, cb, rows, cols, rr, cc, mask,
               DIM, N, R, COLS, DPG, MAX_SEG,
               su_b, su_k, su_c, su_r, su_col, sd_b, sd_k, sd_c, sd_r, sd_col,
               sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col,
               sC_b, sC_k, sC_g, sC_n, sC_r, sC_col, sD_k, sD_c, sbias_k, sbias_c,
               K: tl.constexpr, COL: tl.constexpr, REV: tl.constexpr, SHARED_U: tl.constexpr,
               HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, UNROLL_N: tl.constexpr):
    """Pass 3 for one route: y += C.h + D*u over the tile, h recomputed from segment states."""
    if not SHARED_U:
        u = tl.load(u_ptr + b * su_b + k * su_k + ch * su_c + rr * su_r + cc * su_col,
                    mask=mask, other=0.0).to(tl.float32)
    dt = _softplus_delta(delta_ptr, bias_ptr, b, k, ch, rr, cc, mask, sd_b, sd_k, sd_c,
                         sd_r, sd_col, sbias_k, sbias_c, HAS_BIAS, SOFTPLUS)
    dtu = dt * u
    if HAS_D:
        y += u * tl.load(D_ptr + k * sD_k + ch * sD_c).to(tl.float32)
    seg, n_seg = _segment_index(rb, cb, rows, cols, R, COLS, BLOCK_R, BLOCK_C, COL)
    # State entering a segment = state after the previous segment in route order.
    if REV:
        prev = seg + 1
        has_prev = prev < n_seg
    else:
        prev = seg - 1
        has_prev = seg > 0
    if COL:
        has_prev = has_prev & (cols < COLS)
    else:
        has_prev = has_prev & (rows < R)
    base = ((b * K + k) * DIM + ch) * MAX_SEG * N
    g = ch // DPG
    for n in tl.range(0, N, loop_unroll_factor=UNROLL_N):
        a_s, x_s = _segment_scan(dt, dtu, A_ptr, Bm_ptr, b, k, ch, n, rr, cc, mask,
                                 sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col,
                                 DPG, COL, REV)
        h_in = tl.load(agg_h_ptr + base + prev * N + n, mask=has_prev, other=0.0)
        if COL:
            h = x_s + a_s * h_in[None, :]
        else:
            h = x_s + a_s * h_in[:, None]
        Cv = tl.load(Cm_ptr + b * sC_b + k * sC_k + g * sC_g + n * sC_n + rr * sC_r
                     + cc * sC_col, mask=mask, other=0.0).to(tl.float32)
        y += Cv * h
    return y


@triton.jit
def _output_kernel(
    u_ptr, delta_ptr, A_ptr, Bm_ptr, Cm_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, agg_h_ptr,
    DIM, N, R, COLS, L_TOTAL, DPG, MAX_SEG,
    su_b, su_k, su_c, su_r, su_col,
    sd_b, sd_k, sd_c, sd_r, sd_col,
    sA_k, sA_c, sA_n,
    sB_b, sB_k, sB_g, sB_n, sB_r, sB_col,
    sC_b, sC_k, sC_g, sC_n, sC_r, sC_col,
    sD_k, sD_c, sbias_k, sbias_c,
    sz_b, sz_c, sz_r, sz_col,
    so_b, so_c, so_r, so_col,
    MODE: tl.constexpr, K: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, UNROLL_N: tl.constexpr,
):
    pid_t = tl.program_id(0)
    ch = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rb, cb, rows, cols, rr, cc, mask = _tile_coords(pid_t, R, COLS, L_TOTAL, BLOCK_R, BLOCK_C)
    y = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    # SS2D's four routes read the same feature map: load u once (su_k == 0 there).
    u = tl.load(u_ptr + b * su_b + ch * su_c + rr * su_r + cc * su_col,
                mask=mask, other=0.0).to(tl.float32)
    y = _out_route(y, u, u_ptr, delta_ptr, A_ptr, Bm_ptr, Cm_ptr, D_ptr, bias_ptr, agg_h_ptr,
                   b, 0, ch, rb, cb, rows, cols, rr, cc, mask, DIM, N, R, COLS, DPG, MAX_SEG,
                   su_b, su_k, su_c, su_r, su_col, sd_b, sd_k, sd_c, sd_r, sd_col,
                   sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col,
                   sC_b, sC_k, sC_g, sC_n, sC_r, sC_col, sD_k, sD_c, sbias_k, sbias_c,
                   K, False, False, True, HAS_D, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, UNROLL_N)
    if MODE == 1:
        y = _out_route(y, u, u_ptr, delta_ptr, A_ptr, Bm_ptr, Cm_ptr, D_ptr, bias_ptr,
                       agg_h_ptr, b, 1, ch, rb, cb, rows, cols, rr, cc, mask,
                       DIM, N, R, COLS, DPG, MAX_SEG,
                       su_b, su_k, su_c, su_r, su_col, sd_b, sd_k, sd_c, sd_r, sd_col,
                       sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col,
                       sC_b, sC_k, sC_g, sC_n, sC_r, sC_col, sD_k, sD_c, sbias_k, sbias_c,
                       K, False, True, False, HAS_D, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C,
                       UNROLL_N)
    if MODE == 2:
        y = _out_route(y, u, u_ptr, delta_ptr, A_ptr, Bm_ptr, Cm_ptr, D_ptr, bias_ptr,
                       agg_h_ptr, b, 1, ch, rb, cb, rows, cols, rr, cc, mask,
                       DIM, N, R, COLS, DPG, MAX_SEG,
                       su_b, su_k, su_c, su_r, su_col, sd_b, sd_k, sd_c, sd_r, sd_col,
                       sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col,
                       sC_b, sC_k, sC_g, sC_n, sC_r, sC_col, sD_k, sD_c, sbias_k, sbias_c,
                       K, True, False, True, HAS_D, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, UNROLL_N)
        y = _out_route(y, u, u_ptr, delta_ptr, A_ptr, Bm_ptr, Cm_ptr, D_ptr, bias_ptr,
                       agg_h_ptr, b, 2, ch, rb, cb, rows, cols, rr, cc, mask,
                       DIM, N, R, COLS, DPG, MAX_SEG,
                       su_b, su_k, su_c, su_r, su_col, sd_b, sd_k, sd_c, sd_r, sd_col,
                       sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col,
                       sC_b, sC_k, sC_g, sC_n, sC_r, sC_col, sD_k, sD_c, sbias_k, sbias_c,
                       K, False, True, True, HAS_D, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, UNROLL_N)
        y = _out_route(y, u, u_ptr, delta_ptr, A_ptr, Bm_ptr, Cm_ptr, D_ptr, bias_ptr,
                       agg_h_ptr, b, 3, ch, rb, cb, rows, cols, rr, cc, mask,
                       DIM, N, R, COLS, DPG, MAX_SEG,
                       su_b, su_k, su_c, su_r, su_col, sd_b, sd_k, sd_c, sd_r, sd_col,
                       sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col,
                       sC_b, sC_k, sC_g, sC_n, sC_r, sC_col, sD_k, sD_c, sbias_k, sbias_c,
                       K, True, True, True, HAS_D, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, UNROLL_N)
    if HAS_Z:
        z = tl.load(z_ptr + b * sz_b + ch * sz_c + rr * sz_r + cc * sz_col,
                    mask=mask, other=0.0).to(tl.float32)
        y = y * z / (1.0 + tl.exp(-z))
    tl.store(out_ptr + b * so_b + ch * so_c + rr * so_r + cc * so_col,
             y.to(out_ptr.dtype.element_ty), mask=mask)
