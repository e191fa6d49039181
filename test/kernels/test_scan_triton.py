"""Triton forward kernels vs the reference.

Without a GPU these run under the Triton interpreter on CPU tensors, in a subprocess started by
test_scan_triton_interpreter.py (see conftest.py); with one, they run the compiled kernels on
CUDA in-process. Shapes are small but cover several tiles and
segments along both axes, odd lengths, N=1/16, groups, dtypes, optional inputs, reversed routes
and non-contiguous strides.
"""

import os

import mamba_perception_kernels as K
import pytest
from scan_inputs import (
    make_bidir,
    make_selective,
    make_ss2d,
    make_ss2d_lowrank,
    non_contiguous,
    token_major,
    tol,
)
import torch

if not torch.cuda.is_available() and os.environ.get('TRITON_INTERPRET') != '1':
    pytest.skip('no GPU: test_scan_triton_interpreter.py runs this file under the Triton '
                'interpreter in a subprocess', allow_module_level=True)


def _close(actual, expected, dtype):
    rtol, atol = tol(dtype)
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), rtol=rtol,
                               atol=atol)


def _on(args, device):
    return {k: (None if v is None else v.to(device)) for k, v in args.items()}


@pytest.mark.parametrize('batch,dim,length,groups,dstate,dtype', [
    (1, 2, 1, 1, 1, torch.float32),
    (1, 2, 150, 2, 16, torch.float32),     # several segments in one tile, N=16, G=2
    (1, 4, 333, 4, 3, torch.float16),      # odd L, G=4
    (1, 2, 2100, 1, 1, torch.bfloat16),    # several tiles (2048 steps per tile at N=1)
])
def test_selective_scan_fwd(triton_device, batch, dim, length, groups, dstate, dtype):
    device, launch = triton_device
    args = make_selective(batch, dim, length, groups, dstate, dtype=dtype)
    ref, ref_last = K.selective_scan_ref(**args, delta_softplus=True, return_last_state=True)
    out, last = launch.selective_scan_fwd(*_on(args, device).values(), True)
    _close(out, ref, dtype)
    torch.testing.assert_close(last.cpu(), ref_last, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize('opts,softplus', [
    (dict(with_d=False, with_z=False, with_bias=False), False),
    (dict(with_d=True, with_z=False, with_bias=True), False),
    (dict(with_d=False, with_z=True, with_bias=False), True),
])
def test_selective_scan_fwd_optional_inputs(triton_device, opts, softplus):
    device, launch = triton_device
    args = make_selective(1, 3, 90, 1, 2, **opts)
    ref = K.selective_scan_ref(**args, delta_softplus=softplus)
    out, _ = launch.selective_scan_fwd(*_on(args, device).values(), softplus)
    _close(out, ref, torch.float32)


def test_selective_scan_fwd_non_contiguous(triton_device):
    device, launch = triton_device
    args = make_selective(2, 4, 70, 2, 4)
    ref = K.selective_scan_ref(**args, delta_softplus=True)
    nc = {k: non_contiguous(v) for k, v in _on(args, device).items()}
    out, _ = launch.selective_scan_fwd(*nc.values(), True)
    _close(out, ref, torch.float32)


@pytest.mark.parametrize('batch,dim,height,width,dstate,dtype', [
    (1, 1, 1, 1, 1, torch.float32),
    (2, 2, 5, 7, 1, torch.float32),
    (1, 1, 33, 70, 1, torch.bfloat16),     # 2x2 tiles: row and column routes cross tiles
    (1, 1, 5, 40, 16, torch.float16),      # N=16: 32-wide tiles, 2 column tiles
])
def test_ss2d_fwd(triton_device, batch, dim, height, width, dstate, dtype):
    device, launch = triton_device
    args = make_ss2d(batch, dim, height, width, dstate, dtype=dtype)
    ref = K.ss2d_scan_ref(**args)
    out = launch.ss2d_fwd(*_on(args, device).values(), True, dtype)
    _close(out, ref, dtype)


def test_ss2d_fwd_each_route_alone(triton_device):
    # Zero C on all but one route: checks each route's order and direction separately.
    device, launch = triton_device
    base = make_ss2d(1, 2, 6, 5, 2, with_d=False)
    for k in range(4):
        args = dict(base)
        C = torch.zeros_like(base['C'])
        C[:, k] = base['C'][:, k]
        args['C'] = C
        ref = K.ss2d_scan_ref(**args)
        out = launch.ss2d_fwd(*_on(args, device).values(), True, torch.float32)
        _close(out, ref, torch.float32)


def test_ss2d_fwd_channels_last_non_contiguous_fp32_out(triton_device):
    device, launch = triton_device
    args = make_ss2d(1, 3, 7, 6, 2, dtype=torch.float16, with_bias=False)
    ref = K.ss2d_scan_ref(**args, delta_softplus=False, out_dtype=torch.float32)
    dev_args = _on(args, device)
    dev_args['x'] = dev_args['x'].contiguous(memory_format=torch.channels_last)
    dev_args['delta'] = non_contiguous(dev_args['delta'])
    dev_args['B'] = non_contiguous(dev_args['B'])
    out = launch.ss2d_fwd(*dev_args.values(), False, torch.float32)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _close(out, ref, torch.float32)


@pytest.mark.parametrize('batch,dim,length,dstate,dtype,opts', [
    (1, 2, 1, 1, torch.float32, {}),
    (1, 2, 77, 16, torch.float32, {}),
    (1, 1, 2100, 2, torch.bfloat16, {}),   # 2 tiles of 2048 steps at N<=4
    (1, 2, 65, 2, torch.float16, dict(with_d=False, with_z=False, with_bias=False)),
])
def test_bidir_fwd(triton_device, batch, dim, length, dstate, dtype, opts):
    device, launch = triton_device
    args = make_bidir(batch, dim, length, dstate, dtype=dtype, **opts)
    ref = K.bidir_scan_ref(**args)
    out = launch.bidir_fwd(*_on(args, device).values(), True)
    _close(out, ref, dtype)


def test_bidir_fwd_non_contiguous(triton_device):
    device, launch = triton_device
    args = make_bidir(1, 3, 50, 4)
    ref = K.bidir_scan_ref(**args)
    nc = {k: non_contiguous(v) for k, v in _on(args, device).items()}
    _close(launch.bidir_fwd(*nc.values(), True), ref, torch.float32)


def _bidir_token_major(args, device):
    args = _on(args, device)
    for name in ('u', 'delta', 'B', 'C', 'z'):
        args[name] = token_major(args[name])
    for name in ('D', 'delta_bias'):  # read through their strides too
        args[name] = non_contiguous(args[name])
    return args


@pytest.mark.parametrize('batch,dim,length,dstate,dtype,opts,seq', [
    # seq = (steps per segment, unroll, channels per program, state pass channels per program,
    #        segments per state-pass step)
    (1, 3, 1, 2, torch.float32, {}, (4, 2, 4, 8, 4)),            # one step, idle lanes
    # 8-step segments with a last partial one (37 = 4*8 + 5) walked both ways, 2 channel
    # blocks (the second partial), batch 2; the state pass over 3 programs, 2 segments a step
    (2, 12, 37, 4, torch.float32, {}, (8, 4, 8, 16, 2)),
    (1, 40, 70, 16, torch.float32, dict(with_d=False, with_z=False, with_bias=False),
     (16, 2, 32, 64, 4)),
    (1, 24, 50, 16, torch.float16, {}, (16, 4, 16, 64, 8)),     # y_0 kept in the fp16 output
    (1, 8, 33, 8, torch.bfloat16, {}, (4, 1, 8, 32, 16)),
])
def test_bidir_fwd_seq_token_major(triton_device, batch, dim, length, dstate, dtype, opts, seq,
                                   monkeypatch):
    device, launch = triton_device
    from mamba_perception_kernels.triton import bidir

    for key, value in zip(('seq_steps', 'seq_unroll', 'seq_block_d', 'state_block_m',
                           'state_block_s'), seq, strict=True):
        monkeypatch.setitem(bidir.TUNING, key, value)
    monkeypatch.setitem(bidir.TUNING, 'seq_min_programs', 1)  # keep the given steps
    monkeypatch.setitem(bidir.TUNING, 'impl', 'seq')
    walks = []
    monkeypatch.setattr(bidir, '_seq_fwd', lambda *a, f=bidir._seq_fwd: walks.append(f(*a)))
    args = make_bidir(batch, dim, length, dstate, dtype=dtype, **opts)
    out = launch.bidir_fwd(*_bidir_token_major(args, device).values(), True)
    assert walks, 'token-major inputs take the seq kernels'
    assert out.shape == (batch, dim, length) and out.transpose(1, 2).is_contiguous()
    _close(out, K.bidir_scan_ref(**args), dtype)


def test_bidir_seq_leaves_other_layouts_and_states_to_the_tiles(triton_device, monkeypatch):
    device, launch = triton_device
    from mamba_perception_kernels.triton import bidir

    monkeypatch.setitem(bidir.TUNING, 'impl', 'seq')
    walks = []
    monkeypatch.setattr(bidir, '_seq_fwd', lambda *a: walks.append(a))
    contiguous = make_bidir(1, 4, 9, 4)
    odd_states = make_bidir(1, 4, 9, 3)  # N = 3: not a power of two
    for args, prep in ((contiguous, _on), (odd_states, _bidir_token_major)):
        out = launch.bidir_fwd(*prep(args, device).values(), True)
        _close(out, K.bidir_scan_ref(**args), torch.float32)
    assert not walks
    monkeypatch.setitem(bidir.TUNING, 'impl', 'tile')
    with pytest.raises(ValueError, match="bidir TUNING\\['impl'\\] must be 'seq' or 'tiles'"):
        launch.bidir_fwd(*_on(contiguous, device).values(), True)


# ------------------------------------------------------------------ backward kernels


def _grads_close(got, want, name):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if w is None:
            assert g is None, f'{name}: gradient {i} should be None'
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, (name, i)
        scale = float(w.float().abs().max()) + 1e-6
        torch.testing.assert_close(g.float().cpu(), w.float(), rtol=1e-3, atol=2e-4 * scale,
                                   msg=lambda m, i=i: f'{name} gradient {i}: {m}')


@pytest.mark.parametrize('length,groups,dstate,opts', [
    (150, 2, 3, {}),                                               # z, D, bias, G=2
    (70, 1, 16, dict(with_z=False, with_d=False, with_bias=False)),
    (2100, 2, 1, {}),                                              # several tiles
])
def test_selective_scan_bwd(triton_device, length, groups, dstate, opts):
    from mamba_perception_kernels import cpu

    device, launch = triton_device
    args = make_selective(1, 4, length, groups, dstate, **opts)
    dout = torch.randn(1, 4, length)
    want = cpu.selective_scan_bwd(dout, *args.values(), True)
    got = launch.selective_scan_bwd(dout.to(device), *_on(args, device).values(), True)
    _grads_close(got, want, 'selective_scan')


@pytest.mark.parametrize('height,width,dstate', [(9, 13, 2), (20, 40, 1)])
def test_ss2d_bwd(triton_device, height, width, dstate):
    from mamba_perception_kernels import cpu

    device, launch = triton_device
    args = make_ss2d(1, 1, height, width, dstate)
    dy = torch.randn(1, 1, height, width)
    want = cpu.ss2d_bwd(dy, *args.values(), True)
    dev_args = _on(args, device)
    dev_args['delta'] = non_contiguous(dev_args['delta'])
    got = launch.ss2d_bwd(dy.to(device), *dev_args.values(), True)
    _grads_close(got, want, 'ss2d')


@pytest.mark.parametrize('length,dstate', [(100, 2), (20, 16)])
def test_bidir_bwd(triton_device, length, dstate):
    from mamba_perception_kernels import cpu

    device, launch = triton_device
    args = make_bidir(1, 2, length, dstate)
    dy = torch.randn(1, 2, length)
    want = cpu.bidir_bwd(dy, *args.values(), True)
    got = launch.bidir_bwd(dy.to(device), *_on(args, device).values(), True)
    _grads_close(got, want, 'bidir')


def test_bidir_bwd_token_major(triton_device):
    # Training Vim: the gate's backward recomputes y through the seq kernels (token-major
    # inputs), the tile backward kernels read the same views; gradients as for contiguous ones.
    from mamba_perception_kernels import cpu

    device, launch = triton_device
    args = make_bidir(2, 6, 21, 4)
    dy = torch.randn(2, 6, 21)
    want = cpu.bidir_bwd(dy, *args.values(), True)
    got = launch.bidir_bwd(token_major(dy.to(device)), *_bidir_token_major(args, device).values(),
                           True)
    _grads_close(got, want, 'bidir token-major')


@pytest.mark.parametrize('batch,height,width,dim,rank,dtype,out_dtype,seq', [
    # seq = (steps per segment, unroll, channels per program, largest rank projected inline
    #        [, state pass channels per program, segments per step])
    (1, 1, 1, 16, 1, torch.float32, torch.float32, (64, 4, 32, 8)),   # one step, idle lanes
    # 8-step segments across row ends (W=9) and column ends (H=5), 2 channel blocks (the
    # second partial), batch 2, a last partial segment (45 = 5*8 + 5) walked both ways
    (2, 5, 9, 20, 3, torch.float32, torch.float32, (8, 4, 16, 8)),
    # the same with Δ from the GEMM instead of the inline projection
    (2, 5, 9, 20, 3, torch.float32, torch.float32, (8, 2, 16, 0)),
    # fp16 output: each partial route sum is stored in fp16 (no fp32 scratch buffer)
    (1, 7, 5, 40, 2, torch.float16, torch.float16, (16, 2, 32, 8)),
    # bf16 output at rank 6 (the vector x_proj load), Δ inline, as VMamba-T's stage 1
    (1, 6, 7, 24, 6, torch.bfloat16, torch.bfloat16, (4, 2, 16, 8)),
    (1, 6, 11, 24, 2, torch.bfloat16, torch.float32, (4, 4, 8, 1)),   # 4-step segments, GEMM Δ
    # state pass split over 6 channel programs (the last partial), 4 steps of 4 segments
    (1, 5, 9, 22, 3, torch.float32, torch.float32, (4, 4, 32, 8, 4, 4)),
    # rank 6 (VMamba-T's stage 1): a step's 8 x_proj values in one load, split in registers
    (2, 5, 9, 20, 6, torch.float32, torch.float32, (8, 4, 16, 8)),
    (1, 6, 7, 24, 6, torch.float16, torch.float32, (4, 2, 16, 8)),
])
def test_ss2d_lowrank_fwd_seq(batch, height, width, dim, rank, dtype, out_dtype, seq,
                              monkeypatch):
    from mamba_perception_kernels.triton import ss2d_lowrank

    keys = ('seq_steps', 'seq_unroll', 'seq_block_d', 'seq_inline_rank', 'state_block_m',
            'state_block_s')
    for key, value in zip(keys, seq, strict=False):
        monkeypatch.setitem(ss2d_lowrank.TUNING, key, value)
    monkeypatch.setitem(ss2d_lowrank.TUNING, 'seq_min_programs', 1)  # keep the given steps
    monkeypatch.setitem(ss2d_lowrank.TUNING, 'impl', 'seq')
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args = make_ss2d_lowrank(batch, height, width, dim, rank, 1, dtype=dtype)
    ref = K.ss2d_scan_lowrank_ref(**args, out_dtype=torch.float32)
    dev_args = _on(args, device)
    for name in ('D', 'dt_bias'):  # read through their strides
        dev_args[name] = non_contiguous(dev_args[name])
    out = ss2d_lowrank.ss2d_lowrank_fwd(*dev_args.values(), True, out_dtype)
    assert out.shape == ref.shape and out.is_contiguous() and out.dtype == out_dtype
    _close(out.float(), ref, out_dtype if dtype == torch.float32 else dtype)


@pytest.mark.parametrize('rank,dtype,out_dtype,block_d', [
    (3, torch.float32, torch.float32, 32),   # all 20 channels in one program: fused
    (6, torch.float16, torch.float16, 32),   # rank 6 (vector x_proj load), 16-bit in and out
    (12, torch.bfloat16, torch.bfloat16, 32),  # Δ from the GEMM
    (3, torch.float32, torch.float16, 16),   # two channel blocks: normalised after the scan
])
def test_ss2d_lowrank_fwd_seq_norm(rank, dtype, out_dtype, block_d, monkeypatch):
    """norm_weight: LayerNorm of the route sum (VMamba's out_norm) instead of the sum, in the
    last output walk where one program holds all channels."""
    from mamba_perception_kernels.reference import layer_norm_out
    from mamba_perception_kernels.triton import ss2d_lowrank

    for key, value in (('seq_steps', 8), ('seq_unroll', 4), ('seq_block_d', block_d),
                       ('seq_inline_rank', 8), ('seq_min_programs', 1), ('impl', 'seq')):
        monkeypatch.setitem(ss2d_lowrank.TUNING, key, value)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args = make_ss2d_lowrank(2, 5, 9, 20, rank, 1, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    norm = (1 + 0.5 * torch.randn(20, generator=gen), 0.5 * torch.randn(20, generator=gen), 1e-5)
    want = layer_norm_out(K.ss2d_scan_lowrank_ref(**args, out_dtype=torch.float32), norm,
                          torch.float32)
    dev_norm = (norm[0].to(device), norm[1].to(device), norm[2])
    after_scan = []  # the unfused path's LayerNorm calls
    monkeypatch.setattr(ss2d_lowrank, 'layer_norm_out',
                        lambda *a: after_scan.append(1) or layer_norm_out(*a))
    got = ss2d_lowrank.ss2d_lowrank_fwd(*_on(args, device).values(), True, out_dtype, False, 1,
                                        dev_norm)
    assert len(after_scan) == (0 if block_d >= 20 else 1)
    assert got.shape == want.shape and got.is_contiguous() and got.dtype == out_dtype
    _close(got.float(), want, out_dtype if dtype == torch.float32 else dtype)


def test_ss2d_lowrank_delta_map_limit_projects_large_maps_inline(monkeypatch):
    """Above seq_delta_map_max_bytes (one image's (H, W, 4 * dim) Δ map) a rank above
    seq_inline_rank is projected in the walk: no Δ GEMM runs, and the output is the same."""
    from mamba_perception_kernels.triton import ss2d_lowrank

    for key, value in (('seq_steps', 8), ('seq_unroll', 4), ('seq_block_d', 16),
                       ('seq_inline_rank', 8), ('seq_min_programs', 1), ('impl', 'seq')):
        monkeypatch.setitem(ss2d_lowrank.TUNING, key, value)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args = make_ss2d_lowrank(2, 5, 9, 20, 12, 1, dtype=torch.float32)  # rank 12 > 8
    ref = K.ss2d_scan_lowrank_ref(**args, out_dtype=torch.float32)
    map_bytes = 5 * 9 * 4 * 20 * 4  # one image's Δ map in fp32
    gemms = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, 'linear',
                        lambda *a, **k: gemms.append(a[0].shape) or linear(*a, **k))
    for limit, expected_gemms in ((0, 1), (map_bytes, 1), (map_bytes - 1, 0)):
        monkeypatch.setitem(ss2d_lowrank.TUNING, 'seq_delta_map_max_bytes', limit)
        gemms.clear()
        out = ss2d_lowrank.ss2d_lowrank_fwd(*_on(args, device).values(), True, torch.float32)
        assert len(gemms) == expected_gemms, limit
        _close(out, ref, torch.float32)
    # the policy alone: small ranks always inline, the limit counts one image
    tuning = dict(ss2d_lowrank.TUNING, seq_delta_map_max_bytes=96 << 20)
    assert not ss2d_lowrank._delta_by_gemm(6, 512 * 512, 96, 2, tuning)
    assert ss2d_lowrank._delta_by_gemm(12, 160 * 90, 192, 2, tuning)  # 1280x720 stage 2
    assert ss2d_lowrank._delta_by_gemm(12, 256 * 256, 192, 2, tuning)  # 2048^2: 96 MiB
    assert not ss2d_lowrank._delta_by_gemm(12, 256 * 256, 192, 4, tuning)  # the same in fp32


@pytest.mark.parametrize('rank, multiple, widths', [
    (12, 64, (64, 64)),    # Δ by the GEMM: x_proj projected 64 wide, the Δ GEMM's K 64
    (12, 0, (56, 56)),     # no padding: 4 * (12 + 2) columns
    (3, 64, (20,)),        # Δ projected in the walk: no GEMM to pad for, no padding
])
def test_ss2d_lowrank_own_projection_pads_the_delta_gemm(rank, multiple, widths, monkeypatch):
    """Given x_proj_weight, "seq" projects x_proj itself, into zero-padded columns where the
    Δ GEMM reads it (TUNING seq_delta_k_multiple): the same output as x_proj given."""
    from mamba_perception_kernels.triton import ss2d_lowrank

    for key, value in (('seq_steps', 8), ('seq_unroll', 4), ('seq_block_d', 16),
                       ('seq_inline_rank', 8), ('seq_min_programs', 1), ('impl', 'seq'),
                       ('seq_delta_k_multiple', multiple)):
        monkeypatch.setitem(ss2d_lowrank.TUNING, key, value)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args = make_ss2d_lowrank(2, 5, 9, 20, rank, 1, dtype=torch.float32)
    weight = torch.randn(4, rank + 2, 20) * 0.3
    args['x_proj'] = torch.nn.functional.linear(args['x'], weight.reshape(-1, 20))
    ref = K.ss2d_scan_lowrank_ref(**args, out_dtype=torch.float32)
    gemm_k = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, 'linear',
                        lambda *a, **k: gemm_k.append(a[1].shape[-1] if a[0] is not dev['x']
                                                      else a[1].shape[0]) or linear(*a, **k))
    dev = _on(dict(args, x_proj=None), device)
    out = ss2d_lowrank.ss2d_lowrank_fwd(*dev.values(), True, torch.float32,
                                        x_proj_weight=weight.to(device))
    assert tuple(gemm_k) == widths  # the projection's width, then the Δ GEMM's K
    _close(out, ref, torch.float32)


