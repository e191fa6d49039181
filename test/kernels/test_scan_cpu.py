"""Reference vs chunked PyTorch path (CPU), gradients, errors, custom-op registration."""

import subprocess
import sys

import mamba_perception_kernels as K
from mamba_perception_kernels import cpu
import pytest
import scan_inputs
from scan_inputs import (
    make_bidir,
    make_selective,
    make_ss2d,
    make_ss2d_lowrank,
    non_contiguous,
    tol,
)
import torch
from torch.autograd import gradcheck


def _close(actual, expected, dtype):
    rtol, atol = tol(dtype)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def test_import_without_triton_uses_torch_path():
    # A fresh interpreter where `import triton` fails: the package imports, never touches
    # Triton, and picks the PyTorch path even for CUDA devices.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, mamba_perception_kernels as K\n"
        "assert K.backend_name('cuda') == 'torch-chunked', K.backend_name('cuda')\n"
        "x = torch.randn(1, 2, 3, 4); d = torch.randn(1, 4, 2, 3, 4)\n"
        "A = -torch.rand(8, 1); B = torch.randn(1, 4, 1, 3, 4)\n"
        "torch.testing.assert_close(K.ss2d_scan(x, d, A, B, B), K.ss2d_scan_ref(x, d, A, B, B))\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and 'ok' in proc.stdout, proc.stderr[-3000:]


def test_import_does_not_import_triton():
    code = ("import sys, mamba_perception_kernels\n"
            "assert 'triton' not in sys.modules, 'triton imported eagerly'\n")
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_backend_name_cpu():
    assert K.backend_name('cpu') == 'torch-chunked'
    assert K.backend_name(torch.device('cpu')) == 'torch-chunked'


@pytest.mark.parametrize('length', [1, 63, 64, 65, 200])
def test_linear_scan_matches_loop(length):
    a = torch.rand(3, length, dtype=torch.float64)
    b = torch.randn(3, length, dtype=torch.float64)
    h = torch.zeros(3, dtype=torch.float64)
    expected = []
    for i in range(length):
        h = a[:, i] * h + b[:, i]
        expected.append(h)
    torch.testing.assert_close(cpu.linear_scan(a, b, chunk=16), torch.stack(expected, -1))


def test_linear_scan_long_decay_stays_finite():
    # exp(cumsum(delta*A)) would underflow to 0 and its inverse overflow to inf here.
    a = torch.full((1, 5000), 0.5)
    b = torch.ones(1, 5000)
    h = cpu.linear_scan(a, b)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h[0, -1], torch.tensor(2.0))


