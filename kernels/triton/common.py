"""Helpers shared by the Triton launchers and kernels.

The generic 3-pass forward scan's launch (``scan_fwd.py``) for one op's geometry, launch-option
checks, the per-tensor cache of weights prepared in a kernel's layout, and the LayerNorm and
exact GELU of a register tile that the fused pre-norm and stem kernels share.
"""

from __future__ import annotations

from dataclasses import dataclass
import weakref

import torch
import triton
import triton.language as tl

from . import scan_fwd as kf

MODE_SELECTIVE, MODE_BIDIR, MODE_SS2D = 0, 1, 2


@triton.jit
def layer_norm_rows(h, col_ok, w_ptr, b_ptr, cols, n_cols, eps):
    """LayerNorm (fp32) of each row of the tile ``h`` over its first ``n_cols`` columns.

    Padded columns (``col_ok`` false) are excluded from the statistics and come out zero.
    """
    h = tl.where(col_ok[None, :], h, 0.0)
    mean = tl.sum(h, axis=1) / n_cols
    hc = tl.where(col_ok[None, :], h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, axis=1) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return hc * rstd[:, None] * w[None, :] + b[None, :]


@triton.jit
def gelu_erf(h, FAST: tl.constexpr):
    """GELU's exact (erf) form of an fp32 tile, erf by Abramowitz & Stegun 7.1.26.

    ``erf(a) = 1 - t (c1 + t (c2 + t (c3 + t (c4 + t c5)))) exp(-a^2)``, ``t = 1 / (1 + p a)``,
    ``a >= 0``, absolute error <= 1.5e-7 (on the GELU in fp32: <= 3.4e-7 absolute, below
    torch's own fp32 GELU's 1.2e-6; test_prenorm's test_triton_kernel_gelu_erf_is_exact_gelu).
    With ``q = x/2 (1 - erf(|x|/sqrt 2))``, GELU is ``x - q`` for x >= 0 and ``q`` below.
    ``FAST`` (CUDA): the reciprocal and exp2 as single MUFU instructions (``rcp.approx.ftz``,
    ``ex2.approx.ftz``: 1 ulp; their arguments are >= 1 and <= 0, where flushing denormals
    changes nothing that survives the fp16 rounding downstream) instead of the range-checked
    sequences Triton emits for ``/`` and ``tl.exp2``. Offline SASS (sm_90a) of the fused MLP's
    hidden loop, 32 values per thread per iteration: 1207 instructions with libdevice's erff
    (its polynomial constants re-materialised per value at ~250 registers), 907 with this
    formula, 683 with FAST (two MUFU ops per value); the stem's conv1 kernel 3608 -> 2696.
    """
    d = 1.0 + 0.23164189758 * tl.abs(h)  # 1 + p |x| / sqrt(2), p = 0.3275911
    arg = h * h * -0.7213475204444817  # log2(exp(-x^2 / 2))
    if FAST:
        t = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [d],
                                      dtype=tl.float32, is_pure=True, pack=1)
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [arg],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        t = 1.0 / d
        e = tl.exp2(arg)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                          + t * 1.061405429))))
    q = (0.5 * h) * poly * e
    return tl.where(h >= 0, h - q, q)


_PREPARED = {}  # (id(tensor), key) -> (weakref to the tensor, its _version, prepared tensor)


def prepared(tensor: torch.Tensor, key: tuple, build):
    """Return ``build()`` -- ``tensor`` in a layout a kernel reads -- cached per tensor and key.

    Weights are re-laid out for a kernel (transposed, padded, block-diagonal) with a few small
    kernels per call; the cache keeps the result for as long as the tensor lives. It is keyed by
    the tensor object, ``key`` (what ``build`` depends on besides the tensor) and the tensor's
    shape, strides, dtype and version counter, so an in-place update (an optimizer step,
    ``load_state_dict``) rebuilds it. Inference-mode tensors have no version counter and are
    never cached (parameters used under ``torch.inference_mode`` are ordinary tensors).
    """
    try:
        version = tensor._version
    except RuntimeError:
        return build()
    ident = (id(tensor), key, tuple(tensor.shape), tensor.stride(), tensor.dtype,
             tensor.device)
    hit = _PREPARED.get(ident)
    if hit is not None and hit[0]() is tensor and hit[1] == version:
        return hit[2]
    out = build()
    _PREPARED[ident] = (weakref.ref(tensor, lambda _: _PREPARED.pop(ident, None)), version, out)
    return out


