"""SS2D forward for channels-last maps, with Δ given by its low-rank factors (VMamba's block).

``ss2d_scan_lowrank``: x is (batch, H, W, dim) with channels innermost, as VMamba's block
produces it, and route k's Δ is ``Δ_k[p, c] = Σ_r x_proj[p, k*P + r] · W_k[c, r] + bias_k[c]``
(P = R + 2N, W = ``dt_projs_weight``); B and C are columns of x_proj. Two implementations:

* ``seq`` (default, N = 1, what VMamba v2 uses): one program walks one *segment* (a run of
  consecutive steps of a route) step by step for a block of channels. Every tensor it touches
  is a vector of contiguous NHWC channels or a scalar, so there is no tile layout to exchange
  (no shared memory, no shuffles), no register tile, and no layout copy of x, B, C or y.
  Parallelism comes from segments x channel blocks. Three passes, as in ``scan_fwd.py``:
  segment aggregates, a scan over the aggregates (the state entering each segment), outputs.
  Small dt ranks are projected inside the walk (R loads and FMAs a step); larger ones by one
  GEMM over x_proj first (one load a step).
* ``expanded`` (any N): Δ by one GEMM (einsum), then the channel-first kernels of
  ``scan_fwd.py`` on contiguous copies, y permuted back to NHWC.

A third implementation, 3-D (rows, cols, channels) tiles with 2-D associative scans, was
slower than both and was removed (bench/PERF_NOTES.md: 12-18 % occupancy, 39-61 % of its
shared-memory wavefronts bank conflicts under ncu).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..reference import as_parts, layer_norm_out
from .common import pow2_option, prepared
from .scan_fwd import _ssm_combine

# ``impl`` picks the CUDA implementation ("seq" falls back to "expanded" for N > 1). The seq
# parameters were swept on an H200 by bench/scan.py --tune-lowrank seq
# (bench/results/scan_lowrank_seq_h200.json): 128 channels per 1-warp program, segments of 32
# steps unrolled by 4 (halved, down to the unroll, while there are < 4096 programs), dt ranks
# <= 8 projected inline. VMamba-T 1280x720 stages 1-4 in the same run: 183 / 120 / 71 / 52 us
# vs 351 / 187 / 111 / 106 us for "expanded". The state pass scans state_block_s segments of
# state_block_m channels per step (its parallelism is only 4 routes x batch x dim / block_m).
# Storing the aggregates segments-innermost (so the state pass reads contiguous runs, one
# channel per program) halved the state pass (199 -> 99 us per VMamba-T forward at 1280x720,
# H100) but made the aggregate stores scattered, and at the short segments of stages 2-4 the
# aggregate kernel took 711 instead of 308 us: reverted
# (bench/results/profile_vmamba_tiny_720p_seq_aggT_h100.json).
TUNING = {
    "impl": "seq",
    "seq_steps": 32,
    "seq_unroll": 4,
    "seq_min_programs": 4096,
    "seq_block_d": 128,
    # Inline Δ at rank 6 (VMamba-T's stage 1): the route's 8 x_proj values of a step as one
    # 16-byte load split in registers (8 loads before). Offline SASS (sm_90a): the stage-1
    # walks 1464 -> 1376 (aggregates) and 1608 -> 1504 (output) instructions; timed at stop
    # 26 on an H200 (scan_vectors_h200.json, backbone_speed_{xprojoff,default}_h200.json):
    # stage 1 112.1 -> 108.5 us at 1280x720, VMamba-T 1.901 -> 1.876 ms, 2.107 -> 2.069 at
    # 1024^2. (Three 32-channel vectors per program for widths 96 / 192, at stop 25, removed
    # at stop 26: stage 2 72 -> 105 us, the x / y accesses lose their vector width.)
    "seq_xproj_vector": True,
    "seq_num_warps": 1,
    # (A register cap of 64 on the output walks, which take 72 at rank 6 so 28 one-warp
    # programs fit an SM instead of 32, was timed at stop 27 and removed: VMamba-T 5.808 ->
    # 5.845 ms at batch 4, 1.819 -> 1.824 at batch 1, 1280x720, H200,
    # bench/results/backbone_speed_maxnreg_{off,64}_h200.json.)
    "seq_inline_rank": 8,
    # Largest Δ map (one image's (H, W, 4 * dim) in x_proj's dtype) that the Δ GEMM may build;
    # above it Δ is projected in the walk whatever the rank. 0 = no limit. At 2048^2 stage 2's
    # map (96 MiB) is the largest buffer alive at VMamba-T's peak (stop 28 replay,
    # bench/results/memory_peak_vmamba_tiny_2048_h200.json); rank 12 inline was timed at stop 20
    # (H100): peak 469 -> 401 MiB for +134 us at 2048^2 (backbone_speed_inline12_h100.json).
    # Off: timed at stop 29 (H200, bash bench/device_plan.sh inline), 64 MiB cost +150 us at
    # 2048^2 for -20 MiB, the peak moving to stage 2's MLP hidden map (96 MiB as well;
    # backbone_speed_deltamap{0,67108864}_h200.json, memory_peak_..._deltamap64_h200.json).
    "seq_delta_map_max_bytes": 0,
    # Where the op projects x_proj itself (``x_proj_weight``) and Δ goes through the GEMM, its
    # columns are zero-padded to a multiple of this, the Δ GEMM's K with them (0 = none). At
    # K = 104 (VMamba-T's stage 3) cuBLAS gives bf16 a kernel with a Memset before it, K = 128
    # one without: 9.4 -> 6.7 us a call at batch 1, 1280x720, H200, fp16 7.3 -> 6.7; stage 2
    # (K 56 -> 64) 11.6 -> 10.4, batch 4 2-3 us a call less at stages 2-4; x_proj's own GEMM
    # +0.1 us (bench/gemm_choices.py, gemm_choices_h200.json).
    "seq_delta_k_multiple": 64,
    # softplus with lg2.approx on CUDA instead of the precise logf polynomial: 34-42 % fewer
    # SASS instructions in the seq kernels (sm_90a, compiled offline); not timed yet.
    "seq_fast_log": True,
    "state_block_s": 512,
    "state_block_m": 4,
    "state_num_warps": 4,
    # The state pass: "serial" = state_kernel, one program per state_block_m channels of a
    # route walking all its segments state_block_s at a time (latency-bound: ~14 us a launch,
    # 200 us per VMamba-T forward at 1280x720 on an H100, for < 1 MB of aggregates);
    # "chunked" = two fully parallel kernels: each chunk of chunk_segments segments scanned on
    # its own, then the state entering each chunk (a scan over the chunk totals before it)
    # carried into it. Measured on H100s: chunks of 64 segments, 16 channels per 1-warp
    # program (bench/scan.py --tune-state, partial sweep) made VMamba-T 2.17 vs 2.23 ms serial
    # at 1280x720 on the same card (backbone_speed_state_chunked16_h100.json vs
    # backbone_speed_sweep_stem_h100.json); 8.39 ms at 2048x2048 vs 8.38 serial on another card
    # (no gain shown there). 4 channels with 2 warps was slower than serial (2.45 vs 2.23 ms).
    "state_impl": "chunked",
    "chunk_segments": 64,
    "chunk_block_m": 16,
    "chunk_num_warps": 1,
}


@triton.jit
def state_kernel(agg_a_ptr, agg_h_ptr, A_ptr, N_SEG, M, DIM, sA_k, sA_c, sA_n,
                 ROUTES: tl.constexpr, DT_SUM: tl.constexpr, BLOCK_S: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """Scan route k's segment aggregates (batch, ROUTES, N_SEG, M) in route order, in place.

    Routes k >= ROUTES // 2 are reversed: they visit the segments last to first. The state
    after each segment replaces its local state h. ``agg_a`` holds each segment's decay
    (prod a), or with DT_SUM its Δ sums (batch, ROUTES, N_SEG, DIM) for states m = n * DIM + c
    of A (ROUTES, DIM, N): prod_t exp(Δ_t A) = exp(A Σ_t Δ_t), N times fewer bytes.
    """
    pid_m = tl.program_id(0)
    k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    is_rev = k >= ROUTES // 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    base = (b * ROUTES + k) * N_SEG * M
    if DT_SUM:
        chan = offs_m % DIM
        a2 = tl.load(A_ptr + k * sA_k + chan * sA_c + (offs_m // DIM) * sA_n, mask=m_ok,
                     other=0.0).to(tl.float32) * 1.4426950408889634
    carry = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t0 in range(0, N_SEG, BLOCK_S):
        t = t0 + tl.arange(0, BLOCK_S)
        s = tl.where(is_rev, N_SEG - 1 - t, t)  # step t of the route visits segment s
        ok = (t < N_SEG)[:, None] & m_ok[None, :]
        ptr = base + s[:, None] * M + offs_m[None, :]
        if DT_SUM:
            dts = tl.load(agg_a_ptr + (b * ROUTES + k) * N_SEG * DIM + s[:, None] * DIM
                          + chan[None, :], mask=ok, other=0.0)
            a = tl.exp2(dts * a2[None, :])
        else:
            a = tl.load(agg_a_ptr + ptr, mask=ok, other=1.0)
        h = tl.load(agg_h_ptr + ptr, mask=ok, other=0.0)
        a_s, h_s = tl.associative_scan((a, h), 0, _ssm_combine)
        h_s = h_s + a_s * carry[None, :]
        tl.store(agg_h_ptr + ptr, h_s, mask=ok)  # state after segment s
        carry = tl.sum(tl.where((tl.arange(0, BLOCK_S) == BLOCK_S - 1)[:, None], h_s, 0.0), 0)


@triton.jit
def _chunk_scan_kernel(agg_a_ptr, agg_h_ptr, tot_a_ptr, tot_h_ptr, N_SEG, M, N_CHUNK,
                       ROUTES: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Chunked state pass, first kernel: scan chunk program_id(1) of G segments in place.

    Segment aggregates (batch, ROUTES, N_SEG, M) in route order (routes k >= ROUTES // 2
    visit the segments last to first): each (a, h) becomes the prefix over its chunk up to
    and including it, and the chunk's total goes to tot (batch, ROUTES, N_CHUNK, M).
    """
    pid_m = tl.program_id(0)
    chunk = tl.program_id(1)
    route = tl.program_id(2)  # b * ROUTES + k
    is_rev = route % ROUTES >= ROUTES // 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    t = chunk * G + tl.arange(0, G)  # step t of the route visits segment s
    s = tl.where(is_rev, N_SEG - 1 - t, t)
    ok = (t < N_SEG)[:, None] & m_ok[None, :]
    ptr = route.to(tl.int64) * N_SEG * M + s[:, None] * M + offs_m[None, :]
    a = tl.load(agg_a_ptr + ptr, mask=ok, other=1.0)  # padding = identity pair (1, 0)
    h = tl.load(agg_h_ptr + ptr, mask=ok, other=0.0)
    a_s, h_s = tl.associative_scan((a, h), 0, _ssm_combine)
    tl.store(agg_a_ptr + ptr, a_s, mask=ok)
    tl.store(agg_h_ptr + ptr, h_s, mask=ok)
    last = (tl.arange(0, G) == G - 1)[:, None]
    tot = (route.to(tl.int64) * N_CHUNK + chunk) * M + offs_m
    tl.store(tot_a_ptr + tot, tl.sum(tl.where(last, a_s, 0.0), 0), mask=m_ok)
    tl.store(tot_h_ptr + tot, tl.sum(tl.where(last, h_s, 0.0), 0), mask=m_ok)


