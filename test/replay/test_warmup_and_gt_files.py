"""Warm-up before timing, and ground truth from COCO JSON / PNG mask files."""

import json

import cv2
import numpy as np
import pytest
from replay_helpers import (
    CAMERA,
    CLASSES,
    GT_DETS,
    GT_MASK,
    Oracle,
    OracleFactory,
    jitter_predictions,
    write_bag,
)

from mamba_perception.errors import ParameterError
from mamba_perception.replay import cli, sample
from mamba_perception.replay.evaluate import load_coco_truth

GT_TOPICS = dict(gt_detections=[GT_DETS], gt_masks=[GT_MASK])


def _run(bags, out, predictions, frames, **kw):
    return cli.run_replay(bags, None, out, predictor_factory=OracleFactory(frames, predictions),
                          progress=False, hash_bags=False, **kw)


# -- warm-up --------------------------------------------------------------------------------

def _spied_pipeline(bundle, events):
    """A real Pipeline whose warmup / run calls are logged (run inside warmup is not timed)."""
    pipe = cli.make_pipeline(bundle)
    warmup, run = pipe.warmup, pipe.run
    inside = []

    def spy_warmup(sizes, iterations=2):
        events.append(('warmup', [tuple(s) for s in sizes], iterations))
        inside.append(True)
        try:
            return warmup(sizes, iterations)
        finally:
            inside.pop()

    def spy_run(frames):
        if not inside:
            events.append(('timed', tuple(frames[0].shape[:2])))
        return run(frames)

    pipe.warmup, pipe.run = spy_warmup, spy_run
    return pipe


def test_pipeline_is_warmed_up_on_each_size_before_its_first_timed_frame(tmp_path, frames,
                                                                         truth):
    from mamba_perception.models.bundle import create_random_bundle
    bundle = tmp_path / 'random.safetensors'
    create_random_bundle(bundle, backbone='vmamba_test', class_names=CLASSES)
    def resized(pairs, w, h):
        return [(n, np.ascontiguousarray(cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)))
                for n, rgb in pairs]

    bag = write_bag(tmp_path / 'two_sizes', resized(frames[:2], 64, 48) +
                    resized(frames[2:4], 48, 32), truth[:4], with_dets=False, with_mask=False)
    events = []
    res = cli.run_replay([bag], bundle, tmp_path / 'r', progress=False, hash_bags=False,
                         warmup_iterations=1,
                         predictor_factory=lambda device: _spied_pipeline(bundle, events))
    assert res.exit_code == 0
    big, small = (48, 64), (32, 48)
    assert events == [('warmup', [big], 1), ('timed', big), ('timed', big),
                      ('warmup', [small], 1), ('timed', small), ('timed', small)]
    r = res.report
    assert r['latency_ms']['total_ms']['count'] == 4  # warm-up runs are not in the latencies
    w = r['provenance']['warmup']
    assert w['iterations'] == 1 and w['sizes_hw_px'] == [list(big), list(small)]
    assert w['seconds'] > 0 and 'before' in w['policy']
    assert r['bags'][0]['warmup_sizes_hw_px'] == [list(big), list(small)]
    assert 'warm-up before timing: 1 run(s)' in (tmp_path / 'r' / 'report.md').read_text()


class WarmableOracle(Oracle):
    """An oracle with the Pipeline's warmup signature, logging the calls."""

    def __init__(self, frames, predictions, log):
        super().__init__(frames, predictions)
        self.log = log

    def warmup(self, sizes, iterations=2):
        self.log.append(('warmup', [tuple(s) for s in sizes], iterations, self.calls))


def test_a_size_is_warmed_once_across_bags_and_warmup_can_be_off(tmp_path, frames, truth):
    a = write_bag(tmp_path / 'a', frames[:2], truth[:2])
    b = write_bag(tmp_path / 'b', frames[2:], truth[2:], 'sqlite3')
    log = []
    res = cli.run_replay([a, b], None, tmp_path / 'r', progress=False, hash_bags=False,
                         predictor_factory=lambda d: WarmableOracle(frames, truth, log),
                         **GT_TOPICS)
    size = tuple(frames[0][1].shape[:2])
    assert log == [('warmup', [size], 2, 0)]  # before the first frame (0 calls), only once
    assert res.report['provenance']['warmup']['sizes_hw_px'] == [list(size)]
    assert res.report['detection']['mAP'] == pytest.approx(1.0)
    log.clear()
    res = cli.run_replay([a], None, tmp_path / 'r0', progress=False, hash_bags=False,
                         warmup_iterations=0, topics=[CAMERA],
                         predictor_factory=lambda d: WarmableOracle(frames, truth, log))
    assert log == [] and res.report['provenance']['warmup']['sizes_hw_px'] == []
    plain = _run([a], tmp_path / 'r1', truth, frames, topics=[CAMERA]).report  # no warmup()
    assert plain['provenance']['warmup']['policy'].startswith('none')


# -- ground truth from files ----------------------------------------------------------------