def pow2_option(table: str, name: str, value: int) -> int:
    """Return a launch option that must be a power of two >= 1, or raise naming it."""
    if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{table} TUNING[{name!r}]={value!r} must be a power of two >= 1")
    return value


@dataclass
class Geometry:
    """Positions (r, c) with r < rows, c < cols, p = r*cols + c < length (see scan_fwd.py)."""

    rows: int
    cols: int
    length: int
    block_r: int
    block_c: int

    @property
    def n_tiles(self) -> int:
        """Number of (block_r, block_c) tiles."""
        return triton.cdiv(self.rows, self.block_r) * triton.cdiv(self.cols, self.block_c)

    @property
    def max_segments(self) -> int:
        """Segments of the route kind that has more of them (sizes the state buffers)."""
        row_segments = self.rows * triton.cdiv(self.cols, self.block_c)
        col_segments = self.cols * triton.cdiv(self.rows, self.block_r)
        return max(row_segments, col_segments)


# Launch configuration. image_block / num_warps come from a sweep of SS2D tiles on an H100
# (16x32 with 4 warps was fastest of 6 tile shapes at 56², 180x320 and 128², bf16);
# ``TUNING`` may be changed at run time (bench/scan.py --tune does).
TUNING = {
    "image_block": (16, 32),      # (rows, cols) of an SS2D tile
    "seq_block_c": 64,            # steps per row (segment) of a 1-D sequence
    "seq_tile": 1024,             # steps per 1-D tile at N <= 4 (half of it above)
    "num_warps": 4,
    # Unrolling the state loop (N=16) multiplied compile time (minutes per variant on the
    # H100 machine) for no measured gain; 1 = no unrolling.
    "unroll_n": 1,
}


