"""Backward selective-scan kernels: recompute from segment states, never store O(B*L*D*N).

Same geometry, routes and segments as ``scan_fwd.py``. For one route (sequence order t),
with ``a_t = exp(dt_t*A)``, ``b_t = dt_t*B_t*u_t``, ``h_t = a_t*h_{t-1} + b_t``,
``y_t = C_t.h_t + D*u_t`` and ``c_t = C_t*dy_t``, the state gradient is the reverse recurrence

    g_t = c_t + a_{t+1} * g_{t+1}

(pairs ``(a_{t+1}, c_t)``: the delta of the *next* position in route order is loaded through
index arithmetic, no shifted copy), scanned per segment, chained across segments in reverse
route order by ``_state_pass_kernel(INVERT=True)`` (starting from the gradient of the last state,
if any), then combined with the recomputed forward states. Since ``a_t*h_{t-1} = h_t - b_t`` no
division is needed:

    d(dt_t*A)  = g_t * (h_t - b_t)            -> ddelta (via A), dA (via dt)
    d(dt_t*u_t) = g_t . B_t                   -> ddelta (via u), du (via dt)
    dB_t += g_t * dt_t * u_t,  dC_t += dy_t * h_t   (summed over channels: fp32 atomics)
    du_t += D*dy_t, dD += dy_t*u_t, ddelta_raw = ddelta * softplus'(x), dbias += ddelta_raw

Passes: ``_bwd_agg_kernel`` (segment aggregates of the g recurrence), the state pass, and
``_bwd_kernel`` (forward recompute + g + all gradients). The forward segment states come from
rerunning forward passes 1-2.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .scan_fwd import _segment_index, _segment_scan, _softplus_delta, _ssm_combine, _tile_coords


@triton.jit
def _next_coords(rr, cc, R, COLS, L_TOTAL, COL: tl.constexpr, REV: tl.constexpr):
    """Grid coordinates of the next position in route order, and whether it exists."""
    if COL:
        q = cc * R + rr
        if REV:
            qn = q - 1
            ok = q >= 1
        else:
            qn = q + 1
            ok = qn < R * COLS
        rn = qn % R
        cn = qn // R
    else:
        p = rr * COLS + cc
        if REV:
            pn = p - 1
            ok = p >= 1
        else:
            pn = p + 1
            ok = pn < L_TOTAL
        rn = pn // COLS
        cn = pn % COLS
    return rn, cn, ok


@triton.jit
def _g_segment_scan(dt_next, mask_next, Cm_ptr, dy, A_ptr, b, k, ch, n, rr, cc, mask,
                    sA_k, sA_c, sA_n, sC_b, sC_k, sC_g, sC_n, sC_r, sC_col, DPG,
                    COL: tl.constexpr, REV: tl.constexpr):
    """Scan pairs (a_{t+1}, C_t*dy_t) per segment against route order; (a_cum, g_local)."""
    a_coef = tl.load(A_ptr + k * sA_k + ch * sA_c + n * sA_n).to(tl.float32) * 1.4426950408889634
    g_idx = ch // DPG
    Cv = tl.load(Cm_ptr + b * sC_b + k * sC_k + g_idx * sC_g + n * sC_n + rr * sC_r
                 + cc * sC_col, mask=mask, other=0.0).to(tl.float32)
    a_next = tl.where(mask_next, tl.exp2(dt_next * a_coef), 0.0)
    a_next = tl.where(mask, a_next, 1.0)  # padding: identity
    c = Cv * dy
    if COL:
        a_s, g_s = tl.associative_scan((a_next, c), 0, _ssm_combine, reverse=not REV)
    else:
        a_s, g_s = tl.associative_scan((a_next, c), 1, _ssm_combine, reverse=not REV)
    return a_s, g_s, Cv


@triton.jit
def _bwd_agg_route(delta_ptr, A_ptr, Cm_ptr, bias_ptr, dy, agg_a_ptr, agg_h_ptr,
                   b, k, ch, rb, cb, rows, cols, rr, cc, mask,
                   DIM, N, R, COLS, L_TOTAL, DPG, MAX_SEG,
                   sd_b, sd_k, sd_c, sd_r, sd_col, sA_k, sA_c, sA_n,
                   sC_b, sC_k, sC_g, sC_n, sC_r, sC_col, sbias_k, sbias_c,
                   K: tl.constexpr, COL: tl.constexpr, REV: tl.constexpr,
                   HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, UNROLL_N: tl.constexpr):
    rn, cn, ok = _next_coords(rr, cc, R, COLS, L_TOTAL, COL, REV)
    mask_next = mask & ok
    dt_next = _softplus_delta(delta_ptr, bias_ptr, b, k, ch, rn, cn, mask_next, sd_b, sd_k,
                              sd_c, sd_r, sd_col, sbias_k, sbias_c, HAS_BIAS, SOFTPLUS)
    seg, _n_seg = _segment_index(rb, cb, rows, cols, R, COLS, BLOCK_R, BLOCK_C, COL)
    if COL:
        seg_ok = cols < COLS
    else:
        seg_ok = rows < R
    base = ((b * K + k) * DIM + ch) * MAX_SEG * N
    # The reverse-order scan ends at the segment's first element in route order.
    if COL:
        if REV:
            pick = (tl.arange(0, BLOCK_R) == BLOCK_R - 1)[:, None]
        else:
            pick = (tl.arange(0, BLOCK_R) == 0)[:, None]
    else:
        if REV:
            pick = (tl.arange(0, BLOCK_C) == BLOCK_C - 1)[None, :]
        else:
            pick = (tl.arange(0, BLOCK_C) == 0)[None, :]
    for n in tl.range(0, N, loop_unroll_factor=UNROLL_N):
        a_s, g_s, _ = _g_segment_scan(dt_next, mask_next, Cm_ptr, dy, A_ptr, b, k, ch, n, rr,
                                      cc, mask, sA_k, sA_c, sA_n, sC_b, sC_k, sC_g, sC_n,
                                      sC_r, sC_col, DPG, COL, REV)
        if COL:
            a_agg = tl.sum(tl.where(pick, a_s, 0.0), 0)
            g_agg = tl.sum(tl.where(pick, g_s, 0.0), 0)
        else:
            a_agg = tl.sum(tl.where(pick, a_s, 0.0), 1)
            g_agg = tl.sum(tl.where(pick, g_s, 0.0), 1)
        tl.store(agg_a_ptr + base + seg * N + n, a_agg, mask=seg_ok)
        tl.store(agg_h_ptr + base + seg * N + n, g_agg, mask=seg_ok)


@triton.jit
def _bwd_agg_kernel(
    delta_ptr, A_ptr, Cm_ptr, bias_ptr, dy_ptr, agg_a_ptr, agg_h_ptr,
    DIM, N, R, COLS, L_TOTAL, DPG, MAX_SEG,
    sd_b, sd_k, sd_c, sd_r, sd_col, sA_k, sA_c, sA_n,
    sC_b, sC_k, sC_g, sC_n, sC_r, sC_col, sbias_k, sbias_c,
    sy_b, sy_c, sy_r, sy_col,
    MODE: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, UNROLL_N: tl.constexpr,
):
    pid_t = tl.program_id(0)
    ch = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rb, cb, rows, cols, rr, cc, mask = _tile_coords(pid_t, R, COLS, L_TOTAL, BLOCK_R, BLOCK_C)
    dy = tl.load(dy_ptr + b * sy_b + ch * sy_c + rr * sy_r + cc * sy_col, mask=mask,
                 other=0.0).to(tl.float32)
    for kk in tl.static_range(K):
        # Route kind as constexpr: column routes are SS2D's odd k; reversed are bidir k=1 and
        # SS2D k>=2.
        _bwd_agg_route(delta_ptr, A_ptr, Cm_ptr, bias_ptr, dy, agg_a_ptr, agg_h_ptr,
                       b, kk, ch, rb, cb, rows, cols, rr, cc, mask,
                       DIM, N, R, COLS, L_TOTAL, DPG, MAX_SEG,
                       sd_b, sd_k, sd_c, sd_r, sd_col, sA_k, sA_c, sA_n,
                       sC_b, sC_k, sC_g, sC_n, sC_r, sC_col, sbias_k, sbias_c,
                       K, (MODE == 2) & (kk % 2 == 1),
                       ((MODE == 1) & (kk == 1)) | ((MODE == 2) & (kk >= 2)),
                       HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, UNROLL_N)


@triton.jit
def _bwd_route(du_acc, u, dy, u_ptr, delta_ptr, A_ptr, Bm_ptr, Cm_ptr, D_ptr, bias_ptr,
               fwd_h_ptr, bwd_g_ptr, du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr,
               dbias_ptr,
               b, k, ch, rb, cb, rows, cols, rr, cc, mask,
               DIM, N, R, COLS, L_TOTAL, DPG, MAX_SEG,
               su_b, su_k, su_c, su_r, su_col, sd_b, sd_k, sd_c, sd_r, sd_col,
               sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col,
               sC_b, sC_k, sC_g, sC_n, sC_r, sC_col, sD_k, sD_c, sbias_k, sbias_c,
               K: tl.constexpr, COL: tl.constexpr, REV: tl.constexpr, SHARED_U: tl.constexpr,
               HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, UNROLL_N: tl.constexpr):
    if not SHARED_U:
        u = tl.load(u_ptr + b * su_b + k * su_k + ch * su_c + rr * su_r + cc * su_col,
                    mask=mask, other=0.0).to(tl.float32)
    # Raw (pre-softplus) delta for softplus' = sigmoid(x).
    x = tl.load(delta_ptr + b * sd_b + k * sd_k + ch * sd_c + rr * sd_r + cc * sd_col,
                mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = x + tl.load(bias_ptr + k * sbias_k + ch * sbias_c).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)
    else:
        dt = x
    dt = tl.where(mask, dt, 0.0)
    dtu = dt * u
    rn, cn, ok = _next_coords(rr, cc, R, COLS, L_TOTAL, COL, REV)
    mask_next = mask & ok
    dt_next = _softplus_delta(delta_ptr, bias_ptr, b, k, ch, rn, cn, mask_next, sd_b, sd_k,
                              sd_c, sd_r, sd_col, sbias_k, sbias_c, HAS_BIAS, SOFTPLUS)
    seg, n_seg = _segment_index(rb, cb, rows, cols, R, COLS, BLOCK_R, BLOCK_C, COL)
    if REV:
        prev = seg + 1
        has_prev = prev < n_seg
        nxt = seg - 1
        has_next = seg > 0
    else:
        prev = seg - 1
        has_prev = seg > 0
        nxt = seg + 1
        has_next = nxt < n_seg
    if COL:
        line_ok = cols < COLS
    else:
        line_ok = rows < R
    has_prev = has_prev & line_ok
    has_next = has_next & line_ok
    base = ((b * K + k) * DIM + ch) * MAX_SEG * N
    g_idx = ch // DPG
    d_ab = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)   # sum_n A_n * g * (h - b)
    g_b = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)    # sum_n g * B_n
    for n in tl.range(0, N, loop_unroll_factor=UNROLL_N):
        a_s, x_s = _segment_scan(dt, dtu, A_ptr, Bm_ptr, b, k, ch, n, rr, cc, mask,
                                 sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col,
                                 DPG, COL, REV)
        h_in = tl.load(fwd_h_ptr + base + prev * N + n, mask=has_prev, other=0.0)
        ga_s, gx_s, Cv = _g_segment_scan(dt_next, mask_next, Cm_ptr, dy, A_ptr, b, k, ch, n,
                                         rr, cc, mask, sA_k, sA_c, sA_n, sC_b, sC_k, sC_g,
                                         sC_n, sC_r, sC_col, DPG, COL, REV)
        g_in = tl.load(bwd_g_ptr + base + nxt * N + n, mask=has_next, other=0.0)
        if COL:
            h = x_s + a_s * h_in[None, :]
            g = gx_s + ga_s * g_in[None, :]
        else:
            h = x_s + a_s * h_in[:, None]
            g = gx_s + ga_s * g_in[:, None]
        h = tl.where(mask, h, 0.0)
        g = tl.where(mask, g, 0.0)
        Bv = tl.load(Bm_ptr + b * sB_b + k * sB_k + g_idx * sB_g + n * sB_n + rr * sB_r
                     + cc * sB_col, mask=mask, other=0.0).to(tl.float32)
        a_n = tl.load(A_ptr + k * sA_k + ch * sA_c + n * sA_n).to(tl.float32)
        gh = g * (h - dtu * Bv)        # dL/d(dt*A_n)
        d_ab += gh * a_n
        g_b += g * Bv
        tl.atomic_add(dA_ptr + (k * DIM + ch) * N + n, tl.sum(tl.sum(gh * dt, 1), 0))
        off = (((b * K + k) * (DIM // DPG) + g_idx) * N + n) * L_TOTAL + rr * COLS + cc
        tl.atomic_add(dB_ptr + off, g * dtu, mask=mask)
        tl.atomic_add(dC_ptr + off, dy * h, mask=mask)
    ddt = d_ab + g_b * u
    if SOFTPLUS:
        ddt = tl.where(x <= 20.0, ddt / (1.0 + tl.exp(-x)), ddt)
    ddt = tl.where(mask, ddt, 0.0)
    tl.store(ddelta_ptr + ((b * K + k) * DIM + ch) * L_TOTAL + rr * COLS + cc, ddt, mask=mask)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + k * DIM + ch, tl.sum(tl.sum(ddt, 1), 0))
    du = g_b * dt
    if HAS_D:
        du += dy * tl.load(D_ptr + k * sD_k + ch * sD_c).to(tl.float32)
        tl.atomic_add(dD_ptr + k * DIM + ch, tl.sum(tl.sum(dy * u, 1), 0))
    if SHARED_U:
        du_acc += du
    else:
        tl.store(du_ptr + ((b * K + k) * DIM + ch) * L_TOTAL + rr * COLS + cc, du, mask=mask)
    return du_acc


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, Bm_ptr, Cm_ptr, D_ptr, bias_ptr, dy_ptr, fwd_h_ptr, bwd_g_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    DIM, N, R, COLS, L_TOTAL, DPG, MAX_SEG,
    su_b, su_k, su_c, su_r, su_col, sd_b, sd_k, sd_c, sd_r, sd_col,
    sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col,
    sC_b, sC_k, sC_g, sC_n, sC_r, sC_col, sD_k, sD_c, sbias_k, sbias_c,
    sy_b, sy_c, sy_r, sy_col,
    MODE: tl.constexpr, K: tl.constexpr, HAS_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, UNROLL_N: tl.constexpr,
):
    """Compute all gradients for one tile and channel.

    Outputs are fp32 and contiguous: du / ddelta (batch, K, dim, L) (du (batch, dim, L) when
    the routes share u), dB / dC (batch, K, G, N, L), dA (K*dim, N), dD / dbias (K*dim,).
    """
    pid_t = tl.program_id(0)
    ch = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rb, cb, rows, cols, rr, cc, mask = _tile_coords(pid_t, R, COLS, L_TOTAL, BLOCK_R, BLOCK_C)
    dy = tl.load(dy_ptr + b * sy_b + ch * sy_c + rr * sy_r + cc * sy_col, mask=mask,
                 other=0.0).to(tl.float32)
    u = tl.load(u_ptr + b * su_b + ch * su_c + rr * su_r + cc * su_col,
                mask=mask, other=0.0).to(tl.float32)
    SHARED_U: tl.constexpr = MODE == 2
    du_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for kk in tl.static_range(K):
        du_acc = _bwd_route(du_acc, u, dy, u_ptr, delta_ptr, A_ptr, Bm_ptr, Cm_ptr, D_ptr,
                            bias_ptr, fwd_h_ptr, bwd_g_ptr, du_ptr, ddelta_ptr, dA_ptr, dB_ptr,
                            dC_ptr, dD_ptr, dbias_ptr,
                            b, kk, ch, rb, cb, rows, cols, rr, cc, mask,
                            DIM, N, R, COLS, L_TOTAL, DPG, MAX_SEG,
                            su_b, su_k, su_c, su_r, su_col, sd_b, sd_k, sd_c, sd_r, sd_col,
                            sA_k, sA_c, sA_n, sB_b, sB_k, sB_g, sB_n, sB_r, sB_col,
                            sC_b, sC_k, sC_g, sC_n, sC_r, sC_col, sD_k, sD_c, sbias_k, sbias_c,
                            K, (MODE == 2) & (kk % 2 == 1),
                            ((MODE == 1) & (kk == 1)) | ((MODE == 2) & (kk >= 2)),
                            SHARED_U, HAS_D, HAS_BIAS, SOFTPLUS, BLOCK_R, BLOCK_C, UNROLL_N)
    if SHARED_U:
        tl.store(du_ptr + (b * DIM + ch) * L_TOTAL + rr * COLS + cc, du_acc, mask=mask)
