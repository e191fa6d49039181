"""End to end: bags of real frames with ground truth -> run_replay / replay CLI -> report."""

import json
import shutil

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
from test_metrics import _direct_coco

from mamba_perception.replay import cli
from mamba_perception.replay.metrics import ConfusionMatrix

GT_ARGS = dict(gt_detections=[GT_DETS], gt_masks=[GT_MASK])


def _run(bags, out, predictions, frames, **kw):
    kw = {**GT_ARGS, 'progress': False, **kw}
    return cli.run_replay(bags, None, out, predictor_factory=OracleFactory(frames, predictions),
                          **kw)


def test_perfect_predictions_give_map_1_and_miou_1(tmp_path, gt_bag, frames, truth):
    res = _run([gt_bag], tmp_path / 'r', truth, frames)
    r = res.report
    assert res.exit_code == 0 and r['status'] == 'complete'
    assert r['counts']['frames'] == len(frames)
    assert r['counts']['frames_per_topic'] == {CAMERA: len(frames)}  # GT mask topic not a camera
    assert r['counts']['frames_with_box_truth'] == r['counts']['frames_with_mask_truth'] == 5
    assert r['detection']['mAP'] == pytest.approx(1.0)
    assert r['segmentation']['mIoU'] == pytest.approx(1.0)
    on_disk = json.loads((tmp_path / 'r' / 'report.json').read_text())
    assert on_disk['detection']['mAP'] == pytest.approx(1.0)
    assert on_disk['bags'][0]['sha256'].startswith('sha256:')
    assert 'versions' in on_disk['provenance'] and on_disk['provenance']['device'] == 'cpu'
    md = (tmp_path / 'r' / 'report.md').read_text()
    assert md.startswith('# Replay evaluation report')  # a trained (non-random) predictor
    for plot in ('latency_cdf.png', 'per_class_ap.png', 'per_class_iou.png', 'overlays.png'):
        assert (tmp_path / 'r' / 'plots' / plot).stat().st_size > 1000


def test_report_equals_reference_libraries_on_the_same_data(tmp_path, gt_bag, frames, truth):
    preds = jitter_predictions(truth)
    r = _run([gt_bag], tmp_path / 'r', preds, frames).report
    ev = _direct_coco(truth, preds, [rgb.shape[:2] for _n, rgb in frames])
    assert r['detection']['mAP'] == pytest.approx(ev.stats[0], abs=1e-12)
    assert r['detection']['AP75'] == pytest.approx(ev.stats[2], abs=1e-12)
    cm = ConfusionMatrix(len(CLASSES))
    for t, p in zip(truth, preds, strict=True):
        cm.add(t['mask'], p['mask'])
    # hand-rolled IoU from the summed matrix
    m = cm.matrix.astype(float)
    iou = np.diag(m) / (m.sum(0) + m.sum(1) - np.diag(m))
    assert r['segmentation']['mIoU'] == pytest.approx(np.nanmean(iou))
    assert r['segmentation']['confusion_matrix'] == cm.matrix.tolist()


def test_sqlite3_and_mcap_give_identical_results(tmp_path, frames, truth):
    preds = jitter_predictions(truth)
    reports = {}
    for storage in ('mcap', 'sqlite3'):
        bag = write_bag(tmp_path / storage, frames, truth, storage)
        reports[storage] = _run([bag], tmp_path / f'r_{storage}', preds, frames).report
    a, b = reports['mcap'], reports['sqlite3']
    assert a['bags'][0]['storage'] == 'mcap' and b['bags'][0]['storage'] == 'sqlite3'
    for key in ('counts', 'detection', 'segmentation'):
        assert a[key] == b[key], key


def test_truncated_bag_gives_clear_error_and_partial_report(tmp_path, gt_bag, frames, truth):
    bag = tmp_path / 'cut'
    shutil.copytree(gt_bag, bag)
    mcap = next(bag.glob('*.mcap'))
    mcap.write_bytes(mcap.read_bytes()[:int(mcap.stat().st_size * 0.7)])
    res = _run([bag], tmp_path / 'r', truth, frames)
    r = res.report
    assert res.exit_code == cli.EXIT_BAG_ERROR and r['status'] == 'partial'
    assert 0 < r['counts']['frames'] < len(frames)
    assert r['detection']['mAP'] == pytest.approx(1.0)  # what was read is still scored
    (err,) = r['errors']
    assert 'truncated or corrupt' in err['error'] and "inside topic '/camera/" in err['error']
    assert 'message' in err['error']
    assert json.loads((tmp_path / 'r' / 'report.json').read_text())['status'] == 'partial'
    assert 'truncated or corrupt' in (tmp_path / 'r' / 'report.md').read_text()


