"""Rosbag replay evaluation: one command from a bag to a report (no ROS installation needed).

* :mod:`~mamba_perception.replay.bag` reads rosbag2 (sqlite3, MCAP) with ``rosbags``, decodes
  camera images to RGB arrays and pairs ground truth with frames by header stamp.
* :mod:`~mamba_perception.replay.metrics` accumulates COCO mAP, confusion-matrix mIoU and
  latency percentiles; accumulators merge by adding up, never by averaging scores.
* :mod:`~mamba_perception.replay.report` writes ``report.json`` first and renders the Markdown
  report and plots from that dict.
* :mod:`~mamba_perception.replay.cli` is the ``replay`` command; :mod:`.demo` is the README's
  main job; :mod:`.sample` builds the sample bag from OpenCV's ``vtest.avi``.
* :mod:`~mamba_perception.replay.live` (``replay BAG --live``) plays a bag's camera topics
  at recorded rate into a real ``perception_node`` over DDS (started as a process or already
  running), records its outputs and adds a ``realtime`` section (stamp-to-publish latency,
  drops, output rate) to the same report; it is the only module here that imports rclpy, and
  only when called.

Importing this package loads neither rclpy, torch nor matplotlib.
"""

__all__ = ['bag', 'cli', 'demo', 'live', 'metrics', 'report', 'sample']
