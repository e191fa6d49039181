"""Fixtures of the perception node tests: real video frames, tiny random bundles, node helpers."""


import pytest
from ros_node_helpers import CLASS_NAMES, TINY_POLICY

FRAME_SIZE = (288, 384)  # (height, width): half of vtest.avi's 576 x 768


@pytest.fixture(scope='session')
def video_frames_bgr():
    """Twenty consecutive real frames of vtest.avi, BGR, resized to FRAME_SIZE."""
    import cv2

    from mamba_perception.replay.sample import find_sample_video, read_frames
    height, width = FRAME_SIZE
    frames = read_frames(find_sample_video(), count=20, scale=width / 768)
    assert len(frames) == 20, 'vtest.avi gave fewer than 20 frames'
    assert frames[0][1].shape[:2] == FRAME_SIZE
    return [cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) for _, rgb in frames]


@pytest.fixture(scope='session')
def tiny_bundle(tmp_path_factory):
    """Path of a random-initialised vmamba_test bundle (detection + segmentation, 3 classes)."""
    from mamba_perception.models.bundle import create_random_bundle
    path = tmp_path_factory.mktemp('bundles') / 'tiny.safetensors'
    create_random_bundle(path, class_names=CLASS_NAMES, input_policy=TINY_POLICY)
    return path