@pytest.mark.parametrize('batch,height,width,dim,rank,dtype,out_dtype,seq', [
    # (steps per segment, unroll, channels per program, largest rank projected inline)
    (2, 5, 9, 20, 3, torch.float32, torch.float32, (8, 4, 16, 8)),  # 2 channel blocks
    (1, 6, 11, 24, 2, torch.float16, torch.float32, (4, 4, 32, 1)),  # Δ from the GEMM
    (1, 6, 11, 24, 6, torch.float16, torch.float16, (4, 4, 32, 8)),  # 16-bit parts, rank 6
])
def test_ss2d_lowrank_fwd_seq_parts(batch, height, width, dim, rank, dtype, out_dtype, seq,
                                    monkeypatch):
    # parts=2: both axes' output walks in one launch, each into its own part (in out_dtype):
    # the row routes and D·u in part 0, the column routes in part 1; their sum is the output.
    from mamba_perception_kernels.triton import ss2d_lowrank

    for key, value in zip(('seq_steps', 'seq_unroll', 'seq_block_d', 'seq_inline_rank'), seq,
                          strict=True):
        monkeypatch.setitem(ss2d_lowrank.TUNING, key, value)
    monkeypatch.setitem(ss2d_lowrank.TUNING, 'seq_min_programs', 1)
    monkeypatch.setitem(ss2d_lowrank.TUNING, 'impl', 'seq')
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args = make_ss2d_lowrank(batch, height, width, dim, rank, 1, dtype=dtype)
    ref = K.ss2d_scan_lowrank_ref(**args, out_dtype=torch.float32)
    parts = ss2d_lowrank.ss2d_lowrank_fwd(*_on(args, device).values(), True, out_dtype,
                                          False, 2)
    assert parts.shape == (2, *ref.shape) and parts.is_contiguous()
    assert parts.dtype == out_dtype
    parts = parts.float()
    _close(parts.sum(0), ref, dtype)
    # Part 0 alone: the reference with the column routes' C zeroed (their C·h vanishes, every
    # route's D·u stays).
    x_proj = args['x_proj'].clone()
    for k in (1, 3):  # route k's [dt (R), B, C] start at channel k * (R + 2)
        x_proj[..., k * (rank + 2) + rank + 1] = 0
    rows = K.ss2d_scan_lowrank_ref(**dict(args, x_proj=x_proj), out_dtype=torch.float32)
    _close(parts[0], rows, dtype)


