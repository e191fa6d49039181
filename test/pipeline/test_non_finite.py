"""Non-finite model output is reported per frame, never passed off as an empty scene (CPU).

The bundles are honest: fp16 overflow on saturated white frames (``fp16_overflow_bundle``)
and NaN weights in one head; no hook or test-only code path.
"""

from bundle_helpers import fp16_overflow_bundle
import numpy as np
import pytest
import torch

from mamba_perception.errors import MambaPerceptionError, NonFiniteOutputError
from mamba_perception.models.bundle import (
    Bundle,
    content_hash,
    create_random_bundle,
)
from mamba_perception.pipeline import Pipeline

ALL_OUTPUTS = ['detection scores', 'detection boxes', 'segmentation logits']


@pytest.fixture(scope='module')
def overflow_bundle():
    """In-memory det + seg bundle that outputs NaN under fp16 for saturated white frames."""
    return fp16_overflow_bundle(num_classes=3,
                                input_policy={'max_long_side_px': 256, 'max_short_side_px': 256})


def random_frame(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def white(h, w):
    return np.full((h, w, 3), 255, np.uint8)


def assert_same_result(a, b):
    assert (a.height_px, a.width_px) == (b.height_px, b.width_px)
    np.testing.assert_array_equal(a.class_mask, b.class_mask)
    np.testing.assert_allclose(a.detections.boxes_xyxy_px, b.detections.boxes_xyxy_px,
                               rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(a.detections.scores, b.detections.scores, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(a.detections.class_ids, b.detections.class_ids)


@pytest.fixture(scope='module')
def fp16_pipe(overflow_bundle):
    return Pipeline(overflow_bundle, precision='fp16', score_threshold=0.0)


def test_non_finite_frame_raises_and_the_next_frame_is_served(fp16_pipe):
    good, saturated = random_frame(96, 128, seed=1), white(96, 128)
    before = fp16_pipe(good)
    assert len(before.detections) > 0 and before.class_mask.shape == (96, 128)
    with pytest.raises(NonFiniteOutputError) as info:
        fp16_pipe(saturated)
    err = info.value
    assert isinstance(err, MambaPerceptionError)
    assert err.bad_frames == {0: ALL_OUTPUTS}
    assert err.results == [None]
    message = str(err)
    assert 'NaN or Inf' in message and 'frame 0' in message
    assert all(name in message for name in ALL_OUTPUTS)
    assert_same_result(fp16_pipe(good), before)  # the pipeline is unharmed


def test_fp32_does_not_overflow(overflow_bundle):
    """The same weights in fp32 give finite output on white: the check is no false alarm."""
    result = Pipeline(overflow_bundle, precision='fp32', score_threshold=0.0)(white(64, 64))
    assert result.class_mask.shape == (64, 64) and len(result.detections) > 0


def test_only_the_bad_frame_of_a_batch_fails(fp16_pipe):
    # frames 0-2 share one network input shape (one batch); frame 3 runs as another batch
    frames = [random_frame(96, 128, seed=2), white(96, 128), random_frame(96, 128, seed=3),
              random_frame(80, 200, seed=4)]
    alone = [fp16_pipe(f) for f in frames[:1] + frames[2:]]
    with pytest.raises(NonFiniteOutputError) as info:
        fp16_pipe.run(frames)
    err = info.value
    assert err.bad_frames == {1: ALL_OUTPUTS}
    assert 'frame 1' in str(err) and 'frame 0' not in str(err) and 'of 4 frame(s)' in str(err)
    assert len(err.results) == 4 and err.results[1] is None
    for got, expected in zip(err.results[:1] + err.results[2:], alone, strict=True):
        assert_same_result(got, expected)


def test_several_bad_frames_are_all_named(fp16_pipe):
    frames = [white(64, 64), random_frame(64, 64), white(100, 60)]
    with pytest.raises(NonFiniteOutputError) as info:
        fp16_pipe(frames)
    assert sorted(info.value.bad_frames) == [0, 2]
    assert info.value.results[1] is not None
    assert 'frame 0' in str(info.value) and 'frame 2' in str(info.value)


def bundle_with_nan(key):
    """Random det + seg bundle whose weight ``key`` is all NaN."""
    bundle = create_random_bundle(None, num_classes=3,
                                  input_policy={'max_long_side_px': 128,
                                                'max_short_side_px': 128})
    tensors = dict(bundle.tensors)
    tensors[key] = torch.full_like(tensors[key], float('nan'))
    meta = {k: v for k, v in bundle.metadata.items() if k != 'content_hash'}
    meta['content_hash'] = content_hash(tensors, meta)
    return Bundle(meta, tensors)


def test_nan_in_the_box_classifier_is_named_detection_scores():
    """NaN class logits in the RoI head: the threshold would drop every box; now it is named."""
    pipe = Pipeline(bundle_with_nan('detector.roi_heads.box_predictor.cls_score.weight'),
                    score_threshold=0.0)
    with pytest.raises(NonFiniteOutputError) as info:
        pipe(random_frame(64, 64))
    assert info.value.bad_frames == {0: ['detection scores']}


def test_nan_objectness_is_named_detection_scores():
    """NaN RPN objectness leaves no proposal, so no candidate to check: the dense part's
    per-frame flag names it."""
    pipe = Pipeline(bundle_with_nan('detector.rpn.head.cls_logits.weight'), score_threshold=0.0)
    with pytest.raises(NonFiniteOutputError) as info:
        pipe([random_frame(64, 64), random_frame(64, 64, seed=1)])
    assert info.value.bad_frames == {0: ['detection scores'], 1: ['detection scores']}


def test_segmentation_only_bundle_names_the_logits(tmp_path):
    path = tmp_path / 'seg.safetensors'
    fp16_overflow_bundle(path, tasks=('segmentation',), num_classes=3,
                         input_policy={'max_long_side_px': 128, 'max_short_side_px': 128})
    pipe = Pipeline(path, precision='fp16')
    assert pipe(random_frame(64, 64)).class_mask.shape == (64, 64)
    with pytest.raises(NonFiniteOutputError, match='segmentation logits') as info:
        pipe(white(64, 64))
    assert info.value.bad_frames == {0: ['segmentation logits']}
