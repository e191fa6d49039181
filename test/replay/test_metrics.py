"""Metric accumulators against the reference implementations and hand-computed values."""

import contextlib
import io

from faster_coco_eval import COCO, COCOeval_faster
import numpy as np
import pytest
from replay_helpers import CLASSES, jitter_predictions

from mamba_perception.replay.metrics import (
    ConfusionMatrix,
    DetectionAccumulator,
    LatencyAccumulator,
    latency_stats,
    simulate_one_slot_drops,
)
from mamba_perception.results import Detections, StageTimes


def _dets(p):
    return Detections(np.asarray(p['boxes'], np.float32), np.asarray(p['scores'], np.float32),
                      np.asarray(p['class_ids'], np.int64))


def _direct_coco(truth, preds, sizes):
    """COCO dicts written independently of our code, evaluated with faster-coco-eval."""
    images, anns, res = [], [], []
    for i, (t, p, (h, w)) in enumerate(zip(truth, preds, sizes, strict=True), start=1):
        images.append({'id': i, 'height': h, 'width': w})
        for b, c in zip(t['boxes'], t['class_ids'], strict=True):
            anns.append({'id': len(anns) + 1, 'image_id': i, 'category_id': int(c) + 1,
                         'iscrowd': 0, 'area': float((b[2] - b[0]) * (b[3] - b[1])),
                         'bbox': [float(b[0]), float(b[1]), float(b[2] - b[0]),
                                  float(b[3] - b[1])]})
        for b, c, s in zip(np.asarray(p['boxes'], np.float32), p['class_ids'],
                           np.asarray(p['scores'], np.float32), strict=True):
            res.append({'image_id': i, 'category_id': int(c) + 1, 'score': float(s),
                        'bbox': [float(b[0]), float(b[1]), float(b[2] - b[0]),
                                 float(b[3] - b[1])]})
    gt = {'images': images, 'annotations': anns,
          'categories': [{'id': k + 1, 'name': n} for k, n in enumerate(CLASSES)]}
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO(gt)
        ev = COCOeval_faster(cg, cg.loadRes(res), 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _fill(acc, truth, preds, sizes):
    for t, p, (h, w) in zip(truth, preds, sizes, strict=True):
        acc.add(h, w, t['boxes'], t['class_ids'], _dets(p))


def test_detection_equals_faster_coco_eval_run_directly(frames, truth):
    preds = jitter_predictions(truth)
    sizes = [rgb.shape[:2] for _n, rgb in frames]
    acc = DetectionAccumulator(CLASSES)
    _fill(acc, truth, preds, sizes)
    summary = acc.summary()
    ev = _direct_coco(truth, preds, sizes)
    assert summary['backend'] == 'faster_coco_eval'
    assert 0.0 < summary['mAP'] < 1.0
    assert summary['mAP'] == pytest.approx(ev.stats[0], abs=1e-12)
    assert summary['AP50'] == pytest.approx(ev.stats[1], abs=1e-12)
    assert summary['AP75'] == pytest.approx(ev.stats[2], abs=1e-12)
    prec = np.asarray(ev.eval['precision'])
    for k, name in enumerate(CLASSES):
        p = prec[:, :, k, 0, -1]
        expected = p[p > -1].mean() if (p > -1).any() else None
        got = summary['per_class'][name]['AP']
        assert (got is None and expected is None) or got == pytest.approx(expected, abs=1e-12)
    assert summary['gt_boxes'] == sum(len(t['class_ids']) for t in truth)


def test_detection_equals_pycocotools_when_installed(frames, truth):
    pytest.importorskip('pycocotools')
    preds = jitter_predictions(truth)
    sizes = [rgb.shape[:2] for _n, rgb in frames]
    acc = DetectionAccumulator(CLASSES)
    _fill(acc, truth, preds, sizes)
    assert acc.summary('pycocotools')['mAP'] == pytest.approx(acc.summary()['mAP'], abs=1e-9)


def test_perfect_predictions_give_map_1_and_miou_1(frames, truth):
    acc = DetectionAccumulator(CLASSES)
    cm = ConfusionMatrix(len(CLASSES))
    for (_n, rgb), t in zip(frames, truth, strict=True):
        perfect = {'boxes': t['boxes'], 'class_ids': t['class_ids'],
                   'scores': np.ones(len(t['class_ids']))}
        acc.add(*rgb.shape[:2], t['boxes'], t['class_ids'], _dets(perfect))
        pred = t['mask'].copy()
        pred[pred == 255] = 0
        cm.add(t['mask'], pred)
    s = acc.summary()
    assert s['mAP'] == pytest.approx(1.0) and s['AP50'] == pytest.approx(1.0)
    seg = cm.summary(CLASSES)
    assert seg['mIoU'] == pytest.approx(1.0)
    assert seg['ignored_pixels'] == sum(int((t['mask'] == 255).sum()) for t in truth)


def test_miou_against_hand_computed_confusion_matrix():
    gt = np.array([[0, 0, 1, 1],
                   [0, 2, 1, 255],
                   [2, 2, 2, 255]], np.uint8)
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 2, 0],
                     [2, 2, 0, 1]], np.uint8)
    cm = ConfusionMatrix(4)
    cm.add(gt, pred)
    # rows = gt, cols = pred, over the 10 non-ignored pixels
    expected = np.array([[2, 1, 0, 0],
                         [0, 2, 1, 0],
                         [1, 0, 3, 0],
                         [0, 0, 0, 0]])
    np.testing.assert_array_equal(cm.matrix, expected)
    # IoU = TP / (row + col - TP): class 0: 2/(3+3-2), class 1: 2/(3+3-2), class 2: 3/(4+4-3)
    iou = cm.iou()
    np.testing.assert_allclose(iou[:3], [2 / 4, 2 / 4, 3 / 5])
    assert np.isnan(iou[3])  # in neither: not part of the mean
    s = cm.summary(['a', 'b', 'c', 'd'])
    assert s['mIoU'] == pytest.approx((0.5 + 0.5 + 0.6) / 3)
    assert s['pixel_accuracy'] == pytest.approx(7 / 10)
    assert s['ignored_pixels'] == 2 and s['per_class']['d']['IoU'] is None