@pytest.mark.parametrize('impl,rank', [('seq', 2), ('seq', 10), ('expanded', 2)])
def test_ss2d_lowrank_fwd_takes_A_as_its_log(impl, rank, monkeypatch):
    # a_is_log: the seq kernels compute A = -exp(A_log) per channel (inline and GEMM Δ);
    # "expanded" converts it before its kernels.
    from mamba_perception_kernels.triton import ss2d_lowrank

    monkeypatch.setitem(ss2d_lowrank.TUNING, 'impl', impl)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args = make_ss2d_lowrank(1, 5, 6, 12, rank, 1)
    ref = K.ss2d_scan_lowrank_ref(**args, out_dtype=torch.float32)
    dev_args = _on(args, device)
    dev_args['A'] = torch.log(-dev_args['A'])
    out = ss2d_lowrank.ss2d_lowrank_fwd(*dev_args.values(), True, torch.float32, True)
    _close(out, ref, torch.float32)


@pytest.mark.parametrize('state', [
    dict(state_impl='serial', state_block_m=4, state_block_s=4),
    # chunks of 2 segments: 23 segments a route -> 12 chunks (the last partial), carried
    dict(state_impl='chunked', chunk_segments=2, chunk_block_m=8),
    # one chunk holds every segment: nothing to carry
    dict(state_impl='chunked', chunk_segments=64, chunk_block_m=4),
])
def test_ss2d_lowrank_seq_state_pass_implementations(state, monkeypatch):
    # The state entering each segment, serial (one program walks a route's segments) or
    # chunked (chunks scanned in parallel, then the state entering each chunk carried in).
    from mamba_perception_kernels.triton import ss2d_lowrank

    for key, value in {'seq_steps': 4, 'seq_unroll': 2, 'seq_block_d': 16,
                       'seq_min_programs': 1, 'impl': 'seq', **state}.items():
        monkeypatch.setitem(ss2d_lowrank.TUNING, key, value)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args = make_ss2d_lowrank(2, 7, 13, 20, 2, 1)  # 91 steps: 23 segments of 4 per route
    ref = K.ss2d_scan_lowrank_ref(**args, out_dtype=torch.float32)
    out = ss2d_lowrank.ss2d_lowrank_fwd(*_on(args, device).values(), True, torch.float32)
    _close(out, ref, torch.float32)


