"""The perception node as a real process, started the way av.launch.py starts it.

One node serves two cameras fed with real vtest.avi frames; the assertions share it: headers
copied, boxes inside the image, mask size equals the image, LabelInfo for a late joiner
(transient local), overlay only while subscribed, diagnostics fields and levels.
"""

import importlib.util
from pathlib import Path
import time

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import numpy as np
import pytest
from rcl_interfaces.srv import SetParameters
from ros_node_helpers import (
    CLASS_NAMES,
    Collector,
    camera_status,
    image_msg,
    publish_until,
    set_parameter,
    spin_for,
    status_values,
)
from sensor_msgs.msg import Image
from vision_msgs.msg import Detection2DArray, LabelInfo

from mamba_perception.ros import qos

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parents[2]
NODE = 'perception/mamba_perception'
TOPICS = {'front': '/sensing/camera/front/image_raw', 'left': '/sensing/camera/left/image_raw'}


def launch_equivalent_args(bundle):
    """ros args for the node exactly as av.launch.py's node_description maps its arguments."""
    spec = importlib.util.spec_from_file_location('av_launch', ROOT / 'launch' / 'av.launch.py')
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    args = {name: default for name, default, *_ in launch.LAUNCH_ARGUMENTS}
    args.update(camera_topics='[' + ', '.join(TOPICS.values()) + ']', bundle_path=str(bundle),
                device='cpu', precision='fp32', namespace='perception')
    desc = launch.node_description(args, str(ROOT))
    params_file, overrides = desc['parameters']
    argv = ['--ros-args', '--params-file', params_file, '-r', f'__ns:=/{desc["namespace"]}',
            '-r', f'__node:={desc["name"]}']
    for name, value in overrides.items():
        text = ('[' + ', '.join(value) + ']' if isinstance(value, list)
                else str(value).lower() if isinstance(value, bool) else str(value))
        argv += ['-p', f'{name}:={text}']
    for source, target in desc['remappings']:
        argv += ['-r', f'{source}:={target}']
    return argv + ['--log-level', desc['ros_arguments'][1]]


