"""Fixtures of the perception node tests: real video frames, tiny random bundles, node helpers."""

from pathlib import Path
import sys

import pytest
from ros_node_helpers import CLASS_NAMES

# The network input is capped at 64 px so a CPU forward takes tens of ms, while the frames the
# node receives (and the masks and boxes it returns) keep the video's own geometry.
TINY_POLICY = {'color_order': 'RGB', 'mean': [123.675, 116.28, 103.53],
               'std': [58.395, 57.12, 57.375], 'max_long_side_px': 64, 'max_short_side_px': 64,
               'allow_upscale': False, 'pad_multiple_px': 32}
FRAME_SIZE = (288, 384)  # (height, width): half of vtest.avi's 576 x 768


def find_sample_video() -> Path:
    """OpenCV's vtest.avi where the environment script or the opencv-doc package puts it."""
    try:  # the replay engineer's helper, once it exists
        from mamba_perception.replay.sample import sample_video_path
        return Path(sample_video_path())
    except (ImportError, AttributeError, FileNotFoundError):
        pass
    for candidate in (Path(sys.prefix) / 'share' / 'mamba_perception_data' / 'vtest.avi',
                      Path('/usr/share/doc/opencv-doc/examples/data/vtest.avi')):
        if candidate.is_file():
            return candidate
    pytest.fail('vtest.avi not found: run tools/dev setup (it places OpenCV\'s sample video '
                f'under {sys.prefix}/share/mamba_perception_data/)')


@pytest.fixture(scope='session')
def video_frames_bgr():
    """Twenty consecutive real frames of vtest.avi, BGR, resized to FRAME_SIZE."""
    import cv2
    capture = cv2.VideoCapture(str(find_sample_video()))
    frames = []
    while len(frames) < 20:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.resize(frame, FRAME_SIZE[::-1], interpolation=cv2.INTER_AREA))
    capture.release()
    assert len(frames) == 20, 'vtest.avi gave fewer than 20 frames'
    return frames


@pytest.fixture(scope='session')
def tiny_bundle(tmp_path_factory):
    """Path of a random-initialised vmamba_test bundle (detection + segmentation, 3 classes)."""
    from mamba_perception.models.bundle import create_random_bundle
    path = tmp_path_factory.mktemp('bundles') / 'tiny.safetensors'
    create_random_bundle(path, class_names=CLASS_NAMES, input_policy=TINY_POLICY)
    return path


