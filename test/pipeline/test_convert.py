"""Converters against key/shape manifests of the official checkpoints, and the CLI end to end.

The manifests (test/pipeline/manifests/*.json) list every key and shape of the official
VMamba-T mmdet Mask R-CNN and mmseg UperNet checkpoints, built from the official configs (they
name the repository and commit); the conversions run on meta tensors, so no weights are needed.
"""

import copy
import functools
import json
import os
from pathlib import Path
import re

import pytest
import torch

from mamba_perception.errors import CheckpointError, ParameterError
from mamba_perception.models.bundle import check_state_dict, load_bundle
from mamba_perception.models.convert import (
    convert_mmdet_state_dict,
    convert_mmseg_state_dict,
    main,
)
from mamba_perception.models.heads import PerceptionModel, build_perception_model

MANIFESTS = Path(__file__).parent / 'manifests'


def manifest_state_dict(name):
    data = json.loads((MANIFESTS / name).read_text())
    assert data['sources'], 'a manifest must say where its layout came from'
    return data['backbone'], {k: torch.empty(shape, device='meta') for k, shape in data['keys']}


@functools.lru_cache(maxsize=None)
def _meta_backbone(name):
    return build_perception_model({'backbone': {'name': name, 'kwargs': {'backbone': True}}},
                                  device='meta').backbone


def meta_model(config):
    """Weightless model for key/shape checks; each backbone is built once per session."""
    backbone = copy.deepcopy(_meta_backbone(config['backbone']['name']))
    with torch.device('meta'):
        return PerceptionModel(backbone, config.get('detection'), config.get('segmentation'))


def test_mmdet_manifest_converts_onto_our_mask_rcnn():
    backbone, sd = manifest_state_dict('mmdet_mask_rcnn_vmamba_tiny_coco.json')
    state, det = convert_mmdet_state_dict(sd, backbone)
    assert det == dict(num_classes=80, fpn_channels=256, representation_size=1024,
                       with_mask=True, mask_channels=256)
    model = meta_model({'backbone': {'name': backbone, 'kwargs': {'backbone': True}},
                        'detection': det})
    check_state_dict(model, state)  # every key and shape, both ways
    pre = 'detector.roi_heads.'
    assert state[pre + 'box_predictor.cls_score.weight'].shape == (81, 1024)
    assert state[pre + 'box_predictor.bbox_pred.weight'].shape == (324, 1024)
    assert state[pre + 'mask_predictor.mask_fcn_logits.weight'].shape == (81, 256, 1, 1)


@pytest.mark.parametrize('keep_auxiliary', [False, True])
def test_mmseg_manifest_converts_onto_our_upernet(keep_auxiliary):
    backbone, sd = manifest_state_dict('mmseg_upernet_vmamba_tiny_ade20k.json')
    state, seg = convert_mmseg_state_dict(sd, backbone, keep_auxiliary=keep_auxiliary)
    assert seg['num_classes'] == 150 and seg['channels'] == 512
    assert seg.get('auxiliary', False) == keep_auxiliary
    model = meta_model({'backbone': {'name': backbone, 'kwargs': {'backbone': True}},
                        'segmentation': seg})
    check_state_dict(model, state)
    assert any(k.startswith('auxiliary_head.') for k in state) == keep_auxiliary


def test_mmdet_class_order_and_background_rows():
    _, sd = manifest_state_dict('mmdet_mask_rcnn_vmamba_tiny_coco.json')
    sd = {k: torch.zeros(v.shape) for k, v in sd.items()}
    fc_cls = torch.arange(81, dtype=torch.float32)[:, None].repeat(1, 1024)  # row i = i
    sd['roi_head.bbox_head.fc_cls.weight'] = fc_cls
    sd['roi_head.bbox_head.fc_cls.bias'] = torch.arange(81, dtype=torch.float32)
    sd['roi_head.bbox_head.fc_reg.bias'] = torch.arange(320, dtype=torch.float32) + 1
    sd['roi_head.mask_head.conv_logits.bias'] = torch.arange(80, dtype=torch.float32) + 1
    state, _ = convert_mmdet_state_dict(sd, 'vmamba_tiny')
    pre = 'detector.roi_heads.'
    # background (mmdet row 80) first, then the 80 classes in order
    assert state[pre + 'box_predictor.cls_score.bias'].tolist() == [80.0, *range(80)]
    assert state[pre + 'box_predictor.cls_score.weight'][:, 0].tolist() == [80.0, *range(80)]
    reg = state[pre + 'box_predictor.bbox_pred.bias']
    assert reg[:4].tolist() == [0, 0, 0, 0] and reg[4:].tolist() == list(range(1, 321))
    logits = state[pre + 'mask_predictor.mask_fcn_logits.bias']
    assert logits.tolist() == [0.0, *range(1, 81)]


