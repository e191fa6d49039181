"""The environment proof: a package executable publishes vision_msgs over real DDS."""

import math

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import pytest
from vision_msgs.msg import Detection2DArray

pytestmark = pytest.mark.ros


def test_selftest_publisher_reaches_another_process(start_node, ros_node):
    node = start_node(
        'selftest_publisher', '--ros-args',
        '-p', 'rate_hz:=20.0', '-p', 'frame_id:=cam_front_optical',
        '-p', "class_id:='7'", '-p', 'score:=0.625',
        '-p', 'box_center_xy_px:=[100.5, 200.25]', '-p', 'box_size_xy_px:=[30.0, 40.0]',
        '-r', '__ns:=/selftest_ns')
    arrays, diagnostics = [], []
    ros_node.create_subscription(Detection2DArray, '/selftest_ns/mamba_perception_selftest/'
                                 'detections', arrays.append, 10)
    ros_node.create_subscription(DiagnosticArray, '/diagnostics', diagnostics.append, 10)

    ros_node.spin_until(lambda: len(arrays) >= 3 and len(diagnostics) >= 3, 30.0,
                        'detections and diagnostics from the selftest_publisher process')
    assert node.proc.poll() is None, node.output()

    array = arrays[-1]
    assert array.header.frame_id == 'cam_front_optical'
    assert array.header.stamp.sec > 0
    assert len(array.detections) == 1
    detection = array.detections[0]
    assert detection.header == array.header
    assert detection.bbox.center.position.x == 100.5
    assert detection.bbox.center.position.y == 200.25
    assert detection.bbox.center.theta == 0.0
    assert (detection.bbox.size_x, detection.bbox.size_y) == (30.0, 40.0)
    assert [r.hypothesis.class_id for r in detection.results] == ['7']
    assert math.isclose(detection.results[0].hypothesis.score, 0.625)

    status = diagnostics[-1].status[0]
    assert status.name == 'mamba_perception_selftest: plumbing'
    assert status.level == DiagnosticStatus.OK
    values = {kv.key: kv.value for kv in status.values}
    assert int(values['detection arrays sent']) >= 3
    assert values['rate (Hz)'] == '20'

    assert node.stop() == 0, node.output()


def test_selftest_rejects_out_of_range_parameter(start_node):
    node = start_node('selftest_publisher', '--ros-args', '-p', 'score:=1.5')
    node.proc.wait(30)
    assert node.proc.returncode != 0
    assert 'score' in node.output()
