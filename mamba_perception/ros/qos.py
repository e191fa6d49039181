"""Named QoS profiles of the perception node.

* input: KEEP_LAST ``depth`` (1 by default: only the newest frame matters), VOLATILE, best
  effort by default (SensorDataQoS semantics, REP 2003: hears both best-effort and reliable
  drivers); ``reliable`` is available for drivers/bags that need it.
* outputs (detections, masks): reliable, KEEP_LAST ``depth``.
* LabelInfo: reliable + transient local, depth 1 — published once, late joiners still get it.
* debug overlay: best effort, depth 1 (never slows the node down).
* diagnostics: reliable, depth 10 (as diagnostic_updater).
"""

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

RELIABILITY = {'best_effort': ReliabilityPolicy.BEST_EFFORT,
               'reliable': ReliabilityPolicy.RELIABLE}


def input_qos(reliability: str = 'best_effort', depth: int = 1) -> QoSProfile:
    """Camera input profile."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=RELIABILITY[reliability],
                      durability=DurabilityPolicy.VOLATILE)


def output_qos(depth: int = 5) -> QoSProfile:
    """Return the profile of detections and class masks."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


LABEL_INFO_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                            reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL)
DEBUG_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                       reliability=ReliabilityPolicy.BEST_EFFORT,
                       durability=DurabilityPolicy.VOLATILE)
DIAGNOSTICS_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                             reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