def _write_coco(path, frames, truth, key):
    images, anns = [], []
    for i, ((number, rgb), t) in enumerate(zip(frames, truth, strict=True)):
        img = {'id': 100 + i, 'width': rgb.shape[1], 'height': rgb.shape[0],
               'file_name': f'{number}.png'}
        if key == 'index':
            img['frame_index'] = i
        else:
            img['stamp_ns'] = sample.frame_stamp_ns(number)
        images.append(img)
        for box, cid in zip(t['boxes'], t['class_ids'], strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            anns.append({'id': len(anns) + 1, 'image_id': 100 + i, 'category_id': int(cid) + 1,
                         'bbox': [x1, y1, x2 - x1, y2 - y1], 'area': (x2 - x1) * (y2 - y1),
                         'iscrowd': 0})
    cats = [{'id': i + 1, 'name': n} for i, n in enumerate(CLASSES)]
    path.write_text(json.dumps({'images': images, 'annotations': anns, 'categories': cats}))
    return path


def _write_masks(folder, frames, truth, key):
    folder.mkdir()
    for i, ((number, _rgb), t) in enumerate(zip(frames, truth, strict=True)):
        name = i if key == 'index' else sample.frame_stamp_ns(number)
        assert cv2.imwrite(str(folder / f'{name}.png'), t['mask'])
    return folder


@pytest.fixture(scope='module')
def frames_only_bag(tmp_path_factory, frames, truth):
    return write_bag(tmp_path_factory.mktemp('bags') / 'frames_only', frames, truth,
                     with_dets=False, with_mask=False)


@pytest.mark.parametrize('key', ['index', 'stamp'])
def test_gt_from_coco_json_and_png_masks(tmp_path, key, frames, truth, gt_bag, frames_only_bag):
    coco = _write_coco(tmp_path / 'gt.json', frames, truth, key)
    masks = _write_masks(tmp_path / 'masks', frames, truth, key)
    files = dict(gt_coco=str(coco), gt_mask_dir=str(masks), gt_key=key)
    perfect = _run([frames_only_bag], tmp_path / 'p', truth, frames, **files).report
    assert perfect['status'] == 'complete' and perfect['warnings'] == []
    c = perfect['counts']
    assert c['frames_with_box_truth'] == c['frames_with_mask_truth'] == len(frames)
    assert c['frames_without_box_truth'] == c['frames_without_mask_truth'] == 0
    assert perfect['detection']['mAP'] == pytest.approx(1.0)
    assert perfect['segmentation']['mIoU'] == pytest.approx(1.0)
    # imperfect predictions: the same numbers as ground truth from the bag's own topics
    preds = jitter_predictions(truth)
    from_files = _run([frames_only_bag], tmp_path / 'f', preds, frames, **files).report
    from_topics = _run([gt_bag], tmp_path / 't', preds, frames, **GT_TOPICS).report
    assert from_files['segmentation'] == from_topics['segmentation']
    for k in ('mAP', 'AP50', 'AP75'):
        assert from_files['detection'][k] == pytest.approx(from_topics['detection'][k], abs=1e-12)
    assert from_files['detection']['gt_boxes'] == from_topics['detection']['gt_boxes']
    assert from_files['counts'] == from_topics['counts']


def test_gt_files_with_the_wrong_key_count_frames_without_truth_and_warn(
        tmp_path, frames, truth, frames_only_bag, capsys):
    coco = _write_coco(tmp_path / 'gt.json', frames, truth, 'stamp')
    masks = _write_masks(tmp_path / 'masks', frames, truth, 'stamp')
    # files named by stamp, read by index: no frame matches
    res = _run([frames_only_bag], tmp_path / 'r', truth, frames, gt_coco=str(coco),
               gt_mask_dir=str(masks), gt_key='index')
    r = res.report
    assert res.exit_code == 0  # a warning, not a bag error
    c = r['counts']
    assert c['frames_with_box_truth'] == c['frames_with_mask_truth'] == 0
    assert c['frames_without_box_truth'] == c['frames_without_mask_truth'] == len(frames)
    assert r['detection'] is None and r['segmentation'] is None
    (w,) = r['warnings']
    assert 'none of the 5 frames' in w['warning'] and '--gt-key' in w['warning']
    assert 'frame index' in w['warning']
    assert '## Warnings' in (tmp_path / 'r' / 'report.md').read_text()
    cli.print_summary(res)
    assert 'warning: ' in capsys.readouterr().out
    # some frames annotated: counted, no warning
    part = _run([frames_only_bag], tmp_path / 'r2', truth, frames,
                gt_coco=str(_write_coco(tmp_path / 'p.json', frames[:3], truth[:3], 'index')),
                gt_key='index').report
    assert part['counts']['frames_with_box_truth'] == 3
    assert part['counts']['frames_without_box_truth'] == 2 and part['warnings'] == []


def test_gt_file_errors_are_clear(tmp_path, frames, truth):
    coco = _write_coco(tmp_path / 'gt.json', frames, truth, 'index')
    with pytest.raises(ParameterError, match='has no stamp_ns field'):
        load_coco_truth(coco, CLASSES, key='stamp')
    data = json.loads(coco.read_text())
    data['annotations'][0]['image_id'] = 999
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps(data))
    with pytest.raises(ParameterError, match="refers to image id 999"):
        load_coco_truth(bad, CLASSES)
    with pytest.raises(ParameterError, match='cannot read COCO ground truth'):
        load_coco_truth(tmp_path / 'missing.json', CLASSES)
    with pytest.raises(ParameterError, match='mask folder does not exist'):
        load_coco_truth(None, CLASSES, tmp_path / 'nope')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ParameterError, match='no <index>.png'):
        load_coco_truth(None, CLASSES, tmp_path / 'empty')
    with pytest.raises(ParameterError, match="'stamp' or 'index'"):
        load_coco_truth(coco, CLASSES, key='frame')
