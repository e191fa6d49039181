"""Fixtures for the replay tests (helpers in replay_helpers.py)."""

import pytest
from replay_helpers import N_FRAMES, SCALE, make_truth, write_bag

from mamba_perception.replay import sample


@pytest.fixture(scope='session')
def frames():
    """(frame number, RGB) pairs: 5 real vtest.avi frames, every 40th, downscaled."""
    return sample.read_frames(sample.find_sample_video(), N_FRAMES, start=0, stride=40,
                              scale=SCALE)


@pytest.fixture(scope='session')
def truth(frames):
    return make_truth(frames)


@pytest.fixture(scope='session')
def gt_bag(tmp_path_factory, frames, truth):
    return write_bag(tmp_path_factory.mktemp('bags') / 'gt_mcap', frames, truth, 'mcap')