def test_ss2d_lowrank_seq_rejects_an_unknown_state_pass(monkeypatch):
    from mamba_perception_kernels.triton import ss2d_lowrank

    monkeypatch.setitem(ss2d_lowrank.TUNING, 'impl', 'seq')
    monkeypatch.setitem(ss2d_lowrank.TUNING, 'state_impl', 'tree')
    args = make_ss2d_lowrank(1, 3, 4, 8, 2, 1)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    with pytest.raises(ValueError, match="state_impl'\\] must be 'serial' or 'chunked'"):
        ss2d_lowrank.ss2d_lowrank_fwd(*_on(args, device).values(), True, torch.float32)


def test_ss2d_lowrank_seq_takes_n_above_1_to_expanded(monkeypatch):
    from mamba_perception_kernels.triton import ss2d_lowrank

    monkeypatch.setitem(ss2d_lowrank.TUNING, 'impl', 'seq')
    called = []
    monkeypatch.setattr(ss2d_lowrank, '_seq_fwd', lambda *a: called.append(a))
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args = make_ss2d_lowrank(1, 3, 4, 8, 2, 2)
    out = ss2d_lowrank.ss2d_lowrank_fwd(*_on(args, device).values(), True, torch.float32)
    assert not called
    _close(out, K.ss2d_scan_lowrank_ref(**args, out_dtype=torch.float32), torch.float32)


