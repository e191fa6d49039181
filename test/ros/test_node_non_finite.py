"""NaN model output on a frame is reported and skipped, and the next good frame is served.

The node runs as a real process on an honest bundle: fp16 autocast on the CPU, with stem
weights that overflow fp16 (Inf, then NaN after the LayerNorm) only on saturated white patches.
Nothing in the node knows about the test; the white frame is a plain ``sensor_msgs/Image``.
"""

import types

from bundle_helpers import fp16_overflow_bundle
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import numpy as np
import pytest
from ros_node_helpers import (
    CLASS_NAMES,
    TINY_POLICY,
    Collector,
    camera_status,
    image_msg,
    node_args,
    publish_until,
    status_values,
    wait_for_subscriber,
)
from sensor_msgs.msg import Image
from vision_msgs.msg import Detection2DArray

from mamba_perception.errors import NonFiniteOutputError
from mamba_perception.ros import qos


def stamp_of(ros_node, unique):
    stamp = ros_node.get_clock().now().to_msg()
    stamp.nanosec = (stamp.nanosec // 1000) * 1000 + unique
    return stamp


@pytest.mark.ros
def test_nan_output_is_reported_and_the_next_frame_served(start_node, ros_node,
                                                          video_frames_bgr, tmp_path):
    bundle = fp16_overflow_bundle(tmp_path / 'fp16_overflow.safetensors',
                                  class_names=CLASS_NAMES, input_policy=TINY_POLICY).path
    node = start_node('perception_node', *node_args(
        bundle, '-p', 'precision:=fp16', '-p', 'cameras:=[cam, other]'))
    diagnostics = Collector(ros_node, DiagnosticArray, '/diagnostics', 50)
    cam_dets = Collector(ros_node, Detection2DArray, '/cam/detections')
    other_dets = Collector(ros_node, Detection2DArray, '/other/detections')
    cam_pub = ros_node.create_publisher(Image, '/cam/image', qos.input_qos('reliable'))
    other_pub = ros_node.create_publisher(Image, '/other/image', qos.input_qos('reliable'))
    wait_for_subscriber(ros_node, cam_pub, 90.0)
    wait_for_subscriber(ros_node, other_pub, 90.0)
    frame = video_frames_bgr[3]
    white = np.full_like(frame, 255)

    def bad_count(camera):
        status = camera_status(diagnostics.messages, camera)
        return 0 if status is None else int(status_values(status)['bad inputs'])

    def white_on_cam_good_on_other():
        # both cameras at once, so that they often share a batch: only cam's frame may fail
        other_pub.publish(image_msg(frame, stamp_of(ros_node, 7), 'other_optical'))
        return image_msg(white, stamp_of(ros_node, 999), 'cam_optical')

    publish_until(ros_node, cam_pub, white_on_cam_good_on_other,
                  lambda: bad_count('cam') >= 3 and len(other_dets) >= 3, 60.0,
                  'three NaN frames counted on cam while other is served', period_s=0.3)
    assert not cam_dets.messages, 'a NaN frame was published as a (empty) result'
    assert bad_count('other') == 0
    status = camera_status(diagnostics.messages, 'cam')
    assert status.level in (DiagnosticStatus.WARN, DiagnosticStatus.ERROR)
    assert 'NaN' in status.message, status.message
    assert 'segmentation logits' in status_values(status)['last error']

    stamp = stamp_of(ros_node, 1)
    publish_until(ros_node, cam_pub, lambda: image_msg(frame, stamp, 'cam_optical'),
                  lambda: any(m.header.stamp == stamp for m in cam_dets.messages), 30.0,
                  'a good frame on cam served after the NaN frames', period_s=0.3)
    served = next(m for m in cam_dets.messages if m.header.stamp == stamp)
    assert served.header.frame_id == 'cam_optical'
    assert node.proc.poll() is None, node.output()
    assert node.stop() == 0, node.output()
    logged = [line for line in node.output().splitlines()
              if 'frame skipped' in line and 'non-finite model output' in line]
    assert 1 <= len(logged) < bad_count('cam'), f'error log not throttled: {logged}'
    assert all('camera cam' in line for line in logged)


def test_handler_reports_only_the_bad_frames_of_a_batch():
    """``_non_finite_frames`` maps the error's frames to cameras and keeps the good results."""
    from mamba_perception.ros.node import PerceptionNode
    reported = []
    fake = types.SimpleNamespace(
        _bad_frame=lambda camera, cause, message: reported.append((camera, cause, message)))
    good_a, good_c = object(), object()
    exc = NonFiniteOutputError('model output contains NaN or Inf (frame 1: ...)',
                               bad_frames={1: ['segmentation logits']},
                               results=[good_a, None, good_c])
    results = PerceptionNode._non_finite_frames(fake, ['a', 'b', 'c'], exc)
    assert results == [good_a, None, good_c]
    assert [(camera, cause) for camera, cause, _ in reported] == [('b', 'non-finite output')]
    assert 'NaN or Inf in segmentation logits' in reported[0][2]
    # an error without per-frame details fails every camera of the batch
    reported.clear()
    results = PerceptionNode._non_finite_frames(fake, ['a', 'b'], NonFiniteOutputError('NaN'))
    assert results == [None, None] and [r[0] for r in reported] == ['a', 'b']
