"""Fused bidirectional scan (Vim): both directions, their own parameters, one launch per pass.

Direction 1 is a reversed route over the same natural-order tensors: ``tl.associative_scan``
runs with ``reverse=True`` and the segments are chained backwards, so no ``flip`` copy is made.
Both directions' outputs are summed in registers and gated by the shared silu(z) before one store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import bidir_out
from . import common
from .common import pow2_option
from .ss2d_lowrank import seq_steps, softplus, state_kernel


def _bidir_operands(u, delta, A, B, C, D, delta_bias, bc):
    """Tensors and strides the forward and backward launches share."""
    def seq(t):  # (batch, 2, dim, L)
        return (t.stride(0), t.stride(1), t.stride(2), bc * t.stride(3), t.stride(3))

    def per_direction(t):  # (batch, 2, N, L): one group per direction
        return (t.stride(0), t.stride(1), 0, t.stride(2), bc * t.stride(3), t.stride(3))

    return dict(
        u=u, su=seq(u), delta=delta, sd=seq(delta),
        A=A, sA=(A.stride(0), A.stride(1), A.stride(2)),
        B=B, sB=per_direction(B), C=C, sC=per_direction(C),
        D=D, sD=tuple(D.stride()) if D is not None else (0, 0),
        bias=delta_bias, sbias=tuple(delta_bias.stride()) if delta_bias is not None else (0, 0))


def bidir_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_dtype=None):
    """Return (y_0 + y_1) * silu(z), (batch, dim, L) in u.dtype, laid out as ``bidir_out``."""
    batch, _, dim, length = u.shape
    dstate = A.shape[2]
    out = bidir_out(u, out_dtype or u.dtype)
    if length == 0 or batch == 0:
        return out
    if TUNING["impl"] not in ("seq", "tiles"):
        raise ValueError(f"bidir TUNING['impl'] must be 'seq' or 'tiles'; got {TUNING['impl']!r}")
    if (TUNING["impl"] == "seq" and u.stride(2) == 1 and delta.stride(2) == 1
            and dstate == triton.next_power_of_2(dstate)):
        _seq_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out)
        return out
    geo = common.sequence_geometry(length, dstate)
    bc = geo.block_c
    common.run(
        common.MODE_BIDIR, 2, geo, dim, dstate, dim,
        **_bidir_operands(u, delta, A, B, C, D, delta_bias, bc),
        z=z, sz=((z.stride(0), z.stride(1), bc * z.stride(2), z.stride(2)) if z is not None
                 else (0, 0, 0, 0)),
        out=out, so=(out.stride(0), out.stride(1), bc * out.stride(2), out.stride(2)),
        softplus=delta_softplus)
    return out


def bidir_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Return (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in the inputs' dtypes."""
    from .launch import ungate

    batch, _, dim, length = u.shape
    dstate = A.shape[2]
    dy, dz = ungate(dout, z, lambda: bidir_fwd(
        u, delta, A, B, C, D, None, delta_bias, delta_softplus, out_dtype=torch.float32))
    geo = common.sequence_geometry(length, dstate)
    bc = geo.block_c
    du, dd, dA, dB, dC, dD, dbias = common.run_bwd(
        common.MODE_BIDIR, 2, geo, dim, dstate, dim,
        **_bidir_operands(u, delta, A, B, C, D, delta_bias, bc),
        dy=dy, sy=(dy.stride(0), dy.stride(1), bc * dy.stride(2), dy.stride(2)),
        softplus=delta_softplus)
    return (du.to(u.dtype), dd.to(delta.dtype), dA.view(A.shape).to(A.dtype),
            dB.view(B.shape).to(B.dtype), dC.view(C.shape).to(C.dtype),
            None if D is None else dD.view(D.shape).to(D.dtype),
            None if dz is None else dz.to(z.dtype),
            None if delta_bias is None else dbias.view(delta_bias.shape).to(delta_bias.dtype))


