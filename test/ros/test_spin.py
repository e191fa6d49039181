"""spin_until_shutdown: a shutdown racing the executor's checks ends the spin quietly."""

import pytest
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.node import Node

from mamba_perception.ros.spin import spin_until_shutdown

pytestmark = pytest.mark.ros


@pytest.fixture
def executor(ros_domain_id):
    """An executor with a node on a context of its own, in this test's DDS domain."""
    context = Context()
    rclpy.init(context=context, domain_id=ros_domain_id)
    executor = SingleThreadedExecutor(context=context)
    node = Node('spin_test', context=context, enable_rosout=False)
    executor.add_node(node)
    yield executor
    node.destroy_node()
    context.try_shutdown()


def test_rclpy_raises_rcl_error_for_a_wait_set_on_a_shut_down_context(executor):
    # The premise: what spin_once() raises once the context is gone (rclpy, not our code).
    executor.context.try_shutdown()
    with pytest.raises(_rclpy.RCLError, match='context is not valid'):
        executor.spin_once(timeout_sec=0)


def test_shutdown_between_the_ok_check_and_the_wait_set_ends_the_spin(executor):
    # The race seen in CI: SIGINT shuts the context down after spin()'s ok() check, and the
    # next spin_once() builds its wait set on the dead context.
    def spin_racing_a_shutdown():
        executor.spin_once(timeout_sec=0)  # the context is fine here
        executor.context.try_shutdown()
        executor.spin_once(timeout_sec=0)  # what spin() does next, past its ok() check

    executor.spin = spin_racing_a_shutdown
    spin_until_shutdown(executor)  # returns: the node is shutting down
    assert not executor.context.ok()


def test_an_rcl_error_while_the_context_is_valid_propagates(executor):
    def spin_failing():
        raise _rclpy.RCLError('a real failure')

    executor.spin = spin_failing
    with pytest.raises(_rclpy.RCLError, match='a real failure'):
        spin_until_shutdown(executor)
