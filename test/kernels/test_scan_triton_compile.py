"""Compile every Triton kernel variant for sm_90 without a GPU (catches compiler-only errors).

The interpreter runs kernels as Python and accepts code the Triton compiler rejects (a
loop-carried variable changing type once slipped through that way). Triton can lower a kernel
to PTX / cubin for a target GPU with no GPU present, so CI compiles the forward and backward
kernels of all three ops here.
"""

import importlib.util
import re

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec('triton') is None,
                                reason='triton is not installed')

ACT = {'u_ptr', 'delta_ptr', 'Bm_ptr', 'Cm_ptr', 'z_ptr', 'out_ptr', 'dy_ptr',  # activations
       'x_ptr', 'p_ptr', 'd_ptr', 'b_ptr', 'c_ptr'}


def _compile(fn, consts, num_warps=4):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig = {n: ('constexpr' if n in consts else
               ('*bf16' if n in ACT else '*fp32') if n.endswith('_ptr') else
               'fp32' if n.endswith('_eps') else 'i32')
           for n in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                          target=GPUTarget('cuda', 90, 32), options=dict(num_warps=num_warps))


@pytest.mark.parametrize('mode,k,block', [(0, 1, (16, 64)), (1, 2, (16, 64)), (2, 4, (16, 32))])
def test_kernels_compile_for_sm90(mode, k, block):
    if importlib.util.find_spec('triton.backends.nvidia') is None:
        pytest.skip('triton has no NVIDIA backend here')
    from mamba_perception_kernels.triton import scan_bwd as kb
    from mamba_perception_kernels.triton import scan_fwd as kf

    c = dict(MODE=mode, K=k, HAS_BIAS=True, SOFTPLUS=True, BLOCK_R=block[0],
             BLOCK_C=block[1], UNROLL_N=1, HAS_D=True, HAS_Z=mode != 2)
    for fn in (kf._segment_agg_kernel, kf._output_kernel, kb._bwd_agg_kernel, kb._bwd_kernel):
        assert _compile(fn, c).asm['ptx']
    assert _compile(kf._state_pass_kernel,
                    dict(MODE=mode, K=k, STORE_LAST=mode == 0, BLOCK_R=block[0],
                         BLOCK_C=block[1], BLOCK_S=128, BLOCK_N=16, INVERT=True)).asm['ptx']


@pytest.mark.parametrize('rank,delta,fast_log', [(6, False, True), (48, True, True),
                                                 (6, False, False)])
def test_ss2d_lowrank_seq_kernels_compile_for_sm90(rank, delta, fast_log):
    # The interpreter runs the walks as Python, and only with the precise log: compile both
    # dt sources, both output axes and the fast log (lg2.approx) that CUDA runs.
    if importlib.util.find_spec('triton.backends.nvidia') is None:
        pytest.skip('triton has no NVIDIA backend here')
    from mamba_perception_kernels.triton import ss2d_lowrank as lr

    c = dict(R=rank, P=rank + 2, T=32, UNROLL=4, DELTA=delta, HAS_BIAS=True, SOFTPLUS=True,
             FAST_LOG=fast_log, BLOCK_D=128, A_LOG=fast_log,  # A as given and as its log
             XPROJ_VEC=rank == 6)  # stage 1's 8 x_proj values a step in one load
    agg = _compile(lr._seq_agg_kernel, c)
    assert ('lg2.approx' in agg.asm['ptx']) == fast_log
    # rank 6: a step's 8 x_proj values split into scalars in registers, no shuffles (with the
    # launch's stride-1 and alignment specialisation they are one 16-byte load)
    assert 'shfl' not in agg.asm['ptx']
    for axis in (0, 1, 2):  # 2: both axes in one launch, into two parts
        assert _compile(lr._seq_out_kernel,
                        dict(c, AXIS=axis, HAS_D=True, NORM=False)).asm['cubin']
    # out_norm in the last walk of axis 1: two channel reductions a step (warp shuffles)
    normed = _compile(lr._seq_out_kernel, dict(c, AXIS=1, HAS_D=True, NORM=True))
    assert 'shfl' in normed.asm['ptx'] and 'rsqrt' in normed.asm['ptx']
    for dt_sum in (False, True):
        assert _compile(lr.state_kernel, dict(ROUTES=4 - 2 * dt_sum, DT_SUM=dt_sum,
                                              BLOCK_S=512, BLOCK_M=4)).asm['cubin']