# --------------------------------------------------------------------------- impl "seq"
#
# Vim's maps are (batch, L, dim) with channels innermost; given as channel-first views of
# them (dim stride 1), both directions run as step-by-step walks over vectors of contiguous
# channels, as ss2d_lowrank's "seq" does for VMamba, here with N states per channel. The state
# is an (N, BLOCK_D) tile: states along the slow axis, so each thread keeps every state of its
# channels and C·h sums within the thread. Three passes over segments of T steps:
#   1. aggregates: per segment and direction the local state (from zero) and Σ Δ per channel
#      (the segment's decay is exp(A Σ Δ): N times fewer bytes than storing prod a);
#   2. the state entering each segment (ss2d_lowrank.state_kernel with DT_SUM);
#   3. outputs: the forward walk stores y_0 = C·h + D·u into ``out``, the backward walk over
#      the same segment and channels adds its own and the gate, (y_0 + y_1) * silu(z).
# y_0 passes through ``out`` in its dtype (fp16 / bf16 rounding of one term, not of a sum).

# ``impl`` "seq" runs when u and delta have channels innermost; "tiles" (or other strides)
# the generic tile kernels of scan_fwd.py. Swept on an H100 (bench/scan.py --tune-bidir,
# bench/results/scan_bidir_h100.json) over Vim-T / Vim-S at 1280x720 and Vim-S at 2048^2:
# 64 channels per 2-warp program (one channel per thread), 64-step segments unrolled by 4.
# Vim-S 1280x720: 137 us vs 1131 us for the tile kernels on channel-first copies.
TUNING = {
    "impl": "seq",
    "seq_steps": 64,
    "seq_unroll": 4,
    "seq_min_programs": 2048,
    "seq_block_d": 64,
    "seq_num_warps": 2,
    "seq_fast_log": True,
    "state_block_s": 64,
    "state_block_m": 64,
}


@triton.jit
def _bidir_walk(h, u_ptr, d_ptr, b_ptr, c_ptr, z_ptr, out_ptr, a2, bias, dskip, start, L,
                su_l, sd_l, sb_l, sc_l, sz_l, so_l, u_off, d_off, b_off, c_off, z_off, o_off,
                ch_ok, rev, T: tl.constexpr, UNROLL: tl.constexpr, PASS: tl.constexpr,
                HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, FAST_LOG: tl.constexpr):
    """Walk steps start..start+T-1 (backwards if rev = 1) from state h (N, BLOCK_D).

    PASS 0 returns (h, Σ Δ); PASS 1 stores y_0 = C·h + D·u at ``out``; PASS 2 stores
    (y_0 + C·h + D·u) * silu(z) there. Steps past L are identities (Δ = 0).
    """
    i = start + rev * (T - 1)
    step = 1 - 2 * rev
    dt_sum = tl.zeros(bias.shape, dtype=tl.float32)
    for _t0 in range(0, T, UNROLL):
        for _j in tl.static_range(UNROLL):  # unrolled so the loads of later steps go early
            valid = i < L
            m = ch_ok & valid
            u = tl.load(u_ptr + i * su_l + u_off, mask=m, other=0.0).to(tl.float32)
            dt = bias + tl.load(d_ptr + i * sd_l + d_off, mask=m, other=0.0).to(tl.float32)
            if SOFTPLUS:
                dt = softplus(dt, FAST_LOG)
            dt = tl.where(m, dt, 0.0)
            bv = tl.load(b_ptr + i * sb_l + b_off, mask=valid, other=0.0).to(tl.float32)
            h = tl.exp2(dt[None, :] * a2) * h + bv[:, None] * (dt * u)[None, :]
            if PASS == 0:
                dt_sum += dt
            else:
                cv = tl.load(c_ptr + i * sc_l + c_off, mask=valid, other=0.0).to(tl.float32)
                y = tl.sum(h * cv[:, None], 0) + dskip * u
                o = out_ptr + i * so_l + o_off
                if PASS == 2:
                    y += tl.load(o, mask=m, other=0.0).to(tl.float32)
                    if HAS_Z:
                        zv = tl.load(z_ptr + i * sz_l + z_off, mask=m, other=0.0).to(tl.float32)
                        y = y * zv * tl.sigmoid(zv)
                tl.store(o, y.to(out_ptr.dtype.element_ty), mask=m)
            i += step
    return h, dt_sum


