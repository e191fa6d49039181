import pickle

from _model_test_utils import (
    fake_yacs,
    manifest_keys,
    save_vim_official,
    save_vmamba_official,
    synthetic_state_dict,
)
import pytest
import torch

from mamba_perception.errors import CheckpointError
from mamba_perception.models import create_model
from mamba_perception.models.checkpoint import (
    check_state_dict,
    describe_state_dict,
    extract_state_dict,
    load_checkpoint_file,
    load_official,
    load_state_dict_strict,
)


def _meta(name, **kw):
    with torch.device('meta'):
        return create_model(name, **kw)


# ---- strict loads of synthetic official checkpoints (official keys, shapes and containers)

@pytest.mark.parametrize('name', ['vmamba_tiny', 'vmamba_small', 'vmamba_base'])
def test_vmamba_official_container_loads_strictly(tmp_path, name):
    path = tmp_path / 'vssm.pth'
    save_vmamba_official(path, synthetic_state_dict(manifest_keys(name)))
    obj = load_checkpoint_file(path)  # without yacs installed: no yacs code needed
    assert obj['epoch'] == 264 and obj['config']['MODEL']['TYPE'] == 'vssm'
    load_official(_meta(name), path)


@pytest.mark.parametrize('name', ['vim_tiny', 'vim_small', 'vim_base', 'vim_small_plus'])
def test_vim_official_container_loads_strictly(tmp_path, name):
    path = tmp_path / 'vim.pth'
    save_vim_official(path, synthetic_state_dict(manifest_keys(name)))
    obj = load_checkpoint_file(path)
    assert obj['args'].input_size == 224  # argparse.Namespace is allow-listed
    load_official(_meta(name), path)


def test_values_land_in_the_right_parameters(tmp_path):
    model = _meta('vmamba_tiny')  # meta model: the loader assigns the checkpoint's tensors
    keys = manifest_keys('vmamba_tiny')
    path = tmp_path / 'vssm1_tiny_0230s_ckpt_epoch_264.pth'
    save_vmamba_official(path, synthetic_state_dict(keys))
    load_official(model, path)
    own = model.state_dict()
    for i, k in enumerate(keys):
        assert torch.all(own[k] == i / 1000.0), k


def test_backbone_from_mmdet_checkpoint(tmp_path):
    keys = manifest_keys('vmamba_small.backbone')
    sd = {'backbone.' + k: v for k, v in synthetic_state_dict(keys).items()}
    sd['neck.lateral_convs.0.conv.weight'] = torch.zeros(256, 96, 1, 1)
    path = tmp_path / 'mask_rcnn_vssm_fpn_coco_small_epoch_11.pth'
    torch.save({'state_dict': sd, 'meta': {'epoch': 11, 'iter': 1}}, path)
    load_official(_meta('vmamba_small', backbone=True), path, prefix='backbone.')


def test_imagenet_checkpoint_into_backbone_needs_explicit_outnorm_init(tmp_path):
    path = tmp_path / 'cls.pth'
    save_vmamba_official(path, synthetic_state_dict(manifest_keys('vmamba_tiny')))
    model = _meta('vmamba_tiny', backbone=True)
    with pytest.raises(CheckpointError, match=r"missing key 'outnorm0.weight' \(model \(96\)\)"):
        load_official(model, path)
    load_official(model, path, ignore_missing=('outnorm',))  # classifier.* dropped


def test_legacy_keys_are_renamed(tmp_path):
    keys = manifest_keys('vmamba_tiny')
    sd = synthetic_state_dict(keys)
    legacy = {}
    for k, v in sd.items():
        k = k.replace('patch_embed.0.', 'patch_embed.proj.').replace('patch_embed.2.',
                                                                   'patch_embed.norm.')
        k = k.replace('.blocks.0.norm.', '.blocks.0.ln_1.').replace('.op.', '.self_attention.')
        k = k.replace('classifier.norm.', 'norm.').replace('classifier.head.', 'head.')
        if k.endswith('op.in_proj.weight') or k.endswith('self_attention.in_proj.weight'):
            v = v[..., None, None]  # Linear2d weights saved as 1x1 conv kernels
        legacy[k] = v
    assert 'patch_embed.proj.weight' in legacy and 'head.weight' in legacy
    assert 'layers.0.blocks.0.ln_1.weight' in legacy
    assert 'layers.1.blocks.1.self_attention.A_logs' in legacy
    path = tmp_path / 'old.pth'
    save_vmamba_official(path, legacy)
    model = create_model('vmamba_test')  # real tensors, to check where values land
    keys_test = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd_test = synthetic_state_dict(keys_test)
    legacy_test = {k.replace('.op.', '.self_attention.').replace('classifier.head.', 'head.'): v
                   for k, v in sd_test.items()}
    torch.save({'model': legacy_test}, path)
    load_official(model, path)
    assert torch.all(model.layers[1].blocks[0].op.A_logs
                     == sd_test['layers.1.blocks.0.op.A_logs'])
    assert torch.all(model.classifier.head.bias == sd_test['classifier.head.bias'])


