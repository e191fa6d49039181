"""Backward formulas for the custom ops (``torch.library.register_autograd``), nothing else.

Each backward calls the matching ``mamba_perception::*_bwd`` op, which recomputes the forward
states from the saved inputs (no O(batch*dim*N*L) tensor is saved between forward and backward).
"""

from __future__ import annotations

import torch

from .reference import expand_lowrank


def _select(grads, needs, present):
    """None for inputs that were absent (empty placeholder) or need no gradient."""
    return tuple(g if (need and here) else None for g, need, here in zip(grads, needs, present,
                                                                         strict=True))


def _ss_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    # Unused outputs (usually last_state) then arrive as None instead of zero tensors, so the
    # backward knows whether a last-state gradient exists.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.present = tuple(t is not None for t in inputs[:8])
    ctx.delta_softplus = delta_softplus


def _ss_backward(ctx, dout, dlast):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    grads = torch.ops.mamba_perception.selective_scan_bwd(
        dout, dlast, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus)
    needs = ctx.needs_input_grad[:8]
    return (*_select(grads, needs, ctx.present), None)


def _ss2d_setup(ctx, inputs, output):
    x, delta, A, B, C, D, delta_bias, delta_softplus, _ = inputs
    ctx.save_for_backward(x, delta, A, B, C, D, delta_bias)
    ctx.present = tuple(t is not None for t in inputs[:7])
    ctx.delta_softplus = delta_softplus


def _ss2d_backward(ctx, dy):
    x, delta, A, B, C, D, delta_bias = ctx.saved_tensors
    grads = torch.ops.mamba_perception.ss2d_scan_bwd(
        dy, x, delta, A, B, C, D, delta_bias, ctx.delta_softplus)
    return (*_select(grads, ctx.needs_input_grad[:7], ctx.present), None, None)


def _bidir_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.present = tuple(t is not None for t in inputs[:8])
    ctx.delta_softplus = delta_softplus


def _bidir_backward(ctx, dout):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    grads = torch.ops.mamba_perception.bidir_scan_bwd(
        dout, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus)
    return (*_select(grads, ctx.needs_input_grad[:8], ctx.present), None)


def _lowrank_setup(ctx, inputs, output):
    (x, x_proj, dt_weight, A, D, dt_bias, delta_softplus, _, a_is_log, parts, norm_weight, _, _,
     x_proj_weight) = inputs
    ctx.save_for_backward(x, x_proj, dt_weight, A, D, dt_bias)
    ctx.present = tuple(t is not None for t in inputs[:6])
    ctx.delta_softplus = delta_softplus
    ctx.a_is_log = a_is_log
    ctx.parts = parts
    ctx.norm = norm_weight is not None
    ctx.own_projection = x_proj_weight is not None


def _lowrank_backward(ctx, dy):
    # Expand Δ again (the fused forward never stored it), run the SS2D backward op, then chain
    # through the projection: d x_proj[dt part] = dΔ · W, d W = dΔ^T · x_proj[dt part].
    if ctx.parts != 1:
        # Which routes land in which part is the implementation's choice: only their sum
        # has a defined gradient.
        raise RuntimeError('ss2d_scan_lowrank(parts=2) is for inference and has no backward; '
                           'train with parts=1')
    if ctx.norm:
        raise RuntimeError('ss2d_scan_lowrank(norm_weight=...) is for inference and has no '
                           'backward; train with the LayerNorm as its own module')
    if ctx.own_projection:
        raise RuntimeError('ss2d_scan_lowrank(x_proj_weight=...) is for inference and has no '
                           'backward; train with x_proj computed outside the op')
    x, x_proj, dt_weight, A, D, dt_bias = ctx.saved_tensors
    if ctx.a_is_log:  # A was given as log(-A): chain dA through A = -exp(A_log)
        A = -torch.exp(A)
    dstate = A.shape[1]
    xc, delta, B, C = expand_lowrank(x, x_proj, dt_weight, dstate)
    dx, ddelta, dA, dB, dC, dD, dbias = torch.ops.mamba_perception.ss2d_scan_bwd(
        dy.permute(0, 3, 1, 2), xc, delta, A, B, C, D, dt_bias, ctx.delta_softplus)
    batch, height, width, _ = x.shape
    rank = dt_weight.shape[2]
    cdt = ddelta.dtype
    parts = x_proj.reshape(batch, height, width, 4, rank + 2 * dstate)
    d_dts = torch.einsum('bkchw,kcr->bhwkr', ddelta, dt_weight.to(cdt))
    d_proj = torch.cat([d_dts, dB.permute(0, 3, 4, 1, 2).to(cdt),
                        dC.permute(0, 3, 4, 1, 2).to(cdt)], dim=-1)
    d_weight = torch.einsum('bkchw,bhwkr->kcr', ddelta, parts[..., :rank].to(cdt))
    if ctx.a_is_log:
        dA = dA * A
    grads = (dx.permute(0, 2, 3, 1).to(x.dtype), d_proj.reshape(x_proj.shape).to(x_proj.dtype),
             d_weight.to(dt_weight.dtype), dA, dD, dbias)
    return (*_select(grads, ctx.needs_input_grad[:6], ctx.present), None, None, None, None,
            None, None, None, None)


def register(selective_scan_op, ss2d_scan_op, bidir_scan_op, ss2d_scan_lowrank_op):
    """Attach the backward formulas to the forward ops."""
    selective_scan_op.register_autograd(_ss_backward, setup_context=_ss_setup)
    ss2d_scan_op.register_autograd(_ss2d_backward, setup_context=_ss2d_setup)
    bidir_scan_op.register_autograd(_bidir_backward, setup_context=_bidir_setup)
    ss2d_scan_lowrank_op.register_autograd(_lowrank_backward, setup_context=_lowrank_setup)