@pytest.mark.parametrize('key,value', [('seq_unroll', 3), ('seq_steps', 48),
                                       ('seq_block_d', 96)])
def test_ss2d_lowrank_seq_rejects_launch_options_that_are_not_powers_of_two(key, value,
                                                                           monkeypatch):
    # An unroll that does not divide the segment would walk into the next segment's outputs.
    from mamba_perception_kernels.triton import ss2d_lowrank

    monkeypatch.setitem(ss2d_lowrank.TUNING, 'impl', 'seq')
    monkeypatch.setitem(ss2d_lowrank.TUNING, key, value)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args = make_ss2d_lowrank(1, 3, 4, 8, 2, 1)
    with pytest.raises(ValueError, match=f"ss2d_lowrank TUNING\\['{key}'\\]={value} must be a "
                                         "power of two"):
        ss2d_lowrank.ss2d_lowrank_fwd(*_on(args, device).values(), True, torch.float32)


def test_ss2d_lowrank_seq_weight_cache_follows_in_place_updates():
    from mamba_perception_kernels.triton.ss2d_lowrank import _prepared_weight

    w = torch.randn(4, 8, 3)
    diag = _prepared_weight(w, torch.float32, 5, True)
    assert _prepared_weight(w, torch.float32, 5, True) is diag  # cached
    torch.testing.assert_close(diag[8:16, 5:8], w[1])
    assert diag.shape == (32, 20) and diag[8:16, 8:10].abs().sum() == 0  # B, C columns
    with torch.no_grad():
        w.mul_(2)  # in place (an optimizer step, load_state_dict): rebuilt
    again = _prepared_weight(w, torch.float32, 5, True)
    assert again is not diag
    torch.testing.assert_close(again[8:16, 5:8], w[1])
    t = _prepared_weight(w, torch.float32, 0, False)
    assert t.shape == (4, 3, 8) and t.is_contiguous()
    torch.testing.assert_close(t, w.transpose(1, 2))
    assert _prepared_weight(w.clone(), torch.float32, 0, False) is not t  # another tensor
    param = torch.nn.Parameter(torch.randn(4, 8, 3))
    with torch.inference_mode():  # how the Pipeline runs: a parameter is still cached
        assert _prepared_weight(param, torch.float16, 5, True) is _prepared_weight(
            param, torch.float16, 5, True)
        frozen = torch.randn(4, 8, 3)  # no version counter: built each time, still right
    first = _prepared_weight(frozen, torch.float32, 0, False)
    assert _prepared_weight(frozen, torch.float32, 0, False) is not first
    torch.testing.assert_close(first, frozen.transpose(1, 2))