def test_outputs_of_two_cameras(start_node, ros_node, tiny_bundle, video_frames_bgr):
    node = start_node('perception_node', *launch_equivalent_args(tiny_bundle),
                      '-p', 'warmup_size_px:=[64, 64]', '-p', 'warmup_iterations:=1',
                      '-p', 'diagnostics.period_s:=0.5', '-p', 'diagnostics.window_s:=2.0',
                      '-p', 'diagnostics.expected_rate_hz:=0.0',
                      '-p', 'diagnostics.max_latency_ms:=30000.0',
                      '-p', 'diagnostics.silent_after_s:=1.5')
    ns = '/perception'
    detections = {cam: Collector(ros_node, Detection2DArray, f'{ns}/{cam}/detections')
                  for cam in TOPICS}
    masks = {cam: Collector(ros_node, Image, f'{ns}/{cam}/segmentation/mask') for cam in TOPICS}
    diagnostics = Collector(ros_node, DiagnosticArray, '/diagnostics')
    pubs = {cam: ros_node.create_publisher(Image, topic, qos.input_qos('reliable', 1))
            for cam, topic in TOPICS.items()}
    sent = {}  # (sec, nanosec) -> (camera, frame index)
    counter = [0]

    def publish_both():
        for cam, pub in pubs.items():
            i = counter[0]
            counter[0] += 1
            stamp = ros_node.get_clock().now().to_msg()
            stamp.nanosec = (stamp.nanosec // 1000) * 1000 + i % 1000  # unique per message
            sent[(stamp.sec, stamp.nanosec)] = (cam, i % len(video_frames_bgr))
            pub.publish(image_msg(video_frames_bgr[i % len(video_frames_bgr)], stamp,
                                  f'{cam}_camera_optical'))
        return None

    class Both:  # publish_until publishes one message object; send to both cameras instead
        def publish(self, _):
            publish_both()

    publish_until(ros_node, Both(), lambda: None,
                  lambda: all(len(detections[c]) >= 3 and len(masks[c]) >= 3 for c in TOPICS),
                  90.0, 'detections and masks of both cameras', period_s=0.1)
    assert node.proc.poll() is None, node.output()

    height, width = video_frames_bgr[0].shape[:2]
    for cam in TOPICS:
        for array in detections[cam].messages:
            key = (array.header.stamp.sec, array.header.stamp.nanosec)
            assert key in sent, 'detections carry a stamp that was never sent'
            assert sent[key][0] == cam
            assert array.header.frame_id == f'{cam}_camera_optical'
            for det in array.detections:
                assert det.header == array.header
                cx, cy = det.bbox.center.position.x, det.bbox.center.position.y
                w, h = det.bbox.size_x, det.bbox.size_y
                assert w >= 0 and h >= 0
                assert -1e-3 <= cx - w / 2 and cx + w / 2 <= width + 1e-3
                assert -1e-3 <= cy - h / 2 and cy + h / 2 <= height + 1e-3
                hyp = det.results[0].hypothesis
                assert hyp.class_id.isdigit() and int(hyp.class_id) < len(CLASS_NAMES)
                assert 0.0 <= hyp.score <= 1.0
        for mask in masks[cam].messages:
            key = (mask.header.stamp.sec, mask.header.stamp.nanosec)
            assert sent[key][0] == cam and mask.header.frame_id == f'{cam}_camera_optical'
            assert (mask.width, mask.height, mask.encoding) == (width, height, 'mono8')
            assert mask.step == width and len(mask.data) == width * height
            assert np.frombuffer(mask.data, np.uint8).max() < len(CLASS_NAMES)

    # LabelInfo was published at activation, long before this subscription: transient local.
    labels = Collector(ros_node, LabelInfo, f'{ns}/front/label_info', qos.LABEL_INFO_QOS)
    ros_node.spin_until(lambda: len(labels) >= 1, 15.0, 'LabelInfo for a late joiner')
    assert [(c.class_id, c.class_name) for c in labels.last.class_map] == list(
        enumerate(CLASS_NAMES))

    # Overlay: nothing rendered while nobody subscribes; rendered with the header once someone
    # does.
    ros_node.spin_until(lambda: camera_status(diagnostics.messages, 'front', NODE) is not None,
                        10.0, 'diagnostics of camera front')
    status = camera_status(diagnostics.messages, 'front', NODE)
    assert status_values(status)['overlays published'] == '0'
    overlays = Collector(ros_node, Image, f'{ns}/front/debug/overlay', qos.DEBUG_QOS)
    publish_until(ros_node, Both(), lambda: None, lambda: len(overlays) >= 2, 60.0,
                  'overlay images once subscribed')
    overlay = overlays.last
    assert (overlay.width, overlay.height, overlay.encoding) == (width, height, 'rgb8')
    assert sent[(overlay.header.stamp.sec, overlay.header.stamp.nanosec)][0] == 'front'
    assert overlay.header.frame_id == 'front_camera_optical'

    # A batch window set at runtime: from then on the two cameras' frames, published back to
    # back, run as one batch. Two diagnostics windows of frames after the change.
    set_params = ros_node.create_client(SetParameters, f'/{NODE}/set_parameters')
    assert set_parameter(ros_node, set_params, 'batch_window_ms', 200.0).successful
    changed = time.monotonic()
    publish_until(ros_node, Both(), lambda: None, lambda: time.monotonic() > changed + 4.0,
                  20.0, 'frames after the change')

    # Diagnostics while both cameras flow: per-camera status with every field, level OK.
    diagnostics.messages.clear()
    publish_until(ros_node, Both(), lambda: None,
                  lambda: camera_status(diagnostics.messages, 'left', NODE) is not None, 20.0,
                  'a diagnostics status of camera left')
    for cam in TOPICS:
        status = camera_status(diagnostics.messages, cam, NODE)
        values = status_values(status)
        assert status.level == DiagnosticStatus.OK, (status.message, values)
        for key in ('input rate (Hz)', 'output rate (Hz)', 'frames dropped',
                    'latency p50 (ms)', 'latency p99 (ms)', 'decode p50 (ms)',
                    'preprocess p99 (ms)', 'inference p50 (ms)', 'postprocess p99 (ms)',
                    'publish p50 (ms)', 'queued p50 (ms)', 'handoff p99 (ms)', 'bad inputs',
                    'frames lost before node in window (est.)', 'batch size mean (frames)'):
            assert key in values, key
        # with the batch window both cameras' frames run together (measured: 2.00; before the
        # change, with none, the idle worker took the first frame alone: 1.12 / 1.17)
        assert float(values['batch size mean (frames)']) >= 1.8
        assert float(values['output rate (Hz)']) > 0
        assert float(values['inference p50 (ms)']) > 0
        assert float(values['queued p50 (ms)']) >= 0 and float(values['handoff p50 (ms)']) >= 0
        assert 0 < float(values['latency p50 (ms)']) <= float(values['latency p99 (ms)'])
    assert int(status_values(camera_status(diagnostics.messages, 'front', NODE))[
        'overlays published']) >= 2

    # Camera left goes silent: ERROR for left, front stays OK.
    def front_only():
        for cam in ('front',):
            stamp = ros_node.get_clock().now().to_msg()
            pubs[cam].publish(image_msg(video_frames_bgr[0], stamp, f'{cam}_camera_optical'))

    class Front:
        def publish(self, _):
            front_only()

    diagnostics.messages.clear()

    def left_error():
        status = camera_status(diagnostics.messages, 'left', NODE)
        return status is not None and status.level == DiagnosticStatus.ERROR

    publish_until(ros_node, Front(), lambda: None, left_error, 20.0, 'ERROR for silent camera')
    assert 'no frame' in camera_status(diagnostics.messages, 'left', NODE).message
    assert camera_status(diagnostics.messages, 'front', NODE).level == DiagnosticStatus.OK
    spin_for(ros_node, 0.1)
    assert node.proc.poll() is None, node.output()
    assert node.stop() == 0, node.output()