def sequence_geometry(length: int, dstate: int) -> Geometry:
    """1-D sequences: rows of ``block_c`` consecutive steps, ``block_r`` rows per tile."""
    block_c = min(TUNING["seq_block_c"], triton.next_power_of_2(max(length, 16)))
    rows = triton.cdiv(max(length, 1), block_c)
    tile = TUNING["seq_tile"] if dstate <= 4 else max(block_c, TUNING["seq_tile"] // 2)
    block_r = max(1, min(triton.next_power_of_2(rows), tile // block_c))
    return Geometry(rows, block_c, length, block_r, block_c)


def image_geometry(height: int, width: int, dstate: int) -> Geometry:
    """2-D maps: (h, w) tiles; a row route's segment is a tile row, a column route's a column."""
    block_r, block_c = TUNING["image_block"]
    block_c = min(block_c, triton.next_power_of_2(width))
    block_r = min(block_r, triton.next_power_of_2(height))
    return Geometry(height, width, height * width, block_r, block_c)


def _launch_params(geo, dstate):
    return TUNING["num_warps"], max(1, min(dstate, TUNING["unroll_n"]))


def _forward_states(mode, K, geo, dim, dstate, dpg, u, su, delta, sd, A, sA, B, sB, bias,
                    sbias, softplus, batch, last_state=None):
    """Run passes 1-2; return the state after every segment, (batch, K, dim, n_seg, N) fp32."""
    dev = u.device
    n_seg = geo.max_segments
    agg_a = torch.empty(batch, K, dim, n_seg, dstate, device=dev, dtype=torch.float32)
    agg_h = torch.empty_like(agg_a)
    num_warps, unroll_n = _launch_params(geo, dstate)
    grid = (geo.n_tiles, dim, batch)
    kf._segment_agg_kernel[grid](
        u, delta, A, B, bias if bias is not None else u, agg_a, agg_h,
        dim, dstate, geo.rows, geo.cols, geo.length, dpg, n_seg, *su, *sd, *sA, *sB, *sbias,
        MODE=mode, K=K, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
        BLOCK_R=geo.block_r, BLOCK_C=geo.block_c, UNROLL_N=unroll_n, num_warps=num_warps)
    _state_pass(mode, K, geo, dim, dstate, batch, agg_a, agg_h, last_state=last_state)
    return agg_a, agg_h


def _state_pass(mode, K, geo, dim, dstate, batch, agg_a, agg_h, last_state=None, invert=False):
    block_n = triton.next_power_of_2(dstate)
    block_s = max(16, min(256, 2048 // block_n))
    kf._state_pass_kernel[(dim, K, batch)](
        agg_a, agg_h, last_state if last_state is not None else agg_a,
        dim, dstate, geo.rows, geo.cols, geo.max_segments,
        MODE=mode, K=K, STORE_LAST=last_state is not None,
        BLOCK_R=geo.block_r, BLOCK_C=geo.block_c, BLOCK_S=block_s, BLOCK_N=block_n,
        INVERT=invert, num_warps=4)


def run(mode, K, geo, dim, dstate, groups_dpg, *, u, su, delta, sd, A, sA, B, sB, C, sC,
        D, sD, z, sz, bias, sbias, out, so, softplus, last_state=None):
    """Launch forward passes 1-3. ``s*`` are the tensors' strides in the kernels' index order."""
    batch = out.shape[0]
    _, agg_h = _forward_states(mode, K, geo, dim, dstate, groups_dpg, u, su, delta, sd, A, sA,
                               B, sB, bias, sbias, softplus, batch, last_state)
    dummy = u
    num_warps, unroll_n = _launch_params(geo, dstate)
    kf._output_kernel[(geo.n_tiles, dim, batch)](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        bias if bias is not None else dummy, out, agg_h,
        dim, dstate, geo.rows, geo.cols, geo.length, groups_dpg, geo.max_segments,
        *su, *sd, *sA, *sB, *sC, *sD, *sbias, *sz, *so,
        MODE=mode, K=K, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=bias is not None, SOFTPLUS=softplus,
        BLOCK_R=geo.block_r, BLOCK_C=geo.block_c, UNROLL_N=unroll_n, num_warps=num_warps)
    return out


def run_bwd(mode, K, geo, dim, dstate, groups_dpg, *, u, su, delta, sd, A, sA, B, sB, C, sC,
            D, sD, bias, sbias, dy, sy, softplus):
    """Backward passes; returns fp32 (du, ddelta, dA, dB, dC, dD, dbias) in kernel layout.

    du is (batch, dim, L) for SS2D (shared x) and (batch, K, dim, L) otherwise; ddelta
    (batch, K, dim, L); dB / dC (batch, K, G, N, L); dA (K*dim, N); dD / dbias (K*dim,).
    """
    from . import scan_bwd as kb

    batch = dy.shape[0]
    dev = u.device
    f32 = torch.float32
    length = geo.length
    _, fwd_h = _forward_states(mode, K, geo, dim, dstate, groups_dpg, u, su, delta, sd, A, sA,
                               B, sB, bias, sbias, softplus, batch)
    n_seg = geo.max_segments
    bagg_a = torch.empty(batch, K, dim, n_seg, dstate, device=dev, dtype=f32)
    bagg_g = torch.empty_like(bagg_a)
    num_warps, unroll_n = _launch_params(geo, dstate)
    grid = (geo.n_tiles, dim, batch)
    kb._bwd_agg_kernel[grid](
        delta, A, C, bias if bias is not None else u, dy, bagg_a, bagg_g,
        dim, dstate, geo.rows, geo.cols, length, groups_dpg, n_seg,
        *sd, *sA, *sC, *sbias, *sy,
        MODE=mode, K=K, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
        BLOCK_R=geo.block_r, BLOCK_C=geo.block_c, UNROLL_N=unroll_n, num_warps=num_warps)
    _state_pass(mode, K, geo, dim, dstate, batch, bagg_a, bagg_g, invert=True)
    groups = dim // groups_dpg
    du = torch.empty((batch, dim, length) if mode == MODE_SS2D else (batch, K, dim, length),
                     device=dev, dtype=f32)
    ddelta = torch.empty(batch, K, dim, length, device=dev, dtype=f32)
    dB = torch.zeros(batch, K, groups, dstate, length, device=dev, dtype=f32)
    dC = torch.zeros_like(dB)
    dA = torch.zeros(K * dim, dstate, device=dev, dtype=f32)
    dD = torch.zeros(K * dim, device=dev, dtype=f32)
    dbias = torch.zeros(K * dim, device=dev, dtype=f32)
    kb._bwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else u, bias if bias is not None else u, dy,
        fwd_h, bagg_g, du, ddelta, dA, dB, dC, dD, dbias,
        dim, dstate, geo.rows, geo.cols, length, groups_dpg, n_seg,
        *su, *sd, *sA, *sB, *sC, *sD, *sbias, *sy,
        MODE=mode, K=K, HAS_D=D is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
        BLOCK_R=geo.block_r, BLOCK_C=geo.block_c, UNROLL_N=unroll_n, num_warps=num_warps)
    return du, ddelta, dA, dB, dC, dD, dbias
