import math

from _model_test_utils import num_params, ss2d_official
import pytest
import torch

from mamba_perception.models import create_model
from mamba_perception.models.vmamba import SS2D, VSSM

torch.set_num_threads(2)


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return create_model('vmamba_test').eval()


@pytest.mark.parametrize('name, expected', [
    ('vmamba_tiny', 30_249_064), ('vmamba_small', 50_147_752), ('vmamba_base', 88_557_800)])
def test_parameter_counts_equal_official(name, expected):
    # Official counts (VSSM built from classification/models/vmamba.py at 2ed52ea; README:
    # 30M / 50M / 89M).
    with torch.device('meta'):  # shapes only: no init cost
        assert num_params(create_model(name)) == expected


def test_feature_info():
    with torch.device('meta'):
        m = create_model('vmamba_tiny', backbone=True)
    assert [f['num_chs'] for f in m.feature_info] == [96, 192, 384, 768]
    assert [f['reduction'] for f in m.feature_info] == [4, 8, 16, 32]


@pytest.mark.parametrize('hw', [(96, 160), (64, 96), (67, 101)])
def test_non_square_intermediates_have_the_right_strides(model, hw):
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        feats = model.forward_intermediates(x)
    assert len(feats) == 4
    for f, info in zip(feats, model.feature_info, strict=True):
        stride = info['reduction']
        assert f.shape == (2, info['num_chs'], math.ceil(hw[0] / stride),
                           math.ceil(hw[1] / stride))
        assert f.is_contiguous(memory_format=torch.channels_last)  # views of the NHWC maps
        assert torch.isfinite(f).all()