def test_missing_topic_gives_clear_error_and_report(tmp_path, frames, truth):
    bag = write_bag(tmp_path / 'nomask', frames, truth, with_mask=False)
    res = _run([bag], tmp_path / 'r', truth, frames)
    assert res.exit_code == cli.EXIT_BAG_ERROR and res.report['status'] == 'failed'
    assert f"topic '{GT_MASK}' is not in the bag" in res.report['errors'][0]['error']
    assert (tmp_path / 'r' / 'report.json').exists()


def test_ctrl_c_writes_the_partial_report(tmp_path, gt_bag, frames, truth, monkeypatch):
    def factory(device='cpu'):
        return Oracle(frames, truth, interrupt_after=2)

    res = cli.run_replay([gt_bag], None, tmp_path / 'r', predictor_factory=factory,
                         progress=False, **GT_ARGS)
    assert res.exit_code == cli.EXIT_INTERRUPTED
    r = json.loads((tmp_path / 'r' / 'report.json').read_text())
    assert r['status'] == 'interrupted' and r['counts']['frames'] == 2
    assert r['bags'][0]['status'] == 'interrupted'


def test_several_bags_merge_by_accumulating_serial_and_parallel(tmp_path, frames, truth):
    preds = jitter_predictions(truth)
    bags = tmp_path / 'bags'
    bags.mkdir()
    write_bag(bags / 'a', frames[:2], truth[:2])
    write_bag(bags / 'b', frames[2:], truth[2:], 'sqlite3', class_as_name=False)
    serial = _run([bags], tmp_path / 'r1', preds, frames).report
    ev = _direct_coco(truth, preds, [rgb.shape[:2] for _n, rgb in frames])
    assert serial['counts']['bags'] == 2 and serial['counts']['frames'] == 5
    assert serial['detection']['mAP'] == pytest.approx(ev.stats[0], abs=1e-12)
    parallel = _run([bags / 'a', bags / 'b'], tmp_path / 'r2', preds, frames, workers=2).report
    for key in ('counts', 'detection', 'segmentation'):
        assert parallel[key] == serial[key], key


def test_cli_with_real_pipeline_and_random_bundle(tmp_path, gt_bag, capsys):
    from mamba_perception.models.bundle import create_random_bundle
    bundle = tmp_path / 'random.safetensors'
    create_random_bundle(bundle, backbone='vmamba_test', class_names=CLASSES)
    code = cli.main([str(gt_bag), '--bundle', str(bundle), '--out', str(tmp_path / 'r'),
                     '--gt-detections', f'{CAMERA}={GT_DETS}', '--gt-masks', GT_MASK,
                     '--max-frames', '2', '--no-progress'])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith('WARNING: RANDOM-INITIALISED WEIGHTS')
    md = (tmp_path / 'r' / 'report.md').read_text()
    assert md.splitlines()[0].startswith('**WARNING: RANDOM-INITIALISED WEIGHTS')
    assert 'Agreement with ground truth (untrained weights)' in md
    r = json.loads((tmp_path / 'r' / 'report.json').read_text())
    assert list(r)[0] == 'WARNING' and r['scores_are_accuracy'] is False
    assert r['counts']['frames'] == 2 and r['provenance']['bundle']['random_init'] is True
    assert r['latency_ms']['inference_ms']['count'] == 2
    assert r['latency_ms']['decode_ms']['p50_ms'] > 0


def test_cli_exit_codes_for_bad_input(tmp_path, gt_bag, capsys):
    assert cli.main([str(tmp_path / 'nope'), '--bundle', 'x']) == cli.EXIT_SETUP
    assert 'no such bag' in capsys.readouterr().err
    assert cli.main([str(gt_bag), '--bundle', str(tmp_path / 'missing.safetensors')]) == \
        cli.EXIT_SETUP
    assert 'no such bundle' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == cli.EXIT_USAGE


def test_demo_builds_the_sample_bag_and_prints_the_report(tmp_path, capsys, monkeypatch):
    from mamba_perception.replay import demo
    monkeypatch.setenv('MAMBA_PERCEPTION_DEMO_DIR', str(tmp_path / 'demo'))
    assert demo.main(['--frames', '2', '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    report = tmp_path / 'demo' / 'report' / 'report.md'
    assert f'The report is at {report}' in out
    assert report.read_text().startswith('**WARNING: RANDOM-INITIALISED WEIGHTS')
    assert 'Accuracy: not computed' in report.read_text()
