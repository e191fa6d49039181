"""Spinning an executor until shutdown, as the package's executables do."""

from rclpy.executors import Executor, ExternalShutdownException
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy


def spin_until_shutdown(executor: Executor) -> None:
    """Run ``executor.spin()`` until Ctrl-C, SIGINT / SIGTERM or an rclpy shutdown.

    A SIGINT can shut the context down between the executor's ``ok()`` check and the wait set
    it then builds; rclpy raises ``RCLError`` ("the given context is not valid") there instead
    of ``ExternalShutdownException`` (seen in CI: a node stopped by SIGINT after a lifecycle
    shutdown exited 1 with that traceback). Either way the node is shutting down: return.
    An ``RCLError`` while the context is still valid is a real error and propagates.
    """
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except _rclpy.RCLError:
        if executor.context.ok():
            raise
