"""Bag reading: storages, image decoding, ground-truth decoding, damage and missing topics."""

from pathlib import Path
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from replay_helpers import CAMERA, CLASSES, GT_DETS, GT_MASK, write_bag

from mamba_perception.errors import BagError, SetupError
from mamba_perception.replay import sample
from mamba_perception.replay.bag import (
    VISION_MSGS,
    BagReader,
    BagWriter,
    decode_detections,
    decode_image,
    decode_mask,
    find_bags,
    make_typestore,
)

REPO = Path(__file__).resolve().parents[2]


def _normalise(text):
    lines = [line.split('#', 1)[0].strip() for line in text.splitlines()]
    return [re.sub(r'\s+', ' ', line) for line in lines if line]


def test_vision_msgs_definitions_match_the_interface_package():
    msg_dir = REPO / 'interfaces' / 'vision_msgs_compat' / 'msg'
    for name, text in VISION_MSGS.items():
        path = msg_dir / f'{name.rsplit("/", 1)[1]}.msg'
        assert _normalise(text) == _normalise(path.read_text()), name


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_reads_frames_and_truth_from_both_storages(tmp_path, frames, truth, storage):
    bag = write_bag(tmp_path / storage, frames, truth, storage)
    with BagReader(bag) as r:
        assert r.storage == storage and not r.recovered
        assert r.camera_topics() == sorted([CAMERA, GT_MASK])
        assert r.message_counts[CAMERA] == len(frames)
        msgs = list(r.messages([CAMERA, GT_DETS, GT_MASK]))
    cams = [m for m in msgs if m.topic == CAMERA]
    assert [m.index for m in cams] == list(range(len(frames)))
    np.testing.assert_array_equal(decode_image(cams[2].msg, cams[2].msgtype), frames[2][1])
    dets = [m for m in msgs if m.topic == GT_DETS]
    boxes, ids, _scores, unknown = decode_detections(dets[1].msg, CLASSES)
    np.testing.assert_allclose(boxes, truth[1]['boxes'], atol=1e-9)
    np.testing.assert_array_equal(ids, truth[1]['class_ids'])
    assert unknown == 0
    masks = [m for m in msgs if m.topic == GT_MASK]
    np.testing.assert_array_equal(decode_mask(masks[0].msg, masks[0].msgtype), truth[0]['mask'])


def test_class_ids_as_indices_and_unknown_classes():
    store = make_typestore()
    from mamba_perception.replay.bag import detections_msg
    msg = detections_msg(store, 1, np.array([[0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 1, 1.0]]),
                         ['1', 'car', 'bicycle'])
    boxes, ids, _s, unknown = decode_detections(msg, CLASSES)
    assert ids.tolist() == [1, 1] and unknown == 1 and boxes.shape == (2, 4)


def _image(store, data, h, w, enc, step):
    t = store.types
    header = t['std_msgs/msg/Header'](stamp=t['builtin_interfaces/msg/Time'](sec=0, nanosec=0),
                                      frame_id='')
    return t['sensor_msgs/msg/Image'](header=header, height=h, width=w, encoding=enc,
                                      is_bigendian=0, step=step,
                                      data=np.asarray(data, np.uint8).reshape(-1))


def test_decode_image_encodings():
    store = make_typestore()
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    padded = np.zeros((2, 12), np.uint8)  # step 12 > 9: row padding must be skipped
    padded[:, :9] = rgb.reshape(2, 9)
    out = decode_image(_image(store, padded, 2, 3, 'rgb8', 12), 'sensor_msgs/msg/Image')
    np.testing.assert_array_equal(out, rgb)
    bgr = decode_image(_image(store, rgb[..., ::-1].copy(), 2, 3, 'bgr8', 9),
                       'sensor_msgs/msg/Image')
    np.testing.assert_array_equal(bgr, rgb)
    bgra = np.concatenate([rgb[..., ::-1], np.full((2, 3, 1), 7, np.uint8)], 2)
    np.testing.assert_array_equal(
        decode_image(_image(store, bgra, 2, 3, 'bgra8', 12), 'sensor_msgs/msg/Image'), rgb)
    mono = decode_image(_image(store, rgb[..., 0], 2, 3, 'mono8', 3), 'sensor_msgs/msg/Image')
    assert mono.shape == (2, 3, 3) and (mono[..., 1] == rgb[..., 0]).all()
    with pytest.raises(BagError, match=r"topic '/cam' message 4: image encoding '32FC1'"):
        decode_image(_image(store, np.zeros(24), 2, 3, '32FC1', 12), 'sensor_msgs/msg/Image',
                     '/cam', 4)
    with pytest.raises(BagError, match='needs 18'):
        decode_image(_image(store, np.zeros(5), 2, 3, 'rgb8', 9), 'sensor_msgs/msg/Image')