@pytest.mark.parametrize('impl', ['expanded', 'seq'])
def test_ss2d_lowrank_fwd_strided_inputs_no_optionals(impl, monkeypatch):
    from mamba_perception_kernels.triton import ss2d_lowrank

    monkeypatch.setitem(ss2d_lowrank.TUNING, 'impl', impl)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args = make_ss2d_lowrank(1, 7, 10, 16, 2, 1, with_d=False, with_bias=False)
    ref = K.ss2d_scan_lowrank_ref(**args, delta_softplus=False)
    # x as a channel slice of a wider map, x_proj as the even channels of a wider one
    x_wide = torch.zeros(1, 7, 10, 24)
    x_wide[..., 4:20] = args['x']
    nc = dict(_on(args, device), x=x_wide.to(device)[..., 4:20],
              x_proj=non_contiguous(args['x_proj'].to(device)))
    out = ss2d_lowrank.ss2d_lowrank_fwd(*nc.values(), False, torch.float32)
    _close(out, ref, torch.float32)


# ------------------------------------------------------------------ public ops on the GPU


@pytest.mark.gpu
def test_dispatch_picks_triton_on_cuda():
    assert K.backend_name('cuda') == 'triton'


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_public_ops_on_cuda(dtype):
    s = make_selective(2, 64, 3000, 4, 16, dtype=dtype)
    _close(K.selective_scan(**_on(s, 'cuda'), delta_softplus=True),
           K.selective_scan_ref(**s, delta_softplus=True), dtype)
    m = make_ss2d(1, 8, 56, 56, 1, dtype=dtype)
    _close(K.ss2d_scan(**_on(m, 'cuda')), K.ss2d_scan_ref(**m), dtype)
    b = make_bidir(2, 16, 197, 16, dtype=dtype)
    _close(K.bidir_scan(**_on(b, 'cuda')), K.bidir_scan_ref(**b), dtype)


@pytest.mark.gpu
def test_public_ops_backward_on_cuda():
    args = make_ss2d(1, 4, 12, 10, 1)
    leaves = {k: v.cuda().requires_grad_() for k, v in args.items()}
    out = K.ss2d_scan(**leaves)
    grads = torch.autograd.grad(out.sum(), list(leaves.values()))
    cpu_leaves = {k: v.requires_grad_() for k, v in args.items()}
    want = torch.autograd.grad(K.ss2d_scan_ref(**cpu_leaves).sum(), list(cpu_leaves.values()))
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-3, atol=1e-3 * float(w.abs().max()))
