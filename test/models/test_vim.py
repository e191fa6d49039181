from _model_test_utils import bimamba_official, num_params
import pytest
import torch

from mamba_perception.models import create_model
from mamba_perception.models.layers import resample_pos_embed_grid
from mamba_perception.models.vim import BiMambaMixer

torch.set_num_threads(2)


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return create_model('vim_test').eval()


@pytest.mark.parametrize('name, expected', [
    # hand-computed in the notes (7.148M / 25.797M / 97.598M; "+" 7.25M / 26.00M) and equal
    # to the official builders at hustvl/Vim dd0358a
    ('vim_tiny', 7_148_008), ('vim_small', 25_796_584), ('vim_base', 97_598_440),
    ('vim_tiny_plus', 7_250_344), ('vim_small_plus', 26_001_256)])
def test_parameter_counts_equal_official(name, expected):
    with torch.device('meta'):
        assert num_params(create_model(name)) == expected


def test_feature_info_and_grid():
    with torch.device('meta'):
        m = create_model('vim_small')
        plus = create_model('vim_small_plus')
    assert [f['num_chs'] for f in m.feature_info] == [384] * 4
    assert [f['reduction'] for f in m.feature_info] == [4, 8, 16, 32]
    assert m.pretrain_grid == (14, 14) and plus.pretrain_grid == (27, 27)
    assert m.patch_embed.grid(720, 1280) == (45, 80)
    assert m.patch_embed.grid(1080, 1920) == (67, 120)
    assert plus.patch_embed.grid(1080, 1920) == (134, 239)


def test_pos_embed_is_identity_at_training_size(model):
    assert model.pos_embed_for_grid(model.pretrain_grid) is model.pos_embed
    pe = torch.randn(1, 197, 8)
    out = resample_pos_embed_grid(pe, (14, 14), (14, 14), cls_index=98)
    assert torch.equal(out, pe)


def test_pos_embed_resampling_keeps_class_slot_in_the_middle():
    dim = 3
    grid = torch.arange(14 * 14, dtype=torch.float32).view(1, 196, 1).expand(1, 196, dim)
    cls = torch.full((1, 1, dim), -7.0)
    pe = torch.cat((grid[:, :98], cls, grid[:, 98:]), dim=1)  # official mid-class layout
    out = resample_pos_embed_grid(pe, (14, 14), (10, 21), cls_index=98)
    assert out.shape == (1, 10 * 21 + 1, dim)
    assert torch.equal(out[:, 105], cls[:, 0])  # new M' // 2 = 105
    patches = torch.cat((out[:, :105], out[:, 106:]), dim=1).view(10, 21, dim)
    # a linear ramp stays monotone: rows then columns
    assert (patches[1:, :, 0] > patches[:-1, :, 0]).all()
    assert (patches[:, 1:, 0] > patches[:, :-1, 0]).all()
    assert (out != -7.0).sum() == out.numel() - dim  # the class value only in its slot
    # round trip to the same grid is exact
    assert torch.equal(resample_pos_embed_grid(pe, (14, 14), (14, 14), cls_index=98), pe)


def test_pos_embed_cache(model):
    with torch.no_grad():
        a = model.pos_embed_for_grid((6, 10))
        b = model.pos_embed_for_grid((6, 10))
        assert a is b and a.shape == (1, 61, 32)
        model.load_state_dict(model.state_dict())  # in-place copy bumps the version
        c = model.pos_embed_for_grid((6, 10))
    assert c is not a
    torch.testing.assert_close(c, a)
    with torch.no_grad():
        model.pos_embed.add_(1.0)
        d = model.pos_embed_for_grid((6, 10))
        model.pos_embed.sub_(1.0)
    torch.testing.assert_close(d, a + 1.0)
    # with gradients enabled nothing is cached and the result is differentiable
    e = model.pos_embed_for_grid((6, 10))
    assert e.requires_grad