def test_confusion_matrix_counts_out_of_range_truth_and_rejects_bad_predictions():
    cm = ConfusionMatrix(2)
    cm.add(np.array([[0, 7]], np.uint8), np.array([[0, 1]], np.uint8))
    assert cm.invalid_gt_pixels == 1 and cm.matrix.sum() == 1
    with pytest.raises(ValueError, match='predicted class id 5'):
        cm.add(np.zeros((1, 2), np.uint8), np.array([[0, 5]], np.uint8))
    with pytest.raises(ValueError, match='differ in size'):
        cm.add(np.zeros((2, 2), np.uint8), np.zeros((1, 2), np.uint8))


def test_merging_accumulates_and_is_not_an_average(frames, truth):
    preds = jitter_predictions(truth)
    sizes = [rgb.shape[:2] for _n, rgb in frames]
    a, b, whole = (DetectionAccumulator(CLASSES) for _ in range(3))
    _fill(a, truth[:2], preds[:2], sizes[:2])
    _fill(b, truth[2:], preds[2:], sizes[2:])
    _fill(whole, truth, preds, sizes)
    map_a, map_b = a.summary()['mAP'], b.summary()['mAP']
    a.merge(b)
    assert a.summary()['mAP'] == pytest.approx(whole.summary()['mAP'], abs=1e-12)
    assert a.summary()['mAP'] != pytest.approx((map_a + map_b) / 2, abs=1e-6)
    c1, c2, c = ConfusionMatrix(3), ConfusionMatrix(3), ConfusionMatrix(3)
    for i, t in enumerate(truth):
        (c1 if i < 2 else c2).add(t['mask'], preds[i]['mask'])
        c.add(t['mask'], preds[i]['mask'])
    c1.merge(c2)
    np.testing.assert_array_equal(c1.matrix, c.matrix)


def test_detection_without_predictions_or_truth():
    acc = DetectionAccumulator(CLASSES)
    assert acc.summary()['mAP'] is None  # nothing to evaluate: not defined, not zero
    acc.add(10, 10, np.array([[1, 1, 5, 5]]), np.array([1]), None)
    s = acc.summary()
    assert s['mAP'] == 0.0 and s['per_class']['car']['AP'] == 0.0
    assert s['per_class']['person']['AP'] is None


def test_latency_percentiles_and_merge():
    acc, other = LatencyAccumulator(), LatencyAccumulator()
    for i in range(10):
        acc.add(StageTimes(preprocess_ms=1.0, inference_ms=float(i)))
    other.add(StageTimes(inference_ms=100.0))
    acc.merge(other)
    s = acc.summary()
    values = [float(i) for i in range(10)] + [100.0]
    assert s['inference_ms']['count'] == 11
    assert s['inference_ms']['p50_ms'] == pytest.approx(np.percentile(values, 50))
    assert s['inference_ms']['p99_ms'] == pytest.approx(np.percentile(values, 99))
    assert s['inference_ms']['max_ms'] == 100.0
    assert s['total_ms']['max_ms'] == 100.0
    assert latency_stats([])['p50_ms'] is None


def test_one_slot_drop_simulation():
    ms = 1_000_000
    # frames every 10 ms, each takes 25 ms: the worker takes 0; 1 waits, 2 replaces 1 (drop);
    # at 25 ms the worker takes 2; 3 waits, 4 replaces 3 (drop); at 50 ms it takes 4.
    out = simulate_one_slot_drops([0, 10 * ms, 20 * ms, 30 * ms, 40 * ms], [25.0] * 5)
    assert out == {'frames': 5, 'dropped_frames': 2, 'drop_rate': 0.4}
    assert simulate_one_slot_drops([0, 100 * ms], [5.0, 5.0])['dropped_frames'] == 0
