"""Plumbing self-test node: proves rclpy, DDS and the vision_msgs types work on this machine.

It runs no model. At ``rate_hz`` it publishes one ``vision_msgs/Detection2DArray`` holding a
single detection whose class, score and box come from parameters, and a
``diagnostic_msgs/DiagnosticArray`` on ``/diagnostics`` saying how many it has sent. Point RViz,
Foxglove or ``ros2 topic echo`` at ``~/detections`` to check a robot's setup before the
perception node is involved::

    ros2 run mamba_perception selftest_publisher --ros-args -p frame_id:=camera_optical
"""

import sys

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, ParameterDescriptor
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose

from mamba_perception.ros.spin import spin_until_shutdown

NODE_NAME = 'mamba_perception_selftest'


def _float_param(description, low, high):
    return ParameterDescriptor(
        description=description,
        floating_point_range=[FloatingPointRange(from_value=low, to_value=high)])


class SelfTestPublisher(Node):
    """Publishes a parameter-defined detection and a diagnostics status at a fixed rate."""

    def __init__(self):
        super().__init__(NODE_NAME)
        self.declare_parameter('rate_hz', 10.0, _float_param('publish rate', 0.1, 1000.0))
        self.declare_parameter('frame_id', 'camera_optical_frame',
                               ParameterDescriptor(description='header.frame_id of each array'))
        self.declare_parameter('class_id', '0',
                               ParameterDescriptor(description='class id string of the box'))
        self.declare_parameter('score', 0.9, _float_param('score of the box', 0.0, 1.0))
        self.declare_parameter('box_center_xy_px', [320.0, 240.0],
                               ParameterDescriptor(description='box centre x, y in pixels'))
        self.declare_parameter('box_size_xy_px', [64.0, 128.0],
                               ParameterDescriptor(description='box width, height in pixels'))
        self._sent = 0
        self._detections_pub = self.create_publisher(Detection2DArray, '~/detections', 10)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        period_s = 1.0 / self.get_parameter('rate_hz').value
        self._timer = self.create_timer(period_s, self._publish)

    def _detection_array(self):
        param = self.get_parameter
        center, size = param('box_center_xy_px').value, param('box_size_xy_px').value
        array = Detection2DArray()
        array.header.stamp = self.get_clock().now().to_msg()
        array.header.frame_id = param('frame_id').value
        detection = Detection2D()
        detection.header = array.header
        detection.bbox.center.position.x = float(center[0])
        detection.bbox.center.position.y = float(center[1])
        detection.bbox.size_x = float(size[0])
        detection.bbox.size_y = float(size[1])
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = param('class_id').value
        hypothesis.hypothesis.score = float(param('score').value)
        detection.results.append(hypothesis)
        array.detections.append(detection)
        return array

    def _diagnostics(self, stamp):
        status = DiagnosticStatus(
            level=DiagnosticStatus.OK, name=f'{NODE_NAME}: plumbing',
            message='publishing', hardware_id='none')
        status.values = [
            KeyValue(key='detection arrays sent', value=str(self._sent)),
            KeyValue(key='rate (Hz)', value=f"{self.get_parameter('rate_hz').value:g}"),
        ]
        return DiagnosticArray(header=stamp, status=[status])

    def _publish(self):
        array = self._detection_array()
        self._detections_pub.publish(array)
        self._sent += 1
        self._diagnostics_pub.publish(self._diagnostics(array.header))


def main(args=None):
    """Run the self-test publisher until interrupted."""
    rclpy.init(args=args)
    node = SelfTestPublisher()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        spin_until_shutdown(executor)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