def test_compressed_roundtrip_is_rgb(frames):
    from mamba_perception.replay.bag import compressed_msg
    rgb = frames[0][1]
    msg = compressed_msg(make_typestore(), rgb, 5, fmt='png')
    np.testing.assert_array_equal(decode_image(msg, 'sensor_msgs/msg/CompressedImage'), rgb)
    msg.data = np.zeros(10, np.uint8)
    with pytest.raises(BagError, match="topic '/c' message 3: CompressedImage"):
        decode_image(msg, 'sensor_msgs/msg/CompressedImage', '/c', 3)


def test_truncated_mcap_is_read_up_to_the_damage(tmp_path, gt_bag):
    bag = tmp_path / 'cut'
    shutil.copytree(gt_bag, bag)
    mcap = next(bag.glob('*.mcap'))
    data = mcap.read_bytes()
    mcap.write_bytes(data[:int(len(data) * 0.6)])
    with BagReader(bag) as r:
        assert r.recovered and 'magic' in r.open_error.lower()
        assert CAMERA in r.topics
        got = []
        with pytest.raises(BagError, match=r"truncated or corrupt at byte \d+ inside topic "
                                           r"'/camera/\S+' message \d+") as err:
            for m in r.messages([CAMERA, GT_DETS, GT_MASK]):
                got.append(m)
    assert 0 < len(got) < 15
    assert f'{CAMERA}: ' in str(err.value)


def test_truncated_sqlite_and_missing_topic_errors(tmp_path, frames, truth, gt_bag):
    bag = write_bag(tmp_path / 'db', frames[:2], truth[:2], 'sqlite3')
    db = next(bag.glob('*.db3'))
    db.write_bytes(db.read_bytes()[:db.stat().st_size // 2])
    with pytest.raises(BagError, match='cannot open bag'):
        BagReader(bag).open()
    with BagReader(gt_bag) as r, pytest.raises(BagError, match=r"topic '/nope' is not in the "
                                                            r"bag; it has: /camera/gt"):
        next(r.messages(['/nope']))


def test_find_bags_and_writer_refuses_overwrite(tmp_path, gt_bag):
    assert find_bags([gt_bag]) == [gt_bag]
    assert find_bags([gt_bag.parent]) == sorted(p for p in gt_bag.parent.iterdir())
    with pytest.raises(BagError, match='no bags'):
        find_bags([tmp_path])
    with pytest.raises(BagError, match='not overwriting'):
        BagWriter(gt_bag)


def test_sample_bag_has_image_and_compressed_topics(tmp_path):
    bag = sample.build_sample_bag(tmp_path / 's', count=2, scale=0.25)
    with BagReader(bag) as r:
        assert r.topics == {sample.RAW_TOPIC: 'sensor_msgs/msg/Image',
                            sample.COMPRESSED_TOPIC: 'sensor_msgs/msg/CompressedImage'}
        msgs = list(r.messages([sample.RAW_TOPIC, sample.COMPRESSED_TOPIC]))
    assert r.storage == 'mcap' and len(msgs) == 4
    assert msgs[0].msg.encoding == 'bgr8' and msgs[2].log_time_ns - msgs[0].log_time_ns == 10**8
    raw = decode_image(msgs[0].msg, msgs[0].msgtype)
    jpeg = decode_image(msgs[1].msg, msgs[1].msgtype)
    assert raw.shape == jpeg.shape == (144, 192, 3)
    assert np.abs(raw.astype(int) - jpeg).mean() < 6  # same frame, JPEG-compressed


def test_find_sample_video_names_every_place(monkeypatch, tmp_path):
    monkeypatch.setenv(sample.VIDEO_ENV, str(tmp_path / 'none.avi'))
    monkeypatch.setattr(sample, 'SYSTEM_VIDEO', tmp_path / 'sys.avi')
    monkeypatch.setattr(sys, 'prefix', str(tmp_path / 'prefix'))
    with pytest.raises(SetupError) as err:
        sample.find_sample_video()
    for place in ('none.avi', 'sys.avi', 'prefix/share/mamba_perception_data/vtest.avi'):
        assert place in str(err.value)


def test_importing_replay_loads_no_rclpy_no_torch():
    code = ('import sys, mamba_perception.replay, mamba_perception.replay.bag, '
            'mamba_perception.replay.metrics, mamba_perception.replay.report, '
            'mamba_perception.replay.cli, mamba_perception.replay.sample, '
            'mamba_perception.replay.demo, mamba_perception.replay.live; '
            'print([m for m in ("rclpy", "torch", "matplotlib") if m in sys.modules])')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == '[]'