def test_class_agnostic_regression_is_repeated():
    _, sd = manifest_state_dict('mmdet_mask_rcnn_vmamba_tiny_coco.json')
    sd = {k: torch.zeros(v.shape) for k, v in sd.items()}
    sd['roi_head.bbox_head.fc_reg.weight'] = torch.randn(4, 1024)
    sd['roi_head.bbox_head.fc_reg.bias'] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    state, _ = convert_mmdet_state_dict(sd, 'vmamba_tiny')
    bias = state['detector.roi_heads.box_predictor.bbox_pred.bias']
    assert bias.shape == (324,) and bias[4:8].tolist() == [1, 2, 3, 4]
    assert bias[-4:].tolist() == [1, 2, 3, 4]


def test_unknown_and_missing_keys_are_named():
    backbone, sd = manifest_state_dict('mmdet_mask_rcnn_vmamba_tiny_coco.json')
    with pytest.raises(CheckpointError, match='roi_head.bbox_head.fc_iou.weight'):
        convert_mmdet_state_dict({**sd, 'roi_head.bbox_head.fc_iou.weight': sd[
            'roi_head.bbox_head.fc_cls.weight']}, backbone)
    no_backbone = {k: v for k, v in sd.items() if not k.startswith('backbone.')}
    with pytest.raises(CheckpointError, match="no 'backbone"):
        convert_mmdet_state_dict(no_backbone, backbone)
    # A wrong backbone size is caught by the strict check, with key and both shapes.
    state, det = convert_mmdet_state_dict(sd, backbone)
    wrong = meta_model({'backbone': {'name': 'vmamba_test', 'kwargs': {'backbone': True}},
                        'detection': det})
    with pytest.raises(CheckpointError, match=r'layers\.0\.blocks\.0\.op\.in_proj\.weight: '
                                              r'.* \(96, 96\), model expects \(32, 16\)'):
        check_state_dict(wrong, state)


# -- the command line on tiny checkpoints --------------------------------------------------

# Our layout -> mmdet layout, written independently of the converter's table.
TO_MMDET = [
    (r'^detector\.neck\.inner_blocks\.(\d)\.0\.', r'neck.lateral_convs.\1.conv.'),
    (r'^detector\.neck\.layer_blocks\.(\d)\.0\.', r'neck.fpn_convs.\1.conv.'),
    (r'^detector\.rpn\.head\.conv\.0\.0\.', 'rpn_head.rpn_conv.'),
    (r'^detector\.rpn\.head\.cls_logits\.', 'rpn_head.rpn_cls.'),
    (r'^detector\.rpn\.head\.bbox_pred\.', 'rpn_head.rpn_reg.'),
    (r'^detector\.roi_heads\.box_head\.fc6\.', 'roi_head.bbox_head.shared_fcs.0.'),
    (r'^detector\.roi_heads\.box_head\.fc7\.', 'roi_head.bbox_head.shared_fcs.1.'),
    (r'^detector\.roi_heads\.box_predictor\.cls_score\.', 'roi_head.bbox_head.fc_cls.'),
    (r'^detector\.roi_heads\.box_predictor\.bbox_pred\.', 'roi_head.bbox_head.fc_reg.'),
    (r'^detector\.roi_heads\.mask_head\.(\d)\.0\.', r'roi_head.mask_head.convs.\1.conv.'),
    (r'^detector\.roi_heads\.mask_predictor\.conv5_mask\.', 'roi_head.mask_head.upsample.'),
    (r'^detector\.roi_heads\.mask_predictor\.mask_fcn_logits\.',
     'roi_head.mask_head.conv_logits.'),
]


def to_mmdet(state):
    out = {}
    for key, value in state.items():
        for pattern, repl in TO_MMDET:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        if key.endswith(('fc_cls.weight', 'fc_cls.bias')):
            value = torch.cat([value[1:], value[:1]])  # background last
        elif key.endswith(('fc_reg.weight', 'fc_reg.bias')):
            value = value[4:]
        elif key.endswith(('conv_logits.weight', 'conv_logits.bias')):
            value = value[1:]
        out[key] = value
    return out