def test_legacy_tiny_checkpoint_loads(tmp_path):
    # the renames on a real-size key set
    keys = manifest_keys('vmamba_tiny')
    legacy = {}
    for k, v in synthetic_state_dict(keys).items():
        k = (k.replace('patch_embed.0.', 'patch_embed.proj.')
             .replace('patch_embed.2.', 'patch_embed.norm.')
             .replace('.op.', '.self_attention.')
             .replace('classifier.norm.', 'norm.').replace('classifier.head.', 'head.'))
        legacy[k] = v[..., None, None] if k.endswith('mlp.fc1.weight') else v
    path = tmp_path / 'legacy.pth'
    torch.save({'model': legacy}, path)
    load_official(_meta('vmamba_tiny'), path)


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    for name in ('vmamba_test', 'vim_test'):
        a = create_model(name).eval()
        path = tmp_path / f'{name}.pth'
        torch.save({'model': a.state_dict()}, path)
        b = create_model(name).eval()
        load_official(b, path)
        x = torch.randn(1, 3, 64, 96)
        with torch.no_grad():
            assert torch.equal(a(x), b(x))
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# ---- clear errors

def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    sd = synthetic_state_dict(manifest_keys('vmamba_tiny'))
    sd['layers.0.blocks.0.op.in_proj.weight'] = torch.zeros(192, 96)
    path = tmp_path / 'bad.pth'
    torch.save({'model': sd}, path)
    with pytest.raises(CheckpointError) as err:
        load_official(_meta('vmamba_tiny'), path)
    msg = str(err.value)
    assert ("shape mismatch for 'layers.0.blocks.0.op.in_proj.weight': "
            "checkpoint (192, 96) vs model (96, 96)") in msg
    assert str(path) in msg


def test_missing_key_is_named(tmp_path):
    sd = synthetic_state_dict(manifest_keys('vim_tiny'))
    del sd['layers.7.mixer.A_b_log']
    with pytest.raises(CheckpointError,
                       match=r"missing key 'layers.7.mixer.A_b_log' \(model \(384, 16\)\)"):
        load_state_dict_strict(_meta('vim_tiny'), sd)


def test_unexpected_key_is_named():
    sd = synthetic_state_dict(manifest_keys('vim_tiny'))
    sd['rope_x.freqs_cos'] = torch.zeros(196, 96)
    with pytest.raises(CheckpointError,
                       match=r"unexpected key 'rope_x.freqs_cos' \(checkpoint \(196, 96\)\)"):
        check_state_dict(_meta('vim_tiny'), sd)


def test_wrong_architecture_is_named(tmp_path):
    path = tmp_path / 'vssm_small_0229_ckpt_epoch_222.pth'
    save_vmamba_official(path, synthetic_state_dict(manifest_keys('vmamba_small')))
    with pytest.raises(CheckpointError) as err:
        load_official(_meta('vmamba_tiny'), path)
    msg = str(err.value)
    assert 'looks like VMamba (dims 96, depths 2-2-15-2, ssm_ratio 2.0, classifier) = ' \
           'vmamba_small' in msg
    assert 'the model is VMamba (dims 96, depths 2-2-8-2, ssm_ratio 1.0, classifier) = ' \
           'vmamba_tiny' in msg
    assert ("shape mismatch for 'layers.0.blocks.0.op.in_proj.weight': checkpoint (192, 96) "
            "vs model (96, 96)") in msg
    assert "unexpected key 'layers.2.blocks.8.norm.weight'" in msg

    path = tmp_path / 'vim_t_midclstok_76p1acc.pth'
    save_vim_official(path, synthetic_state_dict(manifest_keys('vim_tiny')))
    with pytest.raises(CheckpointError, match=r'looks like Vim \(embed_dim 192, depth 24, '
                                              r'197 position slots\) = vim_tiny'):
        load_official(_meta('vmamba_tiny'), path)
    with pytest.raises(CheckpointError, match="shape mismatch for 'pos_embed': checkpoint "
                                              r'\(1, 197, 192\) vs model \(1, 730, 192\)'):
        load_official(_meta('vim_tiny_plus'), path)


def test_describe_state_dict():
    assert describe_state_dict(manifest_keys('vim_small_plus')).endswith('= vim_small_plus')
    assert describe_state_dict(manifest_keys('vmamba_base.backbone')) == (
        'VMamba (dims 128, depths 2-2-15-2, ssm_ratio 2.0, backbone with outnorm0-3) = '
        'vmamba_base')


# ---- safe unpickling

class NotAllowed:
    def __init__(self):
        self.x = 1


class RunsCode:
    def __reduce__(self):
        import os
        return (os.getcwd, ())


@pytest.mark.parametrize('payload, name', [(NotAllowed(), 'NotAllowed'),
                                           (RunsCode(), 'getcwd')])
def test_non_allow_listed_globals_are_refused(tmp_path, payload, name):
    path = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'extra': payload}, path)
    with pytest.raises(CheckpointError, match=f'non-allow-listed global.*{name}'):
        load_checkpoint_file(path)


def test_plain_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps(RunsCode(), protocol=2))
    with pytest.raises(CheckpointError, match='refused'):
        load_checkpoint_file(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match='does not exist'):
        load_checkpoint_file(tmp_path / 'nope.pth')
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'not a checkpoint at all')
    with pytest.raises(CheckpointError, match='junk.pth'):
        load_checkpoint_file(junk)


def test_container_errors():
    with pytest.raises(CheckpointError, match="no entry 'model'.*'weights'"):
        extract_state_dict({'weights': {}}, key='model')
    with pytest.raises(CheckpointError, match='no state dict'):
        extract_state_dict({'epoch': 3, 'args': None})
    with pytest.raises(CheckpointError, match="entry 'epoch' is a int"):
        extract_state_dict({'model': {'epoch': 3}})
    sd = extract_state_dict({'model': {'module.a': torch.zeros(1)}})
    assert list(sd) == ['a']


def test_fake_yacs_is_removed_again():
    import sys
    with fake_yacs():
        assert 'yacs.config' in sys.modules
    try:
        import yacs  # noqa: F401
    except ImportError:
        assert 'yacs.config' not in sys.modules