@pytest.mark.parametrize('groups,dstate', [(1, 1), (2, 16), (4, 3)])
@pytest.mark.parametrize('length', [1, 17, 150])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_selective_scan_matches_ref(groups, dstate, length, dtype):
    args = make_selective(2, 8, length, groups, dstate, dtype=dtype)
    out, last = K.selective_scan(**args, delta_softplus=True, return_last_state=True)
    ref, ref_last = K.selective_scan_ref(**args, delta_softplus=True, return_last_state=True)
    assert out.dtype == dtype and out.shape == ref.shape
    assert last.dtype == torch.float32 and last.shape == (2, 8, dstate)
    _close(out, ref, dtype)
    torch.testing.assert_close(last, ref_last, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize('opts', [dict(with_d=False, with_z=False, with_bias=False),
                                  dict(with_d=True, with_z=False, with_bias=False),
                                  dict(with_d=False, with_z=True, with_bias=True)])
@pytest.mark.parametrize('softplus', [False, True])
def test_selective_scan_optional_inputs(opts, softplus):
    args = make_selective(1, 4, 70, 1, 4, **opts)
    _close(K.selective_scan(**args, delta_softplus=softplus),
           K.selective_scan_ref(**args, delta_softplus=softplus), torch.float32)


def test_selective_scan_softplus_passthrough_above_20():
    args = make_selective(1, 2, 5, 1, 2, with_bias=False)
    args['delta'] = torch.full((1, 2, 5), 25.0)
    args['A'] = torch.full((2, 2), -0.01)
    out = K.selective_scan(**args, delta_softplus=True)
    torch.testing.assert_close(out, K.selective_scan_ref(**args, delta_softplus=True))


def test_selective_scan_non_contiguous():
    args = make_selective(2, 6, 33, 3, 2)
    nc = {k: non_contiguous(v) for k, v in args.items()}
    _close(K.selective_scan(**nc, delta_softplus=True),
           K.selective_scan_ref(**args, delta_softplus=True), torch.float32)


@pytest.mark.parametrize('hw', [(1, 1), (3, 5), (9, 4)])
@pytest.mark.parametrize('dstate', [1, 16])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_ss2d_matches_ref(hw, dstate, dtype):
    args = make_ss2d(2, 3, *hw, dstate, dtype=dtype)
    out = K.ss2d_scan(**args)
    assert out.dtype == dtype
    _close(out, K.ss2d_scan_ref(**args), dtype)


def test_ss2d_channels_last_and_out_dtype():
    args = make_ss2d(1, 4, 5, 6, 2, dtype=torch.float16)
    x_cl = args['x'].contiguous(memory_format=torch.channels_last)
    out = K.ss2d_scan(**{**args, 'x': x_cl}, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    _close(out, K.ss2d_scan_ref(**args, out_dtype=torch.float32), torch.float16)


def test_ss2d_routes_are_vmamba_cross_scan():
    # With D = 1 and B = 0 every route's output is x itself: y = 4 * x.
    args = make_ss2d(1, 2, 3, 4, 1, with_bias=False)
    args['B'] = torch.zeros_like(args['B'])
    args['D'] = torch.ones(8)
    torch.testing.assert_close(K.ss2d_scan_ref(**args), 4 * args['x'])
    torch.testing.assert_close(K.ss2d_scan(**args), 4 * args['x'])
    # Route k=1 (column-major) sees pixel (1, 0) right after (0, 0): with a unit state kept
    # alive (A=0, delta=1 after no softplus), B=1 only on route 1, C=1 only on route 1, D=0,
    # the output at (h, w) is the sum of x over the pixels route 1 visited so far.
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    delta = torch.ones(1, 4, 1, 3, 4)
    B = torch.zeros(1, 4, 1, 3, 4)
    B[:, 1] = 1
    C = B.clone()
    A = torch.zeros(4, 1)
    y = K.ss2d_scan(x, delta, A, B, C, delta_softplus=False)
    col_major = x[0, 0].t().reshape(-1)
    expected = torch.cumsum(col_major, 0).reshape(4, 3).t()
    torch.testing.assert_close(y[0, 0], expected)


@pytest.mark.parametrize('length', [1, 2, 70])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_bidir_matches_ref(length, dtype):
    args = make_bidir(2, 5, length, 16, dtype=dtype)
    out = K.bidir_scan(**args)
    assert out.dtype == dtype
    _close(out, K.bidir_scan_ref(**args), dtype)


def test_bidir_ref_is_vim_flip_composition():
    args = make_bidir(1, 3, 9, 2, with_z=False)
    fwd = K.selective_scan_ref(args['u'][:, 0], args['delta'][:, 0], args['A'][0],
                               args['B'][:, :1], args['C'][:, :1], args['D'][0], None,
                               args['delta_bias'][0], True)
    bwd = K.selective_scan_ref(args['u'][:, 1].flip(-1), args['delta'][:, 1].flip(-1),
                               args['A'][1], args['B'][:, 1:].flip(-1), args['C'][:, 1:].flip(-1),
                               args['D'][1], None, args['delta_bias'][1], True).flip(-1)
    torch.testing.assert_close(K.bidir_scan_ref(**args), fwd + bwd)


# ------------------------------------------------------------------------------- gradients


def _f64(args):
    return {k: (None if v is None else v.double().requires_grad_()) for k, v in args.items()}


def test_selective_scan_gradcheck_f64():
    args = _f64(make_selective(1, 4, 9, 2, 3))
    names = list(args)

    def fn(*ts):
        out, last = K.selective_scan(**dict(zip(names, ts, strict=True)), delta_softplus=True,
                                     return_last_state=True)
        return out, last

    assert gradcheck(fn, tuple(args.values()))


def test_selective_scan_gradcheck_f64_minimal():
    args = _f64(make_selective(1, 2, 5, 1, 1, with_d=False, with_z=False, with_bias=False))
    assert gradcheck(lambda *ts: K.selective_scan(*ts), tuple(v for v in args.values()
                                                             if v is not None))


def test_ss2d_gradcheck_f64():
    args = _f64(make_ss2d(1, 2, 3, 4, 2))
    names = list(args)
    assert gradcheck(lambda *ts: K.ss2d_scan(**dict(zip(names, ts, strict=True))),
                     tuple(args.values()))


def test_bidir_gradcheck_f64():
    args = _f64(make_bidir(1, 3, 6, 2))
    names = list(args)
    assert gradcheck(lambda *ts: K.bidir_scan(**dict(zip(names, ts, strict=True))),
                     tuple(args.values()))


@pytest.mark.parametrize('op', ['selective', 'ss2d', 'bidir'])
def test_grads_match_reference_autograd(op):
    if op == 'selective':
        args = make_selective(2, 8, 140, 4, 16)
        fn, ref = (lambda **a: K.selective_scan(**a, delta_softplus=True),
                   lambda **a: K.selective_scan_ref(**a, delta_softplus=True))
    elif op == 'ss2d':
        args = make_ss2d(1, 4, 7, 9, 1)
        fn, ref = K.ss2d_scan, K.ss2d_scan_ref
    else:
        args = make_bidir(1, 4, 70, 16)
        fn, ref = K.bidir_scan, K.bidir_scan_ref
    leaves = {k: v.requires_grad_() for k, v in args.items() if v is not None}
    out = fn(**args)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, list(leaves.values()), grad)
    want = torch.autograd.grad(ref(**args), list(leaves.values()), grad)
    for name, g, w in zip(leaves, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3 * float(w.abs().max()),
                                   msg=lambda m, name=name: f'grad of {name}: {m}')


def test_backward_without_grad_for_some_inputs():
    args = make_selective(1, 4, 20, 1, 2)
    args['u'].requires_grad_()
    out = K.selective_scan(**args)
    (du,) = torch.autograd.grad(out.sum(), [args['u']])
    assert du.shape == args['u'].shape


# ------------------------------------------------------------------------------- errors


def _err(fn, match, **kw):
    with pytest.raises(K.ScanInputError, match=match):
        fn(**kw)


def test_errors_name_the_tensor():
    good = make_selective(1, 4, 10, 2, 3)
    assert issubclass(K.ScanInputError, ValueError)
    _err(K.selective_scan, r'delta must have shape \(1, 4, 10\); got shape \(1, 4, 9\)',
         **{**good, 'delta': good['delta'][..., :9]})
    _err(K.selective_scan, r'B: groups G=3 must divide dim=4',
         **{**good, 'B': torch.randn(1, 3, 3, 10), 'C': torch.randn(1, 3, 3, 10)})
    _err(K.selective_scan, r'C must have shape', **{**good, 'C': torch.randn(1, 2, 4, 10)})
    _err(K.selective_scan, r'A must have dtype .*torch.float16',
         **{**good, 'A': good['A'].half()})
    _err(K.selective_scan, r'u must have dtype .*torch.int64',
         **{**good, 'u': torch.ones(1, 4, 10, dtype=torch.long)})
    _err(K.selective_scan, r'D must have shape \(4\)', **{**good, 'D': torch.randn(5)})
    _err(K.selective_scan, r'z must have shape', **{**good, 'z': torch.randn(1, 4, 11)})
    _err(K.selective_scan, r'delta_bias must have shape',
         **{**good, 'delta_bias': torch.randn(4, 1)})
    _err(K.selective_scan, r'u must be a torch.Tensor', **{**good, 'u': [1.0]})
    big_n = K.MAX_DSTATE + 1
    _err(K.selective_scan, rf'N={big_n} is outside the supported range 1..{K.MAX_DSTATE}',
         **{**good, 'A': torch.randn(4, big_n), 'B': torch.randn(1, 2, big_n, 10),
            'C': torch.randn(1, 2, big_n, 10)})


def test_ss2d_and_bidir_errors():
    s = make_ss2d(1, 2, 3, 4, 1)
    _err(K.ss2d_scan, r'delta must have shape \(1, 4, 2, 3, 4\)',
         **{**s, 'delta': torch.randn(1, 4, 2, 4, 3)})
    _err(K.ss2d_scan, r'A must have shape \(8, \*\)', **{**s, 'A': torch.randn(2, 1)})
    _err(K.ss2d_scan, r'B must have shape \(1, 4, 1, 3, 4\)',
         **{**s, 'B': torch.randn(1, 2, 1, 3, 4)})
    _err(K.ss2d_scan, r'out_dtype', **s, out_dtype=torch.int32)
    b = make_bidir(1, 2, 5, 2)
    _err(K.bidir_scan, r'u must have shape \(\*, 2, \*, \*\)',
         **{**b, 'u': torch.randn(1, 3, 2, 5)})
    _err(K.bidir_scan, r'A must have shape \(2, 2, \*\)', **{**b, 'A': torch.randn(2, 2)})
    _err(K.bidir_scan, r'D must have shape \(2, 2\)', **{**b, 'D': torch.randn(4)})


# ------------------------------------------------------------------------------- custom ops


class _SS2DBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.params = make_ss2d(1, 4, 5, 6, 1)

    def forward(self, x, delta):
        p = self.params
        return K.ss2d_scan(x * 2, delta, p['A'], p['B'], p['C'], p['D'], p['delta_bias']) + 1


def test_ss2d_lowrank_equals_ss2d_on_expanded_delta():
    args = make_ss2d_lowrank(2, 6, 9, 8, 3, 2)
    out = K.ss2d_scan_lowrank(**args)
    assert out.shape == (2, 6, 9, 8) and out.is_contiguous()
    # Independent check of the packing convention: build Δ, B, C by hand from x_proj.
    x, p, w = args['x'], args['x_proj'], args['dt_weight']
    parts = p.reshape(2, 6, 9, 4, 3 + 4)
    delta = torch.stack([parts[..., k, :3] @ w[k].T for k in range(4)], 1)  # b,h,w,dim per k
    want = K.ss2d_scan_ref(x.permute(0, 3, 1, 2), delta.permute(0, 1, 4, 2, 3), args['A'],
                           parts[..., 3:5].permute(0, 3, 4, 1, 2),
                           parts[..., 5:7].permute(0, 3, 4, 1, 2), args['D'], args['dt_bias'])
    torch.testing.assert_close(out, want.permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_ss2d_lowrank_gradcheck_f64():
    args = _f64(make_ss2d_lowrank(1, 3, 4, 2, 2, 1))
    names = list(args)
    assert gradcheck(lambda *ts: K.ss2d_scan_lowrank(**dict(zip(names, ts, strict=True))),
                     tuple(args.values()))


def test_ss2d_lowrank_takes_A_as_its_log():
    # a_is_log: A is given as log(-A) (VMamba's A_logs) and the op exponentiates it; the value
    # and the gradient reaching A_log are those of -exp(A_log) passed as A.
    args = _f64(make_ss2d_lowrank(1, 3, 4, 2, 2, 1))
    a_log = torch.log(-args.pop('A')).requires_grad_()
    want = K.ss2d_scan_lowrank(**args, A=-torch.exp(a_log))
    got = K.ss2d_scan_lowrank(**args, A=a_log, a_is_log=True)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(K.ss2d_scan_lowrank(**args, A=a_log), want)  # the flag matters
    dy = torch.randn_like(want)
    (g_want,) = torch.autograd.grad(want, a_log, dy)
    (g_got,) = torch.autograd.grad(got, a_log, dy)
    torch.testing.assert_close(g_got, g_want)
    names = list(args)
    assert gradcheck(lambda a, *ts: K.ss2d_scan_lowrank(
        **dict(zip(names, ts, strict=True)), A=a, a_is_log=True), (a_log, *args.values()))


def test_ss2d_lowrank_projects_x_proj_itself_given_its_weight():
    # x_proj_weight (4, R + 2N, dim), VMamba's parameter: the op computes x @ W.T itself; the
    # same output as x_proj given, errors for both / neither / a flattened weight, and no
    # backward through that form (inference only).
    args = make_ss2d_lowrank(2, 4, 5, 6, 3, 1)
    weight = torch.randn(4, 3 + 2, 6) * 0.4
    x_proj = torch.nn.functional.linear(args['x'], weight.reshape(-1, 6))
    want = K.ss2d_scan_lowrank(**dict(args, x_proj=x_proj))
    got = K.ss2d_scan_lowrank(**dict(args, x_proj=None), x_proj_weight=weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(K.ss2d_scan_lowrank(**args), want)  # x_proj matters
    with pytest.raises(K.ScanInputError, match='exactly one'):
        K.ss2d_scan_lowrank(**dict(args, x_proj=x_proj), x_proj_weight=weight)
    with pytest.raises(K.ScanInputError, match='exactly one'):
        K.ss2d_scan_lowrank(**dict(args, x_proj=None))
    with pytest.raises(K.ScanInputError, match=r'x_proj_weight must have shape \(4, 5, 6\)'):
        K.ss2d_scan_lowrank(**dict(args, x_proj=None), x_proj_weight=weight.reshape(20, 6))
    y = K.ss2d_scan_lowrank(**dict(args, x_proj=None), x_proj_weight=weight.requires_grad_())
    with pytest.raises(RuntimeError, match='x_proj_weight=.*for inference'):
        y.sum().backward()


def test_ss2d_lowrank_errors_name_the_tensor():
    args = make_ss2d_lowrank(1, 3, 4, 8, 2, 1)
    with pytest.raises(K.ScanInputError, match='x_proj'):
        K.ss2d_scan_lowrank(**dict(args, x_proj=args['x_proj'][..., :-1]))
    with pytest.raises(K.ScanInputError, match='dt_weight'):
        K.ss2d_scan_lowrank(**dict(args, dt_weight=args['dt_weight'][:3]))
    with pytest.raises(K.ScanInputError, match='A'):
        K.ss2d_scan_lowrank(**dict(args, A=args['A'][:8]))


def test_fake_impls_give_the_real_output_strides():
    # Regression: ss2d_scan's fake impl once said "contiguous NCHW" for a channels-last x while
    # the kernel returns x's memory format; inductor's assert_size_stride then failed on GPU.
    p = make_ss2d(1, 4, 5, 6, 1)
    x = torch.randn(1, 5, 6, 4).permute(0, 3, 1, 2)  # channels-last view, as in the models
    lr = make_ss2d_lowrank(1, 5, 6, 4, 2, 1)
    real = (K.ss2d_scan(x, **{k: v for k, v in p.items() if k != 'x'}),
            K.ss2d_scan_lowrank(**lr))
    with torch._subclasses.FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fp = {k: mode.from_tensor(v) for k, v in p.items() if k != 'x'}
        flr = {k: mode.from_tensor(v) for k, v in lr.items()}
        fake = (K.ss2d_scan(fx, **fp), K.ss2d_scan_lowrank(**flr))
    assert real[0].stride() == x.stride()
    for r, f in zip(real, fake, strict=True):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)


@pytest.mark.parametrize('out_dtype', [torch.float32, torch.bfloat16])
def test_ss2d_lowrank_parts_sum_to_the_output(out_dtype):
    args = make_ss2d_lowrank(2, 5, 6, 8, 2, 1)
    y = K.ss2d_scan_lowrank(**args, out_dtype=out_dtype)
    parts = K.ss2d_scan_lowrank(**args, out_dtype=out_dtype, parts=2)
    assert parts.shape == (2, *y.shape) and parts.dtype == out_dtype
    torch.testing.assert_close(parts.float().sum(0), y.float())


@pytest.mark.parametrize('parts', [3, 0])
def test_ss2d_lowrank_rejects_bad_parts(parts):
    args = make_ss2d_lowrank(1, 3, 4, 8, 2, 1)
    with pytest.raises(K.ScanInputError, match='parts must be 1 or 2'):
        K.ss2d_scan_lowrank(**args, out_dtype=torch.float32, parts=parts)


def test_ss2d_lowrank_parts_have_no_backward():
    # Which routes go to which part is the implementation's choice; only parts=1 trains.
    args = make_ss2d_lowrank(1, 3, 4, 8, 2, 1)
    x = args.pop('x').requires_grad_()
    parts = K.ss2d_scan_lowrank(x, **args, out_dtype=torch.float32, parts=2)
    with pytest.raises(RuntimeError, match=r'parts=2\) is for inference'):
        parts.sum().backward()


@pytest.mark.parametrize('out_dtype', [torch.float32, torch.bfloat16])
def test_ss2d_lowrank_norm_is_the_layer_norm_of_the_output(out_dtype):
    # norm_weight / norm_bias / norm_eps: nn.LayerNorm of the route sum, in fp32, cast once
    args = make_ss2d_lowrank(2, 5, 6, 8, 2, 1)
    weight, bias = 1 + torch.randn(8), torch.randn(8)
    y = K.ss2d_scan_lowrank(**args, out_dtype=torch.float32)
    want = torch.nn.functional.layer_norm(y, (8,), weight, bias, 1e-3)
    got = K.ss2d_scan_lowrank(**args, out_dtype=out_dtype, norm_weight=weight, norm_bias=bias,
                              norm_eps=1e-3)
    assert got.dtype == out_dtype and got.is_contiguous()
    torch.testing.assert_close(got, want.to(out_dtype))


@pytest.mark.parametrize('kwargs, message', [
    ({'norm_weight': torch.ones(8)}, 'go together'),
    ({'norm_weight': torch.ones(7), 'norm_bias': torch.zeros(7)}, 'norm_weight must have shape'),
    ({'norm_weight': torch.ones(8), 'norm_bias': torch.zeros(8, dtype=torch.float16)},
     'norm_bias must have dtype'),
    ({'norm_weight': torch.ones(8), 'norm_bias': torch.zeros(8), 'parts': 2}, 'needs parts=1'),
])
def test_ss2d_lowrank_rejects_bad_norm(kwargs, message):
    args = make_ss2d_lowrank(1, 3, 4, 8, 2, 1)
    with pytest.raises(K.ScanInputError, match=message):
        K.ss2d_scan_lowrank(**args, out_dtype=torch.float32, **kwargs)


def test_ss2d_lowrank_norm_has_no_backward():
    args = make_ss2d_lowrank(1, 3, 4, 8, 2, 1)
    x = args.pop('x').requires_grad_()
    y = K.ss2d_scan_lowrank(x, **args, out_dtype=torch.float32, norm_weight=torch.ones(8),
                            norm_bias=torch.zeros(8))
    with pytest.raises(RuntimeError, match=r'norm_weight=\.\.\.\) is for inference'):
        y.sum().backward()


def test_ss2d_lowrank_compiles_as_one_op():
    args = make_ss2d_lowrank(1, 5, 6, 8, 2, 1)

    def f(x, x_proj):
        y = K.ss2d_scan_lowrank(x, x_proj, args['dt_weight'], args['A'], args['D'],
                                args['dt_bias'], out_dtype=torch.float32)
        return torch.nn.functional.layer_norm(y, (8,))

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(args['x'], args['x_proj']), f(args['x'], args['x_proj']))
    gm = torch.fx.experimental.proxy_tensor.make_fx(f)(args['x'], args['x_proj'])
    ours = [str(n.target) for n in gm.graph.nodes if str(n.target).startswith('mamba_perception')]
    assert ours == ['mamba_perception.ss2d_scan_lowrank.default'], ours

    def g(x, x_proj):  # the parts form, summed where its consumer reads it (its fake shape)
        y = K.ss2d_scan_lowrank(x, x_proj, args['dt_weight'], args['A'], args['D'],
                                args['dt_bias'], out_dtype=torch.float32, parts=2)
        return torch.nn.functional.layer_norm(y[0] + y[1], (8,))

    torch.testing.assert_close(torch.compile(g, fullgraph=True)(args['x'], args['x_proj']),
                               f(args['x'], args['x_proj']))


def test_torch_compile_sees_one_op():
    m = _SS2DBlock()
    x, delta = torch.randn(1, 4, 5, 6), torch.randn(1, 4, 4, 5, 6)
    compiled = torch.compile(m, fullgraph=True, backend='aot_eager')
    torch.testing.assert_close(compiled(x, delta), m(x, delta))
    # Training through the compiled graph uses the registered backward.
    x.requires_grad_()
    compiled(x, delta).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_export_shows_one_custom_op_node():
    m = _SS2DBlock()
    ep = torch.export.export(m, (torch.randn(1, 4, 5, 6), torch.randn(1, 4, 4, 5, 6)))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == 'call_function']
    ours = [t for t in targets if t.startswith('mamba_perception.')]
    assert ours == ['mamba_perception.ss2d_scan.default'], targets


def test_bidir_output_layout_follows_u_in_the_op_and_its_fake():
    # torch.compile checks the real output's strides against the fake's: both follow u.
    args = make_bidir(2, 5, 7, 4)
    token_major = {k: (scan_inputs.token_major(v) if k in ('u', 'delta', 'B', 'C', 'z') else v)
                   for k, v in args.items()}
    ref = K.bidir_scan_ref(**args)
    for ins, want in ((args, (35, 7, 1)), (token_major, (35, 1, 5))):
        out = K.bidir_scan(**ins)
        assert out.stride() == want
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        with torch._subclasses.FakeTensorMode() as mode:
            fake = {k: (None if v is None else mode.from_tensor(v)) for k, v in ins.items()}
            assert K.bidir_scan(**fake).stride() == want


def test_ops_registered_with_fake_impls():
    for name in ('selective_scan', 'ss2d_scan', 'bidir_scan'):
        assert hasattr(torch.ops.mamba_perception, name)
    args = make_bidir(1, 3, 7, 2)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = {k: (None if v is None else mode.from_tensor(v)) for k, v in args.items()}
        out = K.bidir_scan(**fake)
    assert out.shape == (1, 3, 7)