@triton.jit
def _chunk_carry_kernel(agg_a_ptr, agg_h_ptr, tot_a_ptr, tot_h_ptr, N_SEG, M, N_CHUNK,
                        ROUTES: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """Chunked state pass, second kernel: carry the state entering chunk program_id(1).

    That state is the scan of the totals of the chunks before it (<= BLOCK_C rows); added to
    the chunk's in-chunk prefixes it leaves agg_h holding the state after each segment, as
    ``state_kernel`` does.
    """
    pid_m = tl.program_id(0)
    chunk = tl.program_id(1)
    route = tl.program_id(2)
    is_rev = route % ROUTES >= ROUTES // 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    j = tl.arange(0, BLOCK_C)
    before = (j < chunk)[:, None] & m_ok[None, :]
    tot = (route.to(tl.int64) * N_CHUNK + j[:, None]) * M + offs_m[None, :]
    ta = tl.load(tot_a_ptr + tot, mask=before, other=1.0)
    th = tl.load(tot_h_ptr + tot, mask=before, other=0.0)
    _, carry_s = tl.associative_scan((ta, th), 0, _ssm_combine)
    carry = tl.sum(tl.where((j == BLOCK_C - 1)[:, None], carry_s, 0.0), 0)  # 0 for chunk 0
    t = chunk * G + tl.arange(0, G)
    s = tl.where(is_rev, N_SEG - 1 - t, t)
    ok = (t < N_SEG)[:, None] & m_ok[None, :] & (chunk > 0)
    ptr = route.to(tl.int64) * N_SEG * M + s[:, None] * M + offs_m[None, :]
    a_s = tl.load(agg_a_ptr + ptr, mask=ok, other=1.0)
    h_s = tl.load(agg_h_ptr + ptr, mask=ok, other=0.0)
    tl.store(agg_h_ptr + ptr, h_s + a_s * carry[None, :], mask=ok)


def _state_pass(agg_a, agg_h, batch, n_seg, dim):
    """State after each segment of each route, in place in agg_h (TUNING['state_impl'])."""
    if TUNING["state_impl"] == "serial":
        bm = min(_pow2("state_block_m", TUNING["state_block_m"]), triton.next_power_of_2(dim))
        state_kernel[(triton.cdiv(dim, bm), 4, batch)](
            agg_a, agg_h, agg_a, n_seg, dim, dim, 0, 0, 0, ROUTES=4, DT_SUM=False,
            BLOCK_S=_pow2("state_block_s", TUNING["state_block_s"]), BLOCK_M=bm,
            num_warps=_pow2("state_num_warps", TUNING["state_num_warps"]))
        return
    if TUNING["state_impl"] != "chunked":
        raise ValueError(f"ss2d_lowrank TUNING['state_impl'] must be 'serial' or 'chunked'; "
                         f"got {TUNING['state_impl']!r}")
    chunk = min(_pow2("chunk_segments", TUNING["chunk_segments"]),
                triton.next_power_of_2(n_seg))
    n_chunk = triton.cdiv(n_seg, chunk)
    bm = min(_pow2("chunk_block_m", TUNING["chunk_block_m"]), triton.next_power_of_2(dim))
    tot_a = torch.empty(batch, 4, n_chunk, dim, device=agg_a.device, dtype=torch.float32)
    tot_h = torch.empty_like(tot_a)
    grid = (triton.cdiv(dim, bm), n_chunk, 4 * batch)
    warps = _pow2("chunk_num_warps", TUNING["chunk_num_warps"])
    _chunk_scan_kernel[grid](agg_a, agg_h, tot_a, tot_h, n_seg, dim, n_chunk, ROUTES=4,
                             G=chunk, BLOCK_M=bm, num_warps=warps)
    _chunk_carry_kernel[grid](agg_a, agg_h, tot_a, tot_h, n_seg, dim, n_chunk, ROUTES=4,
                              G=chunk, BLOCK_M=bm,
                              BLOCK_C=max(2, triton.next_power_of_2(n_chunk)), num_warps=warps)


# ------------------------------------------------------------------------------ impl "seq"
#
# A segment is T consecutive steps of a route: segment s holds steps s*T .. s*T+T-1 of the
# row-major order (routes 0 / 2) or of the column-major order (routes 1 / 3), and a reversed
# route walks the same segment backwards. Rows and columns differ only in which coordinate
# moves fastest, so a walk tracks (fast, slow) coordinates and picks strides. The routes'
# outputs are summed in an fp32 NHWC buffer: the row kernel writes route 0 (+ D·u) and adds
# route 2, the column kernel adds routes 1 and 3 (and casts on its last store): no atomics and
# a fixed summation order.


@triton.jit
def softplus(dt, FAST_LOG: tl.constexpr):
    """log(1 + e^dt) (dt itself above 20, as mamba_ssm); FAST_LOG: lg2.approx (CUDA only)."""
    if FAST_LOG:  # MUFU.LG2 instead of the ~20-instruction precise logf
        sp = libdevice.fast_log2f(1.0 + tl.exp2(dt * 1.4426950408889634)) * 0.6931471805599453
    else:
        sp = tl.log(1.0 + tl.exp(dt))
    return tl.where(dt <= 20.0, sp, dt)


@triton.jit
def _seq_walk(h, x_ptr, p_ptr, d_ptr, y_ptr, w_row, bias, a2, dskip,
              start, L, F, sx_f, sx_s, sp_f, sp_s, sd_f, sd_s, sy_f, sy_s, chans, ch_ok,
              sx_c, sp_c, sw_r, sy_c, norm_w, norm_b, norm_eps, n_chan, R: tl.constexpr,
              T: tl.constexpr, UNROLL: tl.constexpr, REV: tl.constexpr, OUT: tl.constexpr,
              ADD_Y: tl.constexpr, ADD_D: tl.constexpr, DELTA: tl.constexpr,
              SOFTPLUS: tl.constexpr, FAST_LOG: tl.constexpr, XPROJ_VEC: tl.constexpr,
              NORM: tl.constexpr):
    """Walk steps start..start+T-1 of a route (backwards if REV) from state h.

    Step i of the route is the position with fast coordinate i % F and slow i // F; x_proj's
    pointer is already at the route's [dt (R), B, C] columns. Δ comes from ``d_ptr`` (DELTA:
    the route's channels of a (batch, H, W, 4 * dim) map) or from the R factors and
    ``w_row`` (R x [BLOCK_D] weights, ``sw_r`` apart); XPROJ_VEC (R = 6, inline Δ): the
    step's 8 x_proj values in one load. Returns (h, prod of a); with OUT it also stores C·h
    (+ D·u, + ADD_Y: the sum already at ``y_ptr``) to ``y_ptr`` per step; NORM (the block holds
    all ``n_chan`` channels, the step's sum is complete): its LayerNorm instead.
    """
    if REV:
        i = start + T - 1
    else:
        i = start
    f = i % F
    s = i // F
    a_prod = tl.full(h.shape, 1.0, tl.float32)
    # The dt weights are loop-invariant, but loads inside the loop are not hoisted out of it
    # (the output stores there might alias them): load the R weight vectors once, up front.
    w_r = ()
    if not DELTA:
        for r in tl.static_range(R):
            w_r = w_r + (tl.load(w_row + r * sw_r, mask=ch_ok, other=0.0).to(tl.float32),)
    for _t0 in range(0, T, UNROLL):
        for _j in tl.static_range(UNROLL):  # unrolled so the loads of later steps go early
            valid = i < L
            m = ch_ok & valid
            po = f * sp_f + s * sp_s
            u = tl.load(x_ptr + f * sx_f + s * sx_s + chans * sx_c, mask=m,
                        other=0.0).to(tl.float32)
            if XPROJ_VEC:
                # [dt (6), B, C] as one 16-byte load, split into scalars in registers
                dt_r, bv, cv = _split_dt6_b_c(tl.load(p_ptr + po + tl.arange(0, 8) * sp_c,
                                                      mask=valid, other=0.0).to(tl.float32))
            else:
                dt_r = ()
                if not DELTA:
                    for r in tl.static_range(R):
                        dt_r = dt_r + (tl.load(p_ptr + po + r * sp_c, mask=valid,
                                               other=0.0).to(tl.float32),)
                bv = tl.load(p_ptr + po + R * sp_c, mask=valid, other=0.0).to(tl.float32)
                if OUT:
                    cv = tl.load(p_ptr + po + (R + 1) * sp_c, mask=valid,
                                 other=0.0).to(tl.float32)
            if DELTA:
                dt = bias + tl.load(d_ptr + f * sd_f + s * sd_s + chans, mask=m,
                                    other=0.0).to(tl.float32)
            else:
                dt = bias
                for r in tl.static_range(R):
                    dt += dt_r[r] * w_r[r]
            if SOFTPLUS:
                dt = softplus(dt, FAST_LOG)
            a = tl.where(m, tl.exp2(dt * a2), 1.0)  # padding = identity pair (1, 0)
            h = a * h + (dt * bv) * u
            if OUT:
                y = cv * h
                if ADD_D:
                    y += dskip * u
                yo = f * sy_f + s * sy_s + chans * sy_c
                if ADD_Y:
                    y += tl.load(y_ptr + yo, mask=m, other=0.0)
                if NORM:
                    # out_norm of the finished fp32 sum, off the recurrence's chain
                    mean = tl.sum(tl.where(ch_ok, y, 0.0), axis=0) / n_chan
                    dev = tl.where(ch_ok, y - mean, 0.0)
                    var = tl.sum(dev * dev, axis=0) / n_chan
                    y = dev * tl.rsqrt(var + norm_eps) * norm_w + norm_b
                tl.store(y_ptr + yo, y.to(y_ptr.dtype.element_ty), mask=m)
            else:
                a_prod = a_prod * a
            if REV:
                i -= 1
                f -= 1
                wrap = f < 0
                f = tl.where(wrap, F - 1, f)
                s = tl.where(wrap, s - 1, s)
            else:
                i += 1
                f += 1
                wrap = f == F
                f = tl.where(wrap, 0, f)
                s = tl.where(wrap, s + 1, s)
    return h, a_prod


@triton.jit
def _split_dt6_b_c(v):
    """Split 8 values [dt (6), B, C] into ((dt_0 .. dt_5), B, C), each a scalar.

    Halving by ``tl.split`` (it takes the last axis of size 2) keeps every value in the
    thread that loaded it: no shuffles or shared memory (offline SASS).
    """
    even, odd = tl.split(tl.reshape(v, (4, 2)))  # [0 2 4 6], [1 3 5 7]
    e0, e1 = tl.split(tl.reshape(even, (2, 2)))  # [0 4], [2 6]
    o0, o1 = tl.split(tl.reshape(odd, (2, 2)))  # [1 5], [3 7]
    x0, x4 = tl.split(e0)
    x2, x6 = tl.split(e1)
    x1, x5 = tl.split(o0)
    x3, x7 = tl.split(o1)
    return (x0, x1, x2, x3, x4, x5), x6, x7


@triton.jit
def _seq_route_params(w_ptr, A_ptr, bias_ptr, k, chans, ch_ok, DIM, sw_k, sA_c, s_bias,
                      HAS_BIAS: tl.constexpr, A_LOG: tl.constexpr):
    """Route k's dt-weight pointers (rank 0), bias and A·log2(e), each over the channel block.

    The weights are the prepared (4, R, dim) copy: channels contiguous. A_LOG: ``A_ptr``
    holds log(-A) (VMamba's ``A_logs``), negated and exponentiated here.
    """
    w_row = w_ptr + k * sw_k + chans
    a = tl.load(A_ptr + (k * DIM + chans) * sA_c, mask=ch_ok, other=0.0).to(tl.float32)
    if A_LOG:
        a = -tl.exp(a)
    a2 = a * 1.4426950408889634
    if HAS_BIAS:
        bias = tl.load(bias_ptr + (k * DIM + chans) * s_bias, mask=ch_ok,
                       other=0.0).to(tl.float32)
    else:
        bias = tl.zeros(chans.shape, dtype=tl.float32)
    return w_row, a2, bias


@triton.jit
def _fast_slow(is_col, s_h, s_w):
    """(fast, slow) strides: rows move along w, columns along h."""
    return tl.where(is_col, s_h, s_w), tl.where(is_col, s_w, s_h)


@triton.jit
def _seq_agg_kernel(
    x_ptr, p_ptr, d_ptr, w_ptr, A_ptr, bias_ptr, agg_a_ptr, agg_h_ptr,
    H, W, DIM, L, N_SEG,
    sx_b, sx_h, sx_w, sx_c, sp_b, sp_h, sp_w, sp_c, sd_b, sd_h, sd_w, sw_k, sw_r, sA_c,
    s_bias, s_D,
    R: tl.constexpr, P: tl.constexpr, T: tl.constexpr, UNROLL: tl.constexpr,
    DELTA: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    FAST_LOG: tl.constexpr, BLOCK_D: tl.constexpr, A_LOG: tl.constexpr,
    XPROJ_VEC: tl.constexpr,
):
    """Aggregate (prod a, local state) of segment program_id(0) for one axis' two routes."""
    seg = tl.program_id(0)
    chans = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ch_ok = chans < DIM
    b = (tl.program_id(2) // 2).to(tl.int64)
    axis = tl.program_id(2) % 2
    is_col = axis == 1
    F = tl.where(is_col, H, W)
    sx_f, sx_s = _fast_slow(is_col, sx_h, sx_w)
    sp_f, sp_s = _fast_slow(is_col, sp_h, sp_w)
    sd_f, sd_s = _fast_slow(is_col, sd_h, sd_w)
    x_b = x_ptr + b * sx_b
    zero = tl.zeros([BLOCK_D], dtype=tl.float32)
    for rev in tl.static_range(2):
        k = axis + 2 * rev
        w_row, a2, bias = _seq_route_params(w_ptr, A_ptr, bias_ptr, k, chans, ch_ok, DIM,
                                            sw_k, sA_c, s_bias, HAS_BIAS, A_LOG)
        h, a_prod = _seq_walk(zero, x_b, p_ptr + b * sp_b + k * P * sp_c,
                              d_ptr + b * sd_b + k * DIM, x_b, w_row, bias, a2, zero,
                              seg * T, L, F, sx_f, sx_s, sp_f, sp_s, sd_f, sd_s, 0, 0,
                              chans, ch_ok, sx_c, sp_c, sw_r, 0, zero, zero, 0.0, 1, R, T,
                              UNROLL, rev == 1, False, False, False, DELTA, SOFTPLUS, FAST_LOG,
                              XPROJ_VEC, False)
        off = ((b * 4 + k) * N_SEG + seg) * DIM + chans
        tl.store(agg_a_ptr + off, a_prod, mask=ch_ok)
        tl.store(agg_h_ptr + off, h, mask=ch_ok)


@triton.jit
def _seq_out_kernel(
    x_ptr, p_ptr, d_ptr, w_ptr, A_ptr, D_ptr, bias_ptr, agg_h_ptr, out_ptr,
    H, W, DIM, L, N_SEG,
    sx_b, sx_h, sx_w, sx_c, sp_b, sp_h, sp_w, sp_c, sd_b, sd_h, sd_w, sw_k, sw_r, sA_c,
    s_bias, s_D,
    sy_b, sy_h, sy_w, sy_c, s_part, norm_w_ptr, norm_b_ptr, norm_eps,
    AXIS: tl.constexpr, R: tl.constexpr, P: tl.constexpr, T: tl.constexpr,
    UNROLL: tl.constexpr, DELTA: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, FAST_LOG: tl.constexpr, BLOCK_D: tl.constexpr,
    A_LOG: tl.constexpr, XPROJ_VEC: tl.constexpr, NORM: tl.constexpr,
):
    """Store the outputs of segment program_id(0), routes ``axis`` (forward) and ``axis + 2``.

    AXIS 0 starts the sum in ``out`` (route 0 + D·u, then route 2); AXIS 1 adds routes 1 and 3
    to it, in a second launch. AXIS 2: both axes in one launch (program_id(2) = 2 * batch +
    axis), each summing its two routes into its own part of ``out`` (``s_part`` apart; the D·u
    term in part 0): no axis waits for the other, and the caller adds the two parts. Each
    step's sum is formed in fp32 and stored in ``out``'s dtype. NORM (AXIS 1, one channel
    block): the last walk stores the LayerNorm (``norm_w``, ``norm_b``, ``norm_eps``) of each
    finished sum instead of the sum.
    """
    seg = tl.program_id(0)
    chans = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ch_ok = chans < DIM
    if AXIS == 2:
        b = (tl.program_id(2) // 2).to(tl.int64)
        axis = tl.program_id(2) % 2
        y_b = out_ptr + axis.to(tl.int64) * s_part + b * sy_b
    else:
        b = tl.program_id(2).to(tl.int64)
        axis = AXIS
        y_b = out_ptr + b * sy_b
    is_col = axis == 1
    F = tl.where(is_col, H, W)
    sx_f, sx_s = _fast_slow(is_col, sx_h, sx_w)
    sp_f, sp_s = _fast_slow(is_col, sp_h, sp_w)
    sd_f, sd_s = _fast_slow(is_col, sd_h, sd_w)
    sy_f, sy_s = _fast_slow(is_col, sy_h, sy_w)
    x_b = x_ptr + b * sx_b
    dskip = tl.zeros([BLOCK_D], dtype=tl.float32)
    norm_w = dskip
    norm_b = dskip
    if NORM:
        norm_w = tl.load(norm_w_ptr + chans, mask=ch_ok, other=0.0).to(tl.float32)
        norm_b = tl.load(norm_b_ptr + chans, mask=ch_ok, other=0.0).to(tl.float32)
    if HAS_D:
        if AXIS != 1:
            for j in tl.static_range(4):
                dskip += tl.load(D_ptr + (j * DIM + chans) * s_D, mask=ch_ok & (axis == 0),
                                 other=0.0).to(tl.float32)
    for rev in tl.static_range(2):
        k = axis + 2 * rev
        w_row, a2, bias = _seq_route_params(w_ptr, A_ptr, bias_ptr, k, chans, ch_ok, DIM,
                                            sw_k, sA_c, s_bias, HAS_BIAS, A_LOG)
        # A route enters a segment with the state after its predecessor in route order:
        # segment seg - 1 going forward, seg + 1 going backward.
        if rev == 0:
            prev = seg - 1
        else:
            prev = seg + 1
            # The reverse walk reads back what the forward walk stored (other threads too).
            tl.debug_barrier()
        h_in = tl.load(agg_h_ptr + ((b * 4 + k) * N_SEG + prev) * DIM + chans,
                       mask=ch_ok & (prev >= 0) & (prev < N_SEG), other=0.0)
        _seq_walk(h_in, x_b, p_ptr + b * sp_b + k * P * sp_c, d_ptr + b * sd_b + k * DIM,
                  y_b, w_row, bias, a2, dskip, seg * T, L, F, sx_f, sx_s, sp_f, sp_s,
                  sd_f, sd_s, sy_f, sy_s, chans, ch_ok, sx_c, sp_c, sw_r, sy_c, norm_w,
                  norm_b, norm_eps, DIM, R, T, UNROLL, rev == 1, True, AXIS == 1 or rev == 1,
                  HAS_D and AXIS != 1 and rev == 0, DELTA, SOFTPLUS, FAST_LOG, XPROJ_VEC,
                  NORM and AXIS == 1 and rev == 1)


def seq_steps(length, n_programs_per_segment, tuning=TUNING, table="ss2d_lowrank"):
    """Return (steps per segment, unroll): tuning["seq_steps"], halved while too few programs.

    Both are powers of two, so whole unrolled groups tile a segment exactly (a walk that ran
    past its segment would write its neighbour's outputs).
    """
    steps = pow2_option(table, "seq_steps", tuning["seq_steps"])
    unroll = pow2_option(table, "seq_unroll", tuning["seq_unroll"])
    while (steps > unroll
           and triton.cdiv(length, steps) * n_programs_per_segment < tuning["seq_min_programs"]):
        steps //= 2
    return steps, min(unroll, steps)


def _pow2(name, value):
    return pow2_option("ss2d_lowrank", name, value)


def _prepared_weight(dt_weight, dtype, width, block_diagonal, columns=0):
    """dt_weight (4, dim, R) in the layout the seq kernels read, cached per weight tensor.

    ``block_diagonal``: the (4 * dim, 4 * width) weight of one GEMM giving every route's Δ
    from x_proj as it is (zero columns for B and C; the 4x extra multiply-adds are free at
    these widths), zero-padded to ``columns`` columns where x_proj has that many; else
    (4, R, dim) contiguous, so a warp's loads in the walk are contiguous.
    Rebuilding these took ~5 small kernels per call (136 us per VMamba-T forward at 1280x720
    on an H100): ``common.prepared`` caches them (rebuilt after an in-place update).
    """
    def build():
        if block_diagonal:
            rank = dt_weight.shape[2]
            padded = torch.nn.functional.pad(dt_weight.detach().to(dtype), (0, width - rank))
            weight = torch.block_diag(*padded)
            return torch.nn.functional.pad(weight, (0, max(columns - weight.shape[1], 0)))
        return dt_weight.detach().transpose(1, 2).contiguous()

    return prepared(dt_weight, ('ss2d_dt', dtype, width, block_diagonal, columns), build)


def _projected(x, x_proj_weight, columns):
    """x_proj = x @ x_proj_weight.reshape(-1, dim).T (the op's own projection), ``columns`` wide.

    Columns past the 4 * (R + 2N) that the walks read are zeros (zero weight rows; the padded
    weight is cached per weight tensor, so pass the parameter itself, not a view of it).
    """
    flat = x_proj_weight.flatten(0, 1)
    rows = flat.shape[0]

    def build():
        return torch.nn.functional.pad(flat.detach().to(x.dtype),
                                       (0, 0, 0, columns - rows)).contiguous()

    weight = (flat.to(x.dtype) if columns == rows else
              prepared(x_proj_weight, ('ss2d_xproj', x.dtype, columns), build))
    return torch.nn.functional.linear(x, weight)


def _delta_by_gemm(rank, length, dim, element_size, tuning=TUNING):
    """Whether the seq walks read Δ from a GEMM-built map rather than projecting it inline.

    Small ranks are projected in the walk (R loads + FMAs a step, weights read as (4, R, dim)
    so a warp's loads are contiguous); larger ones go through one GEMM (one load a step),
    unless one image's map would exceed ``seq_delta_map_max_bytes``.
    """
    if rank <= tuning["seq_inline_rank"]:
        return False
    limit = tuning["seq_delta_map_max_bytes"]
    return not limit or length * 4 * dim * element_size <= limit


def _seq_fwd(x, x_proj, dt_weight, A, D, dt_bias, delta_softplus, out_dtype, a_is_log, parts,
             norm=None, x_proj_weight=None):
    """Run implementation "seq" (see the module docstring); N must be 1.

    ``x_proj`` None: projected here from ``x_proj_weight``, padded for the Δ GEMM.
    """
    batch, height, width, dim = x.shape
    rank = dt_weight.shape[2]
    length = height * width
    use_delta = _delta_by_gemm(rank, length, dim, x.element_size() if x_proj is None
                               else x_proj.element_size())
    if x_proj is None:
        columns = x_proj_weight.shape[0] * x_proj_weight.shape[1]
        multiple = TUNING["seq_delta_k_multiple"]
        if use_delta and multiple:
            columns = triton.cdiv(columns, multiple) * multiple
        x_proj = _projected(x, x_proj_weight, columns)
    bd = min(_pow2("seq_block_d", TUNING["seq_block_d"]), triton.next_power_of_2(dim))
    n_cblk = triton.cdiv(dim, bd)
    if norm is not None and n_cblk > 1:  # no program sees a whole pixel: norm afterwards
        y = _seq_fwd(x, x_proj, dt_weight, A, D, dt_bias, delta_softplus, torch.float32,
                     a_is_log, parts)  # x_proj projected above
        return layer_norm_out(y, norm, out_dtype)
    out = torch.empty(*(2,) * (parts == 2), batch, height, width, dim, device=x.device,
                      dtype=out_dtype)
    if length == 0 or batch == 0:
        return out
    # The partial route sums pass through ``out`` itself, in its dtype (a 16-bit output is
    # rounded once per stored partial, not once at the end: half the bytes of an fp32
    # scratch buffer and no extra map alive).
    steps, unroll = seq_steps(length, 2 * n_cblk * batch)
    n_seg = triton.cdiv(length, steps)
    agg_a = torch.empty(batch, 4, n_seg, dim, device=x.device, dtype=torch.float32)
    agg_h = torch.empty_like(agg_a)
    if use_delta:
        delta = torch.nn.functional.linear(
            x_proj, _prepared_weight(dt_weight, x_proj.dtype, rank + 2, True, x_proj.shape[-1]))
        weight = dt_weight  # unused
    else:
        delta = x  # unused
        weight = _prepared_weight(dt_weight, dt_weight.dtype, 0, False)
    bias = dt_bias if dt_bias is not None else x
    common = (height, width, dim, length, n_seg, *x.stride(), *x_proj.stride(),
              delta.stride(0), delta.stride(1), delta.stride(2), weight.stride(0),
              weight.stride(1), A.stride(0),
              dt_bias.stride(0) if dt_bias is not None else 0, D.stride(0) if D is not None else 0)
    # The fast log (lg2.approx) exists only compiled; the interpreter (CPU tensors, CI) runs
    # the precise one, and the GPU run of test_scan_triton.py checks the fast one.
    meta = dict(R=rank, P=rank + 2, T=steps, UNROLL=unroll, DELTA=use_delta,
                HAS_BIAS=dt_bias is not None, SOFTPLUS=delta_softplus,
                FAST_LOG=x.is_cuda and TUNING["seq_fast_log"], BLOCK_D=bd, A_LOG=a_is_log,
                XPROJ_VEC=TUNING["seq_xproj_vector"] and rank == 6 and not use_delta,
                num_warps=_pow2("seq_num_warps", TUNING["seq_num_warps"]))
    _seq_agg_kernel[(n_seg, n_cblk, 2 * batch)](
        x, x_proj, delta, weight, A, bias, agg_a, agg_h, *common, **meta)
    _state_pass(agg_a, agg_h, batch, n_seg, dim)
    dense = (x, x_proj, delta, weight, A, D if D is not None else x, bias, agg_h, out)
    norm_args = (x, x, 0.0) if norm is None else norm
    if parts == 2:
        _seq_out_kernel[(n_seg, n_cblk, 2 * batch)](
            *dense, *common, *out.stride()[1:], out.stride(0), *norm_args, AXIS=2,
            HAS_D=D is not None, NORM=False, **meta)
        return out
    for axis in (0, 1):
        _seq_out_kernel[(n_seg, n_cblk, batch)](
            *dense, *common, *out.stride(), 0, *norm_args, AXIS=axis, HAS_D=D is not None,
            NORM=norm is not None, **meta)
    return out


def _expanded_fwd(x, x_proj, dt_weight, A, D, dt_bias, delta_softplus, out_dtype):
    """Δ expanded by one batched GEMM (einsum), then ss2d_fwd on a channel-first copy of x."""
    from ..reference import expand_lowrank
    from .ss2d import ss2d_fwd

    xc, delta, B, C = expand_lowrank(x, x_proj, dt_weight.to(x_proj.dtype), A.shape[1])
    y = ss2d_fwd(xc.contiguous(), delta, A, B.contiguous(), C.contiguous(), D, dt_bias,
                 delta_softplus, out_dtype)
    return y.permute(0, 2, 3, 1).contiguous()


def ss2d_lowrank_fwd(x, x_proj, dt_weight, A, D, dt_bias, delta_softplus, out_dtype,
                     a_is_log=False, parts=1, norm=None, x_proj_weight=None):
    """Return y (batch, H, W, dim) contiguous in ``out_dtype``; see ``ss2d_scan_lowrank``.

    parts=2: (2, batch, H, W, dim) summing to y; "seq" puts the row routes (and D·u) in part
    0 and the column routes in part 1, written by one launch. ``norm`` = (weight, bias, eps),
    parts=1 only: LayerNorm(y) instead, which "seq" applies in its last output walk where one
    program holds all channels. ``x_proj`` None: projected here from ``x_proj_weight``.
    """
    if TUNING["impl"] == "seq" and A.shape[1] == 1:
        return _seq_fwd(x, x_proj, dt_weight, A, D, dt_bias, delta_softplus, out_dtype,
                        a_is_log, parts, norm, x_proj_weight)
    if x_proj is None:
        x_proj = torch.nn.functional.linear(x, x_proj_weight.flatten(0, 1).to(x.dtype))
    if TUNING["impl"] not in ("seq", "expanded"):
        raise ValueError(f"ss2d_lowrank TUNING['impl'] must be 'seq' or 'expanded'; "
                         f"got {TUNING['impl']!r}")
    if a_is_log:
        A = -torch.exp(A)
    if norm is not None:
        return layer_norm_out(_expanded_fwd(x, x_proj, dt_weight, A, D, dt_bias,
                                            delta_softplus, torch.float32), norm, out_dtype)
    return as_parts(_expanded_fwd(x, x_proj, dt_weight, A, D, dt_bias, delta_softplus,
                                  out_dtype), parts)