@pytest.mark.parametrize('out,fast_log', [(False, True), (True, True), (True, False)])
def test_bidir_seq_kernel_compiles_for_sm90(out, fast_log):
    if importlib.util.find_spec('triton.backends.nvidia') is None:
        pytest.skip('triton has no NVIDIA backend here')
    from mamba_perception_kernels.triton import bidir

    k = _compile(bidir._bidir_seq_kernel,
                 dict(N=16, T=64, UNROLL=2, OUT=out, HAS_D=True, HAS_Z=True, HAS_BIAS=True,
                      SOFTPLUS=True, FAST_LOG=fast_log, BLOCK_D=64), num_warps=2)
    assert ('lg2.approx' in k.asm['ptx']) == fast_log
    # The state tile keeps every state of a channel in one thread (BLOCK_D >= 32 x warps):
    # C·h and the row stores need no shuffle.
    assert 'shfl' not in k.asm['ptx']


@pytest.mark.parametrize('padded_t,weights,precision', [(False, '*fp16', 'tf32'),
                                                        (True, '*bf16', 'tf32'),
                                                        (False, '*fp32', 'ieee')])
def test_prenorm_kernel_compiles_for_sm90(padded_t, weights, precision):
    # The interpreter runs tl.dot as numpy: compile the fused MLP for the GPU it is tuned on.
    if importlib.util.find_spec('triton.backends.nvidia') is None:
        pytest.skip('triton has no NVIDIA backend here')
    from mamba_perception_kernels.triton import prenorm as norm_mlp
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = norm_mlp._norm_mlp_kernel
    # with padded_t also the residual add of a 16-bit branch (VMamba's stage-1 blocks)
    consts = dict(HAS_BRANCH=padded_t, HAS_B1=True, HAS_B2=True, DOT_PRECISION=precision,
                  PADDED_T=padded_t, BLOCK_M=64, BLOCK_C=128, BLOCK_H=64, FAST_MATH=True)
    fp32 = {'x_ptr', 'out_ptr', 'nw_ptr', 'nb_ptr', 'b2_ptr'}
    sig = {n: 'constexpr' if n in consts else 'fp32' if n == 'eps' else
           ('*fp32' if n in fp32 else weights) if n.endswith('_ptr') else 'i32'
           for n in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                              target=GPUTarget('cuda', 90, 32), options=dict(num_warps=4))
    ptx = compiled.asm['ptx']
    # 16-bit weights must reach the tensor cores (wgmma on sm_90).
    assert ('wgmma' in ptx) == (weights != '*fp32')
    # the GELU's reciprocal and exp2 as single approximate instructions (common.gelu_erf)
    assert 'rcp.approx.ftz.f32' in ptx and 'ex2.approx.ftz.f32' in ptx