def write_classes(tmp_path, n):
    path = tmp_path / 'classes.txt'
    path.write_text(''.join(f'thing{i}\n' for i in range(n)))
    return str(path)


def test_convert_cli_mmdet_round_trip(tmp_path, capsys):
    from mamba_perception.models.bundle import create_random_bundle
    original = create_random_bundle(tasks=('detection',), num_classes=4, seed=7)
    state = {k: v.clone() for k, v in original.tensors.items()}
    pre = 'detector.roi_heads.'
    for key in (pre + 'box_predictor.bbox_pred.weight', pre + 'box_predictor.bbox_pred.bias'):
        state[key][:4] = 0  # mmdet has no background box; the converter writes zeros
    for key in (pre + 'mask_predictor.mask_fcn_logits.weight',
                pre + 'mask_predictor.mask_fcn_logits.bias'):
        state[key][:1] = 0
    src = tmp_path / 'det.pth'
    torch.save({'meta': {'epoch': 12, 'mmdet_version': '3.3.0'}, 'state_dict': to_mmdet(state)},
               src)
    dst = tmp_path / 'det.safetensors'
    assert main(['mmdet', str(src), str(dst), '--backbone', 'vmamba_test',
                 '--classes', write_classes(tmp_path, 4)]) == 0
    assert 'wrote' in capsys.readouterr().out
    bundle = load_bundle(dst)
    assert bundle.class_names == ['thing0', 'thing1', 'thing2', 'thing3']
    assert bundle.tasks == ('detection',) and not bundle.random_init
    assert bundle.metadata['source']['kind'] == 'mmdet'
    assert bundle.metadata['input']['max_short_side_px'] == 800
    for key, value in state.items():
        assert torch.equal(bundle.tensors[key], value), key
    bundle.build_model()


def test_convert_cli_mmseg_and_class_count_check(tmp_path, capsys):
    from mamba_perception.models.bundle import create_random_bundle
    original = create_random_bundle(tasks=('segmentation',), num_classes=5, seed=8)
    src = tmp_path / 'seg.pth'
    torch.save({'state_dict': dict(original.tensors)}, src)
    dst = tmp_path / 'seg.safetensors'
    # 5 classes are not ADE20K's 150: the names must be given
    assert main(['mmseg', str(src), str(dst), '--backbone', 'vmamba_test']) == 1
    assert 'pass --classes' in capsys.readouterr().err
    assert main(['mmseg', str(src), str(dst), '--backbone', 'vmamba_test',
                 '--classes', write_classes(tmp_path, 5)]) == 0
    bundle = load_bundle(dst)
    assert all(torch.equal(bundle.tensors[k], v) for k, v in original.tensors.items())


def test_convert_cli_classification_gives_backbone_bundle(tmp_path):
    from mamba_perception.models import create_model
    from mamba_perception.pipeline import Pipeline
    torch.manual_seed(0)
    classifier = create_model('vmamba_test')  # official classification layout
    src = tmp_path / 'cls.pth'
    torch.save({'model': classifier.state_dict(), 'epoch': 300}, src)
    dst = tmp_path / 'cls.safetensors'
    assert main(['classification', str(src), str(dst), '--backbone', 'vmamba_test']) == 0
    bundle = load_bundle(dst)
    assert bundle.tasks == () and bundle.class_names == []
    assert not any('classifier' in k for k in bundle.tensors)
    for key, value in classifier.state_dict().items():
        if not key.startswith('classifier.'):
            assert torch.equal(bundle.tensors['backbone.' + key], value), key
    assert torch.equal(bundle.tensors['backbone.outnorm0.weight'], torch.ones(16))
    with pytest.raises(ParameterError, match='backbone-only bundle'):
        Pipeline(bundle)


def test_convert_refuses_unsafe_pickles(tmp_path, capsys):
    marker = tmp_path / 'pwned'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    src = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'x': Payload()}, src)
    assert main(['mmdet', str(src), str(tmp_path / 'out.safetensors'),
                 '--backbone', 'vmamba_test']) == 1
    assert 'refused' in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / 'out.safetensors').exists()
