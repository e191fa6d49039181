"""Bundle round trip, content hash, and refusal of tampered or mismatched bundles."""

import json
import os
import pickle

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
import torch

from mamba_perception.errors import BundleError
from mamba_perception.models.bundle import (
    METADATA_KEY,
    Bundle,
    content_hash,
    create_random_bundle,
    load_bundle,
    save_bundle,
)


def _rewrite(path, tensors=None, meta=None, rehash=False):
    """Rewrite a bundle file with edited tensors / metadata (optionally with a valid hash)."""
    from safetensors import safe_open
    with safe_open(str(path), 'pt') as f:
        old_meta = json.loads(f.metadata()[METADATA_KEY])
    tensors = tensors if tensors is not None else load_file(str(path))
    meta = meta if meta is not None else old_meta
    if rehash:
        meta['content_hash'] = content_hash(tensors, meta)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})


def test_round_trip(tmp_path, bundle_path):
    bundle = load_bundle(bundle_path)
    assert bundle.tasks == ('detection', 'segmentation')
    assert bundle.class_names == ['class_0', 'class_1', 'class_2']
    assert bundle.class_colors.shape == (3, 3) and bundle.class_colors.dtype == np.uint8
    assert bundle.content_hash.startswith('sha256:') and len(bundle.content_hash) == 71
    copy = save_bundle(tmp_path / 'copy.safetensors', bundle.tensors, bundle.metadata)
    again = load_bundle(copy.path)
    assert again.content_hash == bundle.content_hash
    assert again.metadata == bundle.metadata
    assert all(torch.equal(again.tensors[k], v) for k, v in bundle.tensors.items())
    model = again.build_model()
    assert not model.training and model.tasks == ('detection', 'segmentation')
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in bundle.tensors.items())


def test_random_bundle_says_so(bundle_path, caplog):
    with caplog.at_level('WARNING'):
        bundle = load_bundle(bundle_path)
    assert bundle.random_init and bundle.metadata['random_init'] is True
    assert 'RANDOM' in bundle.metadata['trained_on'] and 'RANDOM' in bundle.metadata['WARNING']
    assert 'RANDOM-INITIALISED' in caplog.text
    assert 'RANDOM-INIT' in bundle.name
    # Same seed, same weights, same hash (created_utc aside, the tensors match).
    a = create_random_bundle(num_classes=2, tasks=('segmentation',), seed=3)
    b = create_random_bundle(num_classes=2, tasks=('segmentation',), seed=3)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_tampered_tensor_is_refused(tmp_path, bundle_path):
    path = tmp_path / 'tampered.safetensors'
    path.write_bytes(bundle_path.read_bytes())
    tensors = load_file(str(path))
    key = 'decode_head.conv_seg.bias'
    tensors[key] = tensors[key] + 1e-3
    _rewrite(path, tensors=tensors)
    with pytest.raises(BundleError, match='content hash mismatch'):
        load_bundle(path)
    assert load_bundle(path, verify=False).tensors[key].shape == (3,)


def test_flipped_byte_is_refused(tmp_path, bundle_path):
    data = bytearray(bundle_path.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's bytes
    path = tmp_path / 'flipped.safetensors'
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match='content hash mismatch'):
        load_bundle(path)


def test_tampered_metadata_is_refused(tmp_path, bundle_path):
    path = tmp_path / 'meta.safetensors'
    path.write_bytes(bundle_path.read_bytes())
    meta = load_bundle(bundle_path).metadata
    meta['classes']['names'][0] = 'pedestrian'
    _rewrite(path, meta=meta)
    with pytest.raises(BundleError, match='content hash mismatch'):
        load_bundle(path)


@pytest.mark.parametrize('edit, message', [
    (lambda m: m.pop('input'), "metadata key 'input' is missing"),
    (lambda m: m.update(format_version=99), "'format_version' is 99"),
    (lambda m: m['classes']['names'].pop(), "'config.detection.num_classes' is 3 but "
                                            "'classes.names' has 2 names"),
    (lambda m: m['input'].update(std=[1.0, 0.0, 1.0]), "'input.std' must be positive"),
    (lambda m: m.update(tasks=['segmentation']), "'tasks' is \\['segmentation'\\]"),
])
def test_malformed_metadata_names_the_key(tmp_path, bundle_path, edit, message):
    path = tmp_path / 'bad.safetensors'
    path.write_bytes(bundle_path.read_bytes())
    meta = load_bundle(bundle_path).metadata
    edit(meta)
    _rewrite(path, meta=meta, rehash=True)
    with pytest.raises(BundleError, match=message):
        load_bundle(path)


def test_mismatched_weights_name_key_and_shapes(tmp_path, bundle_path):
    """A consistent (re-hashed) bundle whose tensors do not fit its own config."""
    path = tmp_path / 'mismatch.safetensors'
    tensors = load_file(str(bundle_path))
    tensors['decode_head.conv_seg.weight'] = torch.zeros(5, 32, 1, 1)
    del tensors['detector.neck.layer_blocks.0.0.bias']
    tensors['detector.extra.weight'] = torch.zeros(1)
    path.write_bytes(bundle_path.read_bytes())
    _rewrite(path, tensors=tensors, rehash=True)
    bundle = load_bundle(path)  # the file itself is intact ...
    with pytest.raises(BundleError) as info:
        bundle.build_model()  # ... but it does not fit the architecture it describes
    text = str(info.value)
    assert 'decode_head.conv_seg.weight: ' in text and '(5, 32, 1, 1)' in text
    assert '(3, 32, 1, 1)' in text
    assert 'missing from' in text and 'detector.neck.layer_blocks.0.0.bias' in text
    assert 'unexpected in' in text and 'detector.extra.weight' in text


def test_unknown_backbone_is_a_bundle_error(bundle_path):
    bundle = load_bundle(bundle_path)
    meta = json.loads(json.dumps(bundle.metadata))
    meta['config']['backbone']['name'] = 'resnet50'
    with pytest.raises(BundleError, match='cannot build a model'):
        Bundle(meta, bundle.tensors).build_model()


def test_pickles_are_refused_without_running_them(tmp_path):
    marker = tmp_path / 'pwned'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    path = tmp_path / 'evil.safetensors'
    path.write_bytes(pickle.dumps({'state_dict': Payload()}))
    with pytest.raises(BundleError, match='not a readable safetensors file'):
        load_bundle(path)
    assert not marker.exists()


def test_plain_safetensors_and_missing_file(tmp_path):
    path = tmp_path / 'plain.safetensors'
    save_file({'w': torch.zeros(2)}, str(path))
    with pytest.raises(BundleError, match='not a mamba_perception bundle'):
        load_bundle(path)
    with pytest.raises(BundleError, match='no such bundle file'):
        load_bundle(tmp_path / 'nope.safetensors')
