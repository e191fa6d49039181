"""Helpers of the node tests (plain functions; fixtures are in conftest.py)."""

import time

import numpy as np
import pytest

CLASS_NAMES = ['person', 'car', 'bicycle']

# The network input is capped at 64 px so a CPU forward takes tens of ms, while the frames the
# node receives (and the masks and boxes it returns) keep the video's own geometry.
TINY_POLICY = {'color_order': 'RGB', 'mean': [123.675, 116.28, 103.53],
               'std': [58.395, 57.12, 57.375], 'max_long_side_px': 64, 'max_short_side_px': 64,
               'allow_upscale': False, 'pad_multiple_px': 32}


def node_args(bundle, *extra):
    """Command line of a perception node on the CPU with the tiny bundle, quick to start."""
    return ['--ros-args', '-p', f'bundle_path:={bundle}', '-p', 'device:=cpu',
            '-p', 'precision:=fp32', '-p', 'warmup_size_px:=[64, 64]',
            '-p', 'warmup_iterations:=1', '-p', 'diagnostics.period_s:=0.5', *extra]


def image_msg(bgr, stamp, frame_id, encoding='bgr8'):
    """sensor_msgs/Image over a BGR frame (converted to ``encoding``)."""
    import array

    import cv2
    from sensor_msgs.msg import Image
    pixels = {'bgr8': bgr, 'rgb8': bgr[..., ::-1], 'mono8': cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
              }[encoding]
    pixels = np.ascontiguousarray(pixels)
    msg = Image(height=pixels.shape[0], width=pixels.shape[1], encoding=encoding,
                step=pixels.strides[0])
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    data = array.array('B')
    data.frombytes(pixels.data)
    msg.data = data
    return msg


class Collector:
    """Subscribes a topic in the test node and keeps every message."""

    def __init__(self, node, msg_type, topic, qos=10):
        self.messages = []
        self.subscription = node.create_subscription(msg_type, topic, self.messages.append, qos)

    def __len__(self):
        return len(self.messages)

    @property
    def last(self):
        return self.messages[-1]


def wait_for_subscriber(ros_node, publisher, timeout_s=20.0):
    ros_node.spin_until(lambda: publisher.get_subscription_count() > 0, timeout_s,
                        f'the node to subscribe {publisher.topic_name}')


def spin_for(ros_node, seconds):
    end = time.monotonic() + seconds
    ros_node.spin_until(lambda: time.monotonic() >= end, seconds + 5.0, 'spinning')


def publish_until(ros_node, publisher, make_msg, predicate, timeout_s, what, period_s=0.1):
    """Publish ``make_msg()`` every ``period_s`` while spinning, until ``predicate()``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        publisher.publish(make_msg())
        end = time.monotonic() + period_s
        ros_node.spin_until(lambda end=end: predicate() or time.monotonic() >= end, period_s + 5.0,
                            what)
    pytest.fail(f'timed out after {timeout_s} s waiting for {what}')


def camera_status(diagnostic_arrays, camera, node='mamba_perception'):
    """Latest DiagnosticStatus of ``camera`` of ``node`` (namespace/name) among received arrays."""
    for array in reversed(diagnostic_arrays):
        for status in array.status:
            if status.name == f'{node}: camera {camera}':
                return status
    return None


def status_values(status):
    return {kv.key: kv.value for kv in status.values}


def call(ros_node, client, request, timeout_s=60.0):
    """Call a service of another process and return its reply (spinning ``ros_node``)."""
    ros_node.spin_until(lambda: client.service_is_ready(), 60.0, f'service {client.srv_name}')
    future = client.call_async(request)
    ros_node.spin_until(future.done, timeout_s, f'a reply from {client.srv_name}')
    return future.result()


def set_parameter(ros_node, client, name, value):
    """Set one parameter through a SetParameters ``client``; return its SetParametersResult."""
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters
    if isinstance(value, bool):
        pv = ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=value)
    elif isinstance(value, float):
        pv = ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
    else:
        pv = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value)
    reply = call(ros_node, client, SetParameters.Request(
        parameters=[Parameter(name=name, value=pv)]))
    return reply.results[0]