@triton.jit
def _load_rows(ptr, row_stride, ch_ok, states):
    """(N, BLOCK_D) fp32 tile of rows ``ptr + n * row_stride``, one [BLOCK_D] load per row.

    Row by row, so no 2-D load or store decides the state tile's layout: Triton would make a
    (N, BLOCK_D) access vectorised along the channels and spread the states across threads,
    and the per-step C·h sum would then cross threads (shuffles and shared memory in the loop).
    """
    tile = tl.zeros([states.shape[0], ch_ok.shape[0]], dtype=tl.float32)
    for n in tl.static_range(states.shape[0]):
        row = tl.load(ptr + n * row_stride, mask=ch_ok, other=0.0).to(tl.float32)
        tile = tl.where(states[:, None] == n, row[None, :], tile)
    return tile


@triton.jit
def _store_rows(ptr, row_stride, tile, ch_ok, states):
    """Store an (N, BLOCK_D) tile row by row (see ``_load_rows``)."""
    for n in tl.static_range(states.shape[0]):
        tl.store(ptr + n * row_stride, tl.sum(tl.where(states[:, None] == n, tile, 0.0), 0),
                 mask=ch_ok)


@triton.jit
def _bidir_seq_params(A_ptr, bias_ptr, D_ptr, k, chans, ch_ok, states, sA_k, sA_c, sA_n,
                      sbias_k, sbias_c, sD_k, sD_c, HAS_BIAS: tl.constexpr,
                      HAS_D: tl.constexpr):
    """Direction k's A·log2(e) (N, BLOCK_D), Δ bias and D over the channel block."""
    a2 = _load_rows(A_ptr + k * sA_k + chans * sA_c, sA_n, ch_ok, states) * 1.4426950408889634
    bias = tl.zeros(chans.shape, dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(bias_ptr + k * sbias_k + chans * sbias_c, mask=ch_ok,
                        other=0.0).to(tl.float32)
    dskip = tl.zeros(chans.shape, dtype=tl.float32)
    if HAS_D:
        dskip += tl.load(D_ptr + k * sD_k + chans * sD_c, mask=ch_ok, other=0.0).to(tl.float32)
    return a2, bias, dskip


@triton.jit
def _bidir_seq_kernel(
    u_ptr, d_ptr, b_ptr, c_ptr, z_ptr, A_ptr, D_ptr, bias_ptr, agg_h_ptr, dt_sum_ptr, out_ptr,
    DIM, L, N_SEG,
    su_b, su_k, su_c, su_l, sd_b, sd_k, sd_c, sd_l, sb_b, sb_k, sb_n, sb_l,
    sc_b, sc_k, sc_n, sc_l, sz_b, sz_c, sz_l, so_b, so_c, so_l, sA_k, sA_c, sA_n, sbias_k,
    sbias_c, sD_k, sD_c,
    N: tl.constexpr, T: tl.constexpr, UNROLL: tl.constexpr, OUT: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    FAST_LOG: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Segment program_id(0), channel block program_id(1).

    Without OUT (grid axis 2 = batch * 2 + direction): store the segment's local state and
    Σ Δ. With OUT (axis 2 = batch): both directions' outputs, forward then backward.
    """
    seg = tl.program_id(0)
    chans = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ch_ok = chans < DIM
    states = tl.arange(0, N)
    if OUT:
        b = tl.program_id(2).to(tl.int64)
    else:
        b = (tl.program_id(2) // 2).to(tl.int64)
    o_off = b * so_b + chans * so_c
    z_off = b * sz_b + chans * sz_c
    for k in tl.static_range(2):
        if OUT or k == 0:
            if OUT:
                kk = k
            else:
                kk = tl.program_id(2) % 2
            a2, bias, dskip = _bidir_seq_params(A_ptr, bias_ptr, D_ptr, kk, chans, ch_ok,
                                                states, sA_k, sA_c, sA_n, sbias_k, sbias_c,
                                                sD_k, sD_c,
                                                HAS_BIAS, HAS_D)
            u_off = b * su_b + kk * su_k + chans * su_c
            d_off = b * sd_b + kk * sd_k + chans * sd_c
            b_off = b * sb_b + kk * sb_k + states * sb_n
            c_off = b * sc_b + kk * sc_k + states * sc_n
            agg = agg_h_ptr + (b * 2 + kk) * N_SEG * N * DIM + chans  # + (seg * N + n) * DIM
            if OUT:
                # Each direction enters the segment with the state after its predecessor in
                # its own order: segment seg - 1 going forward, seg + 1 going backward.
                prev = seg - 1 + 2 * k
                if k == 1:
                    tl.debug_barrier()  # the backward walk reads what the forward one stored
                h = _load_rows(agg + prev * N * DIM, DIM,
                               ch_ok & (prev >= 0) & (prev < N_SEG), states)
                _bidir_walk(h, u_ptr, d_ptr, b_ptr, c_ptr, z_ptr, out_ptr, a2, bias, dskip,
                            seg * T, L, su_l, sd_l, sb_l, sc_l, sz_l, so_l, u_off, d_off,
                            b_off, c_off, z_off, o_off, ch_ok, k, T, UNROLL, 1 + k, HAS_Z,
                            SOFTPLUS, FAST_LOG)
            else:
                h = tl.zeros([N, BLOCK_D], dtype=tl.float32)
                h, dt_sum = _bidir_walk(h, u_ptr, d_ptr, b_ptr, c_ptr, z_ptr, out_ptr, a2, bias,
                                        dskip, seg * T, L, su_l, sd_l, sb_l, sc_l, sz_l, so_l,
                                        u_off, d_off, b_off, c_off, z_off, o_off, ch_ok, kk,
                                        T, UNROLL, 0, HAS_Z, SOFTPLUS, FAST_LOG)
                _store_rows(agg + seg * N * DIM, DIM, h, ch_ok, states)
                tl.store(dt_sum_ptr + ((b * 2 + kk) * N_SEG + seg) * DIM + chans, dt_sum,
                         mask=ch_ok)


def _seq_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out):
    """Run implementation "seq" (see above) into ``out``; u and delta have dim stride 1."""
    batch, _, dim, length = u.shape
    dstate = A.shape[2]
    bd = min(pow2_option("bidir", "seq_block_d", TUNING["seq_block_d"]),
             triton.next_power_of_2(dim))
    n_cblk = triton.cdiv(dim, bd)
    steps, unroll = seq_steps(length, 2 * n_cblk * batch, TUNING, "bidir")
    n_seg = triton.cdiv(length, steps)
    agg_h = torch.empty(batch, 2, n_seg, dstate, dim, device=u.device, dtype=torch.float32)
    dt_sum = torch.empty(batch, 2, n_seg, dim, device=u.device, dtype=torch.float32)
    args = (u, delta, B, C, z if z is not None else u, A, D if D is not None else A,
            delta_bias if delta_bias is not None else A, agg_h, dt_sum, out, dim, length, n_seg,
            *u.stride(), *delta.stride(), *B.stride(), *C.stride(),
            *(z.stride() if z is not None else (0, 0, 0)), *out.stride(), *A.stride(),
            *(delta_bias.stride() if delta_bias is not None else (0, 0)),
            *(D.stride() if D is not None else (0, 0)))
    # The fast log (lg2.approx) exists only compiled: the interpreter runs the precise one.
    # At most BLOCK_D / 32 warps: more would spread the states of a channel over warps.
    warps = min(pow2_option("bidir", "seq_num_warps", TUNING["seq_num_warps"]), max(bd // 32, 1))
    meta = dict(N=dstate, T=steps, UNROLL=unroll, HAS_D=D is not None, HAS_Z=z is not None,
                HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
                FAST_LOG=u.is_cuda and TUNING["seq_fast_log"], BLOCK_D=bd, num_warps=warps)
    _bidir_seq_kernel[(n_seg, n_cblk, 2 * batch)](*args, OUT=False, **meta)
    bm = min(pow2_option("bidir", "state_block_m", TUNING["state_block_m"]),
             triton.next_power_of_2(dstate * dim))
    state_kernel[(triton.cdiv(dstate * dim, bm), 2, batch)](
        dt_sum, agg_h, A, n_seg, dstate * dim, dim, *A.stride(), ROUTES=2, DT_SUM=True,
        BLOCK_S=pow2_option("bidir", "state_block_s", TUNING["state_block_s"]), BLOCK_M=bm,
        num_warps=4)
    _bidir_seq_kernel[(n_seg, n_cblk, batch)](*args, OUT=True, **meta)
