"""bench/dds_burst.py: its per-camera accounting over real DDS (small frames, two cameras)."""

import os

from bench_modules import load
import pytest

dds_burst = load('dds_burst')

pytestmark = pytest.mark.ros


def test_counts_every_frame_of_each_camera(ros_domain_id):
    args = dds_burst.parse_args(['--cameras', '2', '--frames', '20', '--rate-hz', '20',
                                 '--width', '64', '--height', '48', '--dds', 'env',
                                 '--modes', 'participant_per_camera', 'one_participant'])
    env = {**os.environ, 'ROS_DOMAIN_ID': str(ros_domain_id)}
    before = os.environ.get('ROS_DOMAIN_ID')
    rows = dds_burst.run(args, env)
    assert os.environ.get('ROS_DOMAIN_ID') == before  # the setup is restored
    assert [row['mode'] for row in rows] == ['participant_per_camera', 'one_participant']
    for row in rows:
        assert set(row['per_camera']) == {'cam0', 'cam1'}
        for counts in row['per_camera'].values():
            # counted from each camera's first received frame: most of the 20 frames, and
            # small frames at 20 Hz on one host arrive
            assert 10 <= counts['expected'] <= 20
            assert counts['received'] + counts['lost'] == counts['expected']
            assert counts['lost'] == 0