def test_intermediates_come_out_in_the_autocast_dtype(model):
    # The heads' convs would round them to it anyway; fp32 copies cost memory (4 maps kept).
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model.forward_intermediates(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model.forward_intermediates(x)
    for f, r in zip(low, ref, strict=True):
        assert f.dtype == torch.bfloat16 and f.shape == r.shape
        assert f.is_contiguous(memory_format=torch.channels_last)
        assert ((f.float() - r).norm() / r.norm()) < 3e-2


def test_last_intermediate_is_forward_features(model):
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        last = model.forward_features(x)  # NHWC
        logits = model(x)
    torch.testing.assert_close(feats[-1], last.permute(0, 3, 1, 2))
    assert logits.shape == (1, 1000)
    only = model.forward_intermediates(x, indices=[1])
    torch.testing.assert_close(only[0], feats[1])


def test_backbone_applies_outnorms():
    torch.manual_seed(0)
    m = create_model('vmamba_test', backbone=True).eval()
    assert m.classifier is None and not any(k.startswith('classifier') for k in m.state_dict())
    with torch.no_grad():
        for i in range(4):
            getattr(m, f'outnorm{i}').weight.fill_(2.0)
            getattr(m, f'outnorm{i}').bias.fill_(1.0)
        feats = m.forward_intermediates(torch.randn(1, 3, 64, 96))
    for f in feats:
        # LayerNorm over channels with weight 2, bias 1: channel mean 1, channel std 2
        torch.testing.assert_close(f.mean(1), torch.ones_like(f.mean(1)), atol=1e-4, rtol=0)
        torch.testing.assert_close(f.std(1, unbiased=False), torch.full_like(f[:, 0], 2.0),
                                   atol=1e-3, rtol=0)
    with pytest.raises(RuntimeError, match='backbone=True'):
        m.forward_head(torch.zeros(1, 2, 3, 128))


def test_ss2d_matches_official_math():
    # Our SS2D projects per route in the native layout and lets the fused kernel route; the
    # official code cross-scans first and projects the 4 sequences. Same numbers.
    torch.manual_seed(0)
    op = SS2D(24, d_state=1, ssm_ratio=2.0).eval()
    with torch.no_grad():
        op.dt_projs_bias.add_(torch.randn_like(op.dt_projs_bias))
        op.A_logs.add_(0.5 * torch.randn_like(op.A_logs))
        op.Ds.add_(torch.randn_like(op.Ds))
        x = torch.randn(2, 5, 7, 24)
        torch.testing.assert_close(op(x), ss2d_official(op, x), rtol=1e-4, atol=1e-5)


def test_ss2d_with_state_size_4_matches_official_math():
    torch.manual_seed(1)
    op = SS2D(16, d_state=4, ssm_ratio=1.0).eval()
    with torch.no_grad():
        x = torch.randn(1, 6, 3, 16)
        torch.testing.assert_close(op(x), ss2d_official(op, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('grad', [False, True])
def test_ss2d_inference_lets_the_scan_op_project_x_proj(grad, monkeypatch):
    # Without gradients the op gets x_proj_weight (and pads its Δ GEMM's K where it runs one);
    # with them x_proj is computed by the module, where autograd sees it. Same numbers.
    import mamba_perception_kernels

    calls = []
    real = mamba_perception_kernels.ss2d_scan_lowrank
    monkeypatch.setattr(mamba_perception_kernels, 'ss2d_scan_lowrank',
                        lambda x, x_proj, *a, **k: calls.append(
                            (x_proj is None, k.get('x_proj_weight') is not None))
                        or real(x, x_proj, *a, **k))
    torch.manual_seed(0)
    op = SS2D(24, d_state=1, ssm_ratio=1.0).eval()
    x = torch.randn(1, 5, 7, 24)
    with torch.set_grad_enabled(grad):
        got = op(x)
    assert calls == [(not grad, not grad)]
    with torch.no_grad():
        torch.testing.assert_close(got, ss2d_official(op, x), rtol=1e-4, atol=1e-5)


def _scan_parts_in_compiled_graph(op, x):
    # Compile with a backend that records the parts argument of every scan op in the graph.
    seen = []

    def backend(gm, example_inputs):
        seen.extend(n.args[9] if len(n.args) > 9 else n.kwargs.get('parts', 1)
                    for n in gm.graph.nodes
                    if 'ss2d_scan_lowrank' in str(n.target))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(op, backend=backend, fullgraph=True)(x)
    return out, seen


@pytest.mark.parametrize('max_steps, grad, parts', [(64, False, 2), (34, False, 1),
                                                     (64, True, 1)])
def test_ss2d_compiled_for_inference_splits_the_scan_in_parts(max_steps, grad, parts,
                                                              monkeypatch):
    # Compiled, gradients off, maps up to SS2D_PARTS_MAX_STEPS: the scan op returns the row
    # and column routes as two parts and out_norm's input is their sum (one output launch
    # on CUDA); the same numbers as eager, which keeps one part.
    from mamba_perception.models import vmamba

    monkeypatch.setattr(vmamba, 'SS2D_PARTS_MAX_STEPS', max_steps)
    torch.manual_seed(0)
    op = SS2D(24, d_state=1, ssm_ratio=1.0).eval()
    x = torch.randn(2, 5, 7, 24)  # 35 steps
    with torch.set_grad_enabled(grad):
        want = op(x)
        got, seen = _scan_parts_in_compiled_graph(op, x)
    assert seen == [parts]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_no_nan(model, dtype):
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        feats = model.forward_intermediates(x)
        logits = model(x)
    assert all(torch.isfinite(f).all() for f in feats)
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(logits.float(), ref, atol=0.15, rtol=0.1)


def test_backward_reaches_scan_parameters():
    torch.manual_seed(0)
    m = VSSM(depths=(1, 1, 1, 1), dims=8, ssm_ratio=1.0, num_classes=5)
    m(torch.randn(2, 3, 32, 48)).sum().backward()
    op = m.layers[2].blocks[0].op
    for p in (op.A_logs, op.Ds, op.dt_projs_weight, op.dt_projs_bias, op.x_proj_weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_fused_mlp_inference_path_matches_the_modules(monkeypatch):
    # With 16-bit weights and gradients off, each block's norm2 -> MLP -> residual is the fused
    # norm_mlp_residual op; it must agree with the module path (taken with gradients on).
    import mamba_perception_kernels

    from mamba_perception.models.layers import cast_autocast_weights

    calls = []
    real = mamba_perception_kernels.norm_mlp_residual
    branches = []
    monkeypatch.setattr(mamba_perception_kernels, 'norm_mlp_residual',
                        lambda *a, **k: calls.append(a[0].shape)
                        or branches.append(k.get('branch')) or real(*a, **k))
    torch.manual_seed(0)
    model = create_model('vmamba_test', num_classes=0).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        model.forward_intermediates(x)
    assert calls == []  # fp32 weights: modules
    cast_autocast_weights(model, torch.bfloat16)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        fused = model.forward_intermediates(x)
    assert len(calls) == sum(model.depths)
    # The SS2D half's residual add is done inside the op: its output comes in as the branch.
    assert all(b is not None and b.shape == c for b, c in zip(branches, calls, strict=True))
    with torch.enable_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        ref = model.forward_intermediates(x)
    assert len(calls) == sum(model.depths)
    for f, r in zip(fused, ref, strict=True):
        assert ((f.float() - r.float()).norm() / r.float().norm()) < 2e-2
    # Stages wider than FUSED_MLP_MAX_CHANNELS keep the modules (dims here: 16, 32, 64, 128).
    from mamba_perception.models import vmamba

    calls.clear()
    monkeypatch.setattr(vmamba, 'FUSED_MLP_MAX_CHANNELS', 32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        model.forward_intermediates(x)
    assert [c[-1] for c in calls] == [16] * model.depths[0] + [32] * model.depths[1]


def _spy_widths(monkeypatch, name):
    """Record the channel width of every call of ``mamba_perception_kernels.<name>``."""
    import mamba_perception_kernels

    calls = []
    real = getattr(mamba_perception_kernels, name)
    monkeypatch.setattr(mamba_perception_kernels, name,
                        lambda *a, **k: calls.append(a[0].shape[-1]) or real(*a, **k))
    return calls


def _inference_matches_module_path(x):
    """vmamba_test with bf16 weights: its no-grad (fused) forward against the module path."""
    from mamba_perception.models.layers import cast_autocast_weights

    torch.manual_seed(0)
    model = cast_autocast_weights(create_model('vmamba_test', num_classes=0).eval(),
                                  torch.bfloat16)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        fused = model.forward_intermediates(x)
    with torch.enable_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        ref = model.forward_intermediates(x)
    for f, r in zip(fused, ref, strict=True):
        assert ((f.float() - r.float()).norm() / r.float().norm()) < 2e-2
    return model


def test_fused_ss2d_tail_matches_the_modules(monkeypatch):
    # FUSED_SS2D_TAIL_MAX_CHANNELS on: out_norm -> out_proj -> + x is norm_linear_residual.
    from mamba_perception.models import vmamba

    calls = _spy_widths(monkeypatch, 'norm_linear_residual')
    monkeypatch.setattr(vmamba, 'FUSED_SS2D_TAIL_MAX_CHANNELS', 64)
    model = _inference_matches_module_path(torch.randn(1, 3, 64, 96))
    # d_inner = 2 * dims (16, 32, 64, 128): the stages up to 64 wide
    assert calls == [32] * model.depths[0] + [64] * model.depths[1]


def test_gelu_epilogue_above_the_fused_mlp(monkeypatch):
    # Stages wider than FUSED_MLP_MAX_CHANNELS run fc1 + GELU as layers.linear_gelu_tanh (one
    # GEMM with cuBLASLt's GELU epilogue on CUDA; its tanh form), and their modules when
    # GELU_TANH_EPILOGUE is off.
    from mamba_perception.models import layers, vmamba

    calls = []
    real = layers.linear_gelu_tanh
    monkeypatch.setattr(vmamba, 'linear_gelu_tanh',
                        lambda x, w, b: calls.append(x.shape[-1]) or real(x, w, b))
    monkeypatch.setattr(vmamba, 'FUSED_MLP_MAX_CHANNELS', 16)
    model = _inference_matches_module_path(torch.randn(1, 3, 64, 96))
    # dims (16, 32, 64, 128): stage 1 fully fused, the others through the epilogue
    assert calls == [32] * model.depths[1] + [64] * model.depths[2] + [128] * model.depths[3]
    calls.clear()
    monkeypatch.setattr(vmamba, 'GELU_TANH_EPILOGUE', False)
    _inference_matches_module_path(torch.randn(1, 3, 64, 96))
    assert calls == []


def test_fused_stem_matches_the_modules(monkeypatch):
    # With 16-bit weights and gradients off, the patch embedding is the conv_norm_stem op
    # (image -> stage-1 map); with gradients on (and with FUSED_STEM off) it is its modules.
    from mamba_perception.models import vmamba

    calls = []
    import mamba_perception_kernels

    real = mamba_perception_kernels.conv_norm_stem
    monkeypatch.setattr(mamba_perception_kernels, 'conv_norm_stem',
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x = torch.randn(1, 3, 61, 90)  # odd height: the convs' padding reaches the last row
    model = _inference_matches_module_path(x)
    assert calls == [x.shape]
    stem = model.patch_embed
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        fused = stem(x)
        monkeypatch.setattr(vmamba, 'FUSED_STEM', False)
        modules = stem(x)
    assert len(calls) == 2
    assert fused.shape == modules.shape == (1, 16, 23, 16) and fused.dtype == torch.float32
    assert ((fused - modules.float()).norm() / modules.float().norm()) < 1e-2


@pytest.mark.parametrize('flag', [False, True])
def test_scan_out_16bit_returns_the_weights_dtype(monkeypatch, flag):
    # SCAN_OUT_16BIT (inference with 16-bit weights): every SS2D scan returns the weights'
    # dtype instead of fp32, and the features stay within bf16 tolerance of the module path;
    # with gradients on it is fp32 either way.
    import mamba_perception_kernels

    from mamba_perception.models import vmamba

    monkeypatch.setattr(vmamba, 'SCAN_OUT_16BIT', flag)
    out_dtypes = []
    real = mamba_perception_kernels.ss2d_scan_lowrank

    def spy(*a, **k):
        y = real(*a, **k)
        out_dtypes.append(y.dtype)
        return y

    monkeypatch.setattr(mamba_perception_kernels, 'ss2d_scan_lowrank', spy)
    model = _inference_matches_module_path(torch.randn(1, 3, 64, 96))
    blocks = sum(model.depths)
    inference = torch.bfloat16 if flag else torch.float32
    assert out_dtypes == [inference] * blocks + [torch.float32] * blocks


def test_scan_norm_runs_out_norm_inside_the_scan(monkeypatch):
    # SCAN_NORM_MAX_CHANNELS (inference, 16-bit weights): the stages up to that d_inner hand
    # out_norm to the scan op (norm_weight=...) instead of running the module; the features
    # stay within bf16 tolerance of the module path; with gradients the module runs.
    import mamba_perception_kernels

    from mamba_perception.models import vmamba

    monkeypatch.setattr(vmamba, 'SCAN_NORM_MAX_CHANNELS', 64)
    normed = []
    real = mamba_perception_kernels.ss2d_scan_lowrank
    monkeypatch.setattr(mamba_perception_kernels, 'ss2d_scan_lowrank',
                        lambda *a, **k: normed.append(k.get('norm_weight') is not None)
                        or real(*a, **k))
    model = _inference_matches_module_path(torch.randn(1, 3, 64, 96))
    # d_inner (32, 64, 128, 256): the first two stages, in the no-grad pass only
    depths = model.depths
    assert [layer.blocks[0].op.d_inner for layer in model.layers] == [32, 64, 128, 256]
    fused = [True] * (depths[0] + depths[1]) + [False] * (depths[2] + depths[3])
    assert normed == fused + [False] * sum(depths)


def _bf16_ss2d_and_input():
    """An SS2D (24 channels, N = 1) with bf16 weights for inference, and an input map."""
    from mamba_perception.models.layers import cast_autocast_weights

    torch.manual_seed(0)
    op = cast_autocast_weights(SS2D(24, d_state=1, ssm_ratio=1.0).eval(), torch.bfloat16)
    return op, torch.randn(2, 5, 7, 24)


def test_scan_norm_compiles_in_one_graph(monkeypatch):
    # The scan op with out_norm's parameters traces into one graph (its fake kernel) and gives
    # the module path's output within bf16 rounding.
    from mamba_perception.models import vmamba

    monkeypatch.setattr(vmamba, 'SS2D_PARTS_MAX_STEPS', 0)
    op, x = _bf16_ss2d_and_input()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        want = op(x)
        monkeypatch.setattr(vmamba, 'SCAN_NORM_MAX_CHANNELS', 24)
        scans = []

        def backend(gm, example_inputs):
            scans.extend(n for n in gm.graph.nodes if 'ss2d_scan_lowrank' in str(n.target))
            return gm.forward

        torch._dynamo.reset()
        got = torch.compile(op, backend=backend, fullgraph=True)(x)
    torch._dynamo.reset()
    assert len(scans) == 1
    node = scans[0]
    assert (node.args[10] if len(node.args) > 10 else node.kwargs.get('norm_weight')) is not None
    assert ((got.float() - want.float()).norm() / want.float().norm()) < 1e-2


def test_scan_out_16bit_parts_compiled_match_eager(monkeypatch):
    # Compiled for inference with 16-bit weights, the scan's two parts come back in bf16 and
    # out_norm sums them in fp32: the same output as eager (one bf16 part) within rounding.
    from mamba_perception.models import vmamba

    monkeypatch.setattr(vmamba, 'SCAN_OUT_16BIT', True)
    monkeypatch.setattr(vmamba, 'SS2D_PARTS_MAX_STEPS', 64)
    op, x = _bf16_ss2d_and_input()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        want = op(x)
        got, seen = _scan_parts_in_compiled_graph(op, x)
    assert seen == [2]
    assert ((got.float() - want.float()).norm() / want.float().norm()) < 1e-2


@pytest.mark.parametrize('flag', [False, True])
def test_residual_16bit_keeps_the_stream_in_the_autocast_dtype(monkeypatch, flag):
    # RESIDUAL_16BIT (inference, autocast): the stem writes the stream in the autocast dtype,
    # the fused MLP keeps it there (out_dtype = the stream's dtype), the downsamples' outputs
    # are cast to it. Off, stage 1's stream is fp32 (the stem's and the fused MLP's output).
    # (CPU autocast already runs LayerNorm in bf16, so stages 2-4 are bf16 either way here.)
    import mamba_perception_kernels

    from mamba_perception.models import vmamba

    monkeypatch.setattr(vmamba, 'RESIDUAL_16BIT', flag)
    mlp_out = []
    real = mamba_perception_kernels.norm_mlp_residual
    monkeypatch.setattr(mamba_perception_kernels, 'norm_mlp_residual',
                        lambda *a, **k: mlp_out.append(k['out_dtype']) or real(*a, **k))
    stream = torch.bfloat16 if flag else torch.float32
    x = torch.randn(1, 3, 64, 96)
    model = _inference_matches_module_path(x)  # fused (no grad) vs modules, each way
    block_in = []
    for layer in model.layers:
        layer.blocks[0].register_forward_pre_hook(lambda m, a: block_in.append(a[0].dtype))
    mlp_out.clear()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert model.patch_embed(x, model._stream_dtype(x)).dtype == stream
        model.forward_intermediates(x)
        features = model.forward_features(x)
    assert block_in[:4] == [stream] + [torch.bfloat16] * 3
    assert mlp_out[:model.depths[0]] == [stream] * model.depths[0]
    assert features.dtype == torch.bfloat16
    with torch.autocast('cpu', dtype=torch.bfloat16):  # gradients on: autocast decides
        assert model._stream_dtype(x) is None
