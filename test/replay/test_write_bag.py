"""``--write-bag``: the camera topics and the predictions in a new bag, read back and re-scored."""

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

from mamba_perception.replay import cli
from mamba_perception.replay.bag import (
    DETECTIONS_TYPE,
    IMAGE_TYPE,
    BagReader,
    decode_detections,
    decode_image,
    decode_mask,
    header_stamp_ns,
)
from mamba_perception.replay.evaluate import prediction_topics

GT_ARGS = dict(gt_detections=[GT_DETS], gt_masks=[GT_MASK], progress=False, hash_bags=False)
DET_TOPIC, MASK_TOPIC = '/camera/detections', '/camera/segmentation/mask'


def _read_back(path):
    """Frames and predictions of a written bag, in order, with their stamps."""
    out = {CAMERA: [], DET_TOPIC: [], MASK_TOPIC: []}
    with BagReader(path) as r:
        assert r.topics == {CAMERA: IMAGE_TYPE, DET_TOPIC: DETECTIONS_TYPE,
                            MASK_TOPIC: IMAGE_TYPE}
        storage = r.storage
        for m in r.messages(list(out)):
            stamp = header_stamp_ns(m.msg, -1)
            if m.topic == CAMERA:
                value = decode_image(m.msg, m.msgtype)
            elif m.topic == DET_TOPIC:
                value = decode_detections(m.msg, CLASSES)
            else:
                value = decode_mask(m.msg, m.msgtype)
            out[m.topic].append((stamp, m.log_time_ns, m.msg.header.frame_id, value))
    return storage, out


def test_prediction_topics_sit_beside_the_camera():
    assert prediction_topics('/camera/image_raw') == (DET_TOPIC, MASK_TOPIC)
    assert prediction_topics('/cam/front/image_raw/compressed') == (
        '/cam/front/detections', '/cam/front/segmentation/mask')
    assert prediction_topics('/image') == ('/image/detections', '/image/segmentation/mask')


@pytest.mark.parametrize('storage', [None, 'sqlite3'])
def test_written_bag_reads_back_and_rescoring_it_gives_the_same_report(tmp_path, storage,
                                                                       gt_bag, frames, truth):
    preds = jitter_predictions(truth)
    out_bag = tmp_path / 'pred_bag'
    res = cli.run_replay([gt_bag], None, tmp_path / 'r', write_bag=out_bag,
                         write_bag_storage=storage,
                         predictor_factory=OracleFactory(frames, preds), **GT_ARGS)
    assert res.exit_code == 0
    got_storage, back = _read_back(out_bag)
    assert got_storage == (storage or 'mcap')  # default: the input's storage
    n = len(frames)
    assert [len(v) for v in back.values()] == [n, n, n]
    info = res.report['bags'][0]['predictions_bag']
    assert info['messages'] == {CAMERA: n, DET_TOPIC: n, MASK_TOPIC: n}
    assert info['topics'] == {CAMERA: {'detections': DET_TOPIC, 'mask': MASK_TOPIC}}
    # the camera frames are the originals; the predictions carry their frame's header and time
    with BagReader(gt_bag) as r:
        originals = [(header_stamp_ns(m.msg, -1), m.log_time_ns, decode_image(m.msg, m.msgtype))
                     for m in r.messages([CAMERA])]
    for (stamp, log_ns, rgb), cam, det, mask in zip(originals, *back.values(), strict=True):
        assert cam[0] == det[0] == mask[0] == stamp
        assert cam[1] == det[1] == mask[1] == log_ns
        assert cam[2] == det[2] == mask[2] == 'cam'
        assert np.array_equal(cam[3], rgb)
    # round trip: the written predictions, scored as predictions, give the same report
    read_preds = [{'boxes': d[3][0], 'class_ids': d[3][1], 'scores': d[3][2], 'mask': m[3]}
                  for d, m in zip(back[DET_TOPIC], back[MASK_TOPIC], strict=True)]
    again = cli.run_replay([gt_bag], None, tmp_path / 'r2',
                           predictor_factory=OracleFactory(frames, read_preds), **GT_ARGS)
    for key in ('counts', 'detection', 'segmentation'):
        assert again.report[key] == res.report[key], key


def test_write_bag_refuses_to_overwrite_and_interrupted_run_leaves_a_readable_bag(
        tmp_path, gt_bag, frames, truth):
    (tmp_path / 'exists').mkdir()
    with pytest.raises(cli.ParameterError, match='exists already'):
        cli.run_replay([gt_bag], None, tmp_path / 'r', write_bag=tmp_path / 'exists',
                       predictor_factory=OracleFactory(frames, truth), **GT_ARGS)
    res = cli.run_replay([gt_bag], None, tmp_path / 'r', write_bag=tmp_path / 'cut',
                         predictor_factory=lambda d: Oracle(frames, truth, interrupt_after=2),
                         **GT_ARGS)
    assert res.exit_code == cli.EXIT_INTERRUPTED
    _storage, back = _read_back(tmp_path / 'cut')
    assert [len(v) for v in back.values()] == [2, 2, 2]


def test_cli_write_bag_for_several_bags_writes_one_per_input(tmp_path, frames, truth, capsys):
    bags = tmp_path / 'bags'
    bags.mkdir()
    write_bag(bags / 'a', frames[:2], truth[:2])
    write_bag(bags / 'b', frames[2:], truth[2:], 'sqlite3')
    res = cli.run_replay([bags], None, tmp_path / 'r', write_bag=tmp_path / 'preds', workers=2,
                         predictor_factory=OracleFactory(frames, truth), **GT_ARGS)
    assert res.exit_code == 0
    for name, storage, n in (('a', 'mcap', 2), ('b', 'sqlite3', 3)):
        got, back = _read_back(tmp_path / 'preds' / name)
        assert got == storage and [len(v) for v in back.values()] == [n, n, n]
    cli.print_summary(res)
    assert f'predictions bag: {tmp_path / "preds" / "a"}' in capsys.readouterr().out
    assert cli.main([str(bags), '--live', '--bundle', 'x', '--write-bag', 'o']) == \
        cli.EXIT_USAGE