def test_stem_kernels_compile_for_sm90():
    if importlib.util.find_spec('triton.backends.nvidia') is None:
        pytest.skip('triton has no NVIDIA backend here')
    from mamba_perception_kernels.triton import stem
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # VMamba-T's widths: 3 -> 48 (padded to 64) -> 96 (128), fp16 weights, fp32 image in
    consts = dict(CIN=3, HAS_B1=True, HAS_B2=True, DOT_PRECISION='tf32', BLOCK_M=128, K1=32,
                  BLOCK_C1=64, BLOCK_C2=128, FAST_MATH=True)
    fp32 = {'x_ptr', 'out_ptr', 'n1w_ptr', 'n1b_ptr', 'n2w_ptr', 'n2b_ptr'}
    for fn, stages in ((stem._stem_conv1_kernel, 1), (stem._stem_conv2_kernel, 3)):
        kept = {k: v for k, v in consts.items() if k in fn.arg_names}
        sig = {n: 'constexpr' if n in kept else 'fp32' if n.startswith('eps') else
               ('*fp32' if n in fp32 else '*fp16') if n.endswith('_ptr') else 'i32'
               for n in fn.arg_names}
        # Triton's specialisation at 1280x720: pointers and W1 = 640, W2 = 320, C1 = 48,
        # C2 = 96 divisible by 16 (without it the masked tap loads are not staged)
        attrs = {(i,): [['tt.divisibility', 16]] for i, n in enumerate(fn.arg_names)
                 if n.endswith('_ptr') or n in ('W1', 'W2', 'C1', 'C2')}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=kept, attrs=attrs),
                                  target=GPUTarget('cuda', 90, 32),
                                  options=dict(num_warps=4, num_stages=stages))
        ptx = compiled.asm['ptx']
        assert 'wgmma' in ptx, fn.__name__
        if fn is stem._stem_conv1_kernel:
            assert 'rcp.approx.ftz.f32' in ptx and 'ex2.approx.ftz.f32' in ptx
        else:  # the tap loop's loads staged asynchronously (num_stages 3)
            assert 'cp.async' in ptx


@pytest.mark.parametrize('bias', [False, True])
def test_norm_linear_kernel_compiles_for_sm90(bias):
    if importlib.util.find_spec('triton.backends.nvidia') is None:
        pytest.skip('triton has no NVIDIA backend here')
    from mamba_perception_kernels.triton import prenorm
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = prenorm._norm_linear_kernel
    # residual + linear (+ bias), fp32 out
    consts = dict(HAS_B=bias, HAS_RES=True, DOT_PRECISION='tf32', BLOCK_M=128, BLOCK_C=128,
                  BLOCK_N=64)
    half = ('w_ptr', 'b_ptr')
    sig = {n: 'constexpr' if n in consts else 'fp32' if n == 'eps' else
           ('*fp16' if n in half else '*fp32') if n.endswith('_ptr') else 'i32'
           for n in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                              target=GPUTarget('cuda', 90, 32), options=dict(num_warps=8))
    assert 'wgmma' in compiled.asm['ptx']


@pytest.mark.parametrize('levels,affine,channels_last', [(3, True, True), (1, False, False)])
def test_resize_tap_sum_kernel_compiles_for_sm90(levels, affine, channels_last):
    if importlib.util.find_spec('triton.backends.nvidia') is None:
        pytest.skip('triton has no NVIDIA backend here')
    from mamba_perception_kernels.triton import resize
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = resize._resize_tap_sum_kernel
    consts = dict(LEVELS=levels, AFFINE=affine, RELU=affine, BLOCK_P=32, BLOCK_C=64)
    if channels_last:  # a launch makes integer arguments equal to 1 constexprs
        consts.update(s_c=1, o_c=1, t1_c=1, t2_c=1, t3_c=1)
    floats = {'sh1', 'sw1', 'sh2', 'sw2', 'sh3', 'sw3'}
    sig = {n: ('constexpr' if n in consts else
               ('*fp32' if n in ('scale_ptr', 'shift_ptr') else '*fp16') if n.endswith('_ptr')
               else 'fp32' if n in floats else 'i32')
           for n in fn.arg_names}
    # and marks pointers and integers divisible by 16 (C % 16 == 0 and the strides of
    # channels-last maps)
    aligned = {'C', 's_b', 's_y', 's_x', 'o_b', 'o_y', 'o_x', 't1_b', 't1_y', 't1_x'}
    attrs = {(i,): [['tt.divisibility', 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and (n.endswith('_ptr') or n in aligned)}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget('cuda', 90, 32), options=dict(num_warps=4))
    vector_loads = re.findall(r'ld\.global[^\n]*\.v[248]', compiled.asm['ptx'])
    # channels-last maps: the channel gathers are vector loads (no constexpr flag needed)
    assert bool(vector_loads) == channels_last