@pytest.mark.parametrize('hw', [(96, 160), (64, 64), (72, 120)])
def test_non_square_intermediates_have_the_right_strides(model, hw):
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        feats = model.forward_intermediates(x)
    gh, gw = model.patch_embed.grid(*hw)
    assert [tuple(f.shape) for f in feats] == [
        (2, 32, gh * 4, gw * 4), (2, 32, gh * 2, gw * 2), (2, 32, gh, gw),
        (2, 32, gh // 2, gw // 2)]
    assert all(torch.isfinite(f).all() and f.is_contiguous() for f in feats)


def test_intermediates_are_mixer_outputs_without_class_token(model):
    x = torch.randn(1, 3, 64, 96)
    grabbed = []
    hook = model.layers[2].mixer.register_forward_hook(lambda m, i, o: grabbed.append(o))
    try:
        with torch.no_grad():
            feats = model.forward_intermediates(x)
    finally:
        hook.remove()
    tokens = grabbed[0]  # (1, 4 * 6 + 1, 32); class token at 12
    gh, gw = model.patch_embed.grid(64, 96)
    expect = torch.cat((tokens[:, :12], tokens[:, 13:]), 1).transpose(1, 2).reshape(1, 32, gh, gw)
    torch.testing.assert_close(feats[2], expect)


def test_fpn_adapter_keys_and_shapes():
    m = create_model('vim_test', fpn=True).eval()
    keys = {k: tuple(v.shape) for k, v in m.state_dict().items() if k.startswith('fpn')}
    assert keys['fpn1.0.weight'] == (32, 32, 2, 2) and keys['fpn1.3.weight'] == (32, 32, 2, 2)
    assert keys['fpn1.1.running_mean'] == (32,) and keys['fpn2.0.weight'] == (32, 32, 2, 2)
    with torch.no_grad():
        feats = m.forward_intermediates(torch.randn(1, 3, 96, 160))
    assert [tuple(f.shape[-2:]) for f in feats] == [(24, 40), (12, 20), (6, 10), (3, 5)]


def test_stride8_variant_strides():
    torch.manual_seed(0)
    m = create_model('vim_test', stride=8).eval()
    assert m.pretrain_grid == (7, 7)
    with torch.no_grad():
        feats = m.forward_intermediates(torch.randn(1, 3, 64, 96))
    gh, gw = m.patch_embed.grid(64, 96)
    assert [tuple(f.shape[-2:]) for f in feats] == [
        (gh * 2, gw * 2), (gh, gw), (gh // 2, gw // 2), (gh // 4, gw // 4)]


def test_classification_uses_middle_class_token(model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        logits = model(x)
    assert tokens.shape == (2, 17, 32)
    torch.testing.assert_close(logits, model.head(tokens[:, 8]))


def test_mixer_matches_official_math():
    # Ours: one bidir_scan on the natural order with an anti-causal conv for the backward
    # branch. Official: a second branch on xz.flip(-1), flipped back. Same numbers.
    torch.manual_seed(0)
    mixer = BiMambaMixer(16, d_state=4).eval()
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name.endswith(('_b.bias', 'D_b', 'A_b_log', 'conv1d_b.weight')):
                p.add_(0.3 * torch.randn_like(p))  # make the two directions differ
        h = torch.randn(2, 11, 16)
        torch.testing.assert_close(mixer(h), bimamba_official(mixer, h), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_no_nan_and_fp32_residual(model, dtype):
    x = torch.randn(1, 3, 64, 96)
    seen = []
    hook = model.layers[1].register_forward_hook(lambda m, i, o: seen.append(o[1].dtype))
    try:
        with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
            feats = model.forward_intermediates(x)
            logits = model(x)
    finally:
        hook.remove()
    assert seen and all(d == torch.float32 for d in seen)
    assert all(torch.isfinite(f).all() for f in feats) and torch.isfinite(logits).all()
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(logits.float(), ref, atol=0.15, rtol=0.1)


def test_backward_reaches_both_directions():
    torch.manual_seed(0)
    m = create_model('vim_test', num_classes=3)
    m(torch.randn(2, 3, 64, 80)).sum().backward()
    mixer = m.layers[1].mixer
    for p in (mixer.A_log, mixer.A_b_log, mixer.conv1d_b.weight, mixer.x_proj_b.weight,
              mixer.D_b, m.pos_embed):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
