"""Lifecycle transitions, the enabled switch, and parameter rejection (real processes)."""

import time

from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
import pytest
from rcl_interfaces.srv import GetParameters, SetParameters
from ros_node_helpers import (
    Collector,
    call,
    image_msg,
    node_args,
    publish_until,
    set_parameter,
    spin_for,
)
from sensor_msgs.msg import Image
from vision_msgs.msg import Detection2DArray

from mamba_perception.ros import qos

pytestmark = pytest.mark.ros
NODE = '/mamba_perception'


def test_lifecycle_enabled_and_parameters(start_node, ros_node, tiny_bundle, video_frames_bgr):
    bad_start = start_node('perception_node', *node_args(
        tiny_bundle, '-r', '__ns:=/bad', '-p', 'precision:=int4'))
    missing = start_node('perception_node', *node_args(
        '/no/such/bundle.safetensors', '-r', '__ns:=/missing'))
    node = start_node('perception_node', *node_args(tiny_bundle, '-p', 'autostart:=false',
                                                    '-p', 'cameras:=[cam]'))
    change = ros_node.create_client(ChangeState, f'{NODE}/change_state')
    get_state = ros_node.create_client(GetState, f'{NODE}/get_state')
    set_params = ros_node.create_client(SetParameters, f'{NODE}/set_parameters')
    detections = Collector(ros_node, Detection2DArray, '/cam/detections')
    pub = ros_node.create_publisher(Image, '/cam/image', qos.input_qos('reliable'))
    stamp_counter = [0]

    def frame():
        stamp_counter[0] += 1
        return image_msg(video_frames_bgr[stamp_counter[0] % 20],
                         ros_node.get_clock().now().to_msg(), 'cam_optical')

    def state():
        return call(ros_node, get_state, GetState.Request()).current_state.id

    def transition(transition_id):
        return call(ros_node, change, ChangeState.Request(
            transition=Transition(id=transition_id))).success

    def set_param(name, value):
        return set_parameter(ros_node, set_params, name, value)

    def outputs_flow(timeout_s=30.0):
        n = len(detections)
        publish_until(ros_node, pub, frame, lambda: len(detections) >= n + 2, timeout_s,
                      'detections')

    def no_outputs(seconds=1.5):
        n = len(detections)
        for _ in range(int(seconds / 0.1)):
            pub.publish(frame())
            spin_for(ros_node, 0.1)
        spin_for(ros_node, 0.5)
        assert len(detections) == n, 'outputs while they should be off'

    assert state() == State.PRIMARY_STATE_UNCONFIGURED  # autostart false: waits for a manager
    assert transition(Transition.TRANSITION_CONFIGURE)
    assert state() == State.PRIMARY_STATE_INACTIVE
    no_outputs(1.0)
    assert transition(Transition.TRANSITION_ACTIVATE)
    assert state() == State.PRIMARY_STATE_ACTIVE
    outputs_flow()

    # enabled flips at runtime
    assert set_param('enabled', False).successful
    spin_for(ros_node, 0.5)
    no_outputs()
    assert set_param('enabled', True).successful
    outputs_flow()

    # bad values are rejected with the reason; good ones accepted
    for name, value, words in (('score_threshold', 1.5, 'score_threshold'),
                               ('device', 'tpu', 'unknown device'),
                               ('precision', 'int4', 'precision'),
                               ('bundle_path', '/no/such.safetensors', 'does not exist')):
        result = set_param(name, value)
        assert not result.successful, name
        assert words in result.reason, result.reason
    assert set_param('score_threshold', 0.05).successful
    outputs_flow()

    assert transition(Transition.TRANSITION_DEACTIVATE)
    assert state() == State.PRIMARY_STATE_INACTIVE
    no_outputs()
    assert transition(Transition.TRANSITION_CLEANUP)
    assert state() == State.PRIMARY_STATE_UNCONFIGURED
    assert transition(Transition.TRANSITION_CONFIGURE)
    assert transition(Transition.TRANSITION_ACTIVATE)
    outputs_flow()
    assert transition(Transition.TRANSITION_DEACTIVATE)
    assert transition(Transition.TRANSITION_CLEANUP)
    assert transition(Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)
    assert state() == State.PRIMARY_STATE_FINALIZED
    assert node.stop() == 0, node.output()
    # cuda_graphs is on by default (av.yaml's vehicle setting): on the CPU it does not apply
    assert 'cuda_graphs: not applicable on cpu' in node.output(), node.output()

    for proc, words in ((bad_start, 'precision'), (missing, 'does not exist')):
        proc.proc.wait(60)
        assert proc.proc.returncode not in (0, None), proc.output()
        assert words in proc.output(), proc.output()


def test_services_answer_while_autostart_configures(start_node, ros_node, tiny_bundle):
    # A long warm-up (20 batches of 16 cameras, ~6 s on CI's CPU) stands in for a slow
    # configure (bundle load, torch.compile on a GPU).
    cameras = '[' + ','.join(f'c{i}' for i in range(16)) + ']'
    node = start_node('perception_node', *node_args(tiny_bundle, '-r', '__ns:=/slow',
                                                    '-p', 'warmup_iterations:=20',
                                                    '-p', f'cameras:={cameras}'))
    get_state = ros_node.create_client(GetState, f'/slow{NODE}/get_state')
    get_params = ros_node.create_client(GetParameters, f'/slow{NODE}/get_parameters')

    def state(timeout_s=60.0):
        return call(ros_node, get_state, GetState.Request(), timeout_s).current_state.id

    first = state()
    while first == State.PRIMARY_STATE_UNCONFIGURED:  # asked before autostart began
        first = state()
    # Answered during configure, not once configure and activate are over.
    assert first == State.TRANSITION_STATE_CONFIGURING, first
    reply = call(ros_node, get_params, GetParameters.Request(names=['precision']))
    assert [v.string_value for v in reply.values] == ['fp32']
    deadline = time.monotonic() + 180.0
    while state() != State.PRIMARY_STATE_ACTIVE:
        assert time.monotonic() < deadline, 'the node did not finish configuring and activate'
        spin_for(ros_node, 0.2)
    assert node.stop() == 0, node.output()


def test_warmup_covers_every_batch_size_the_worker_can_form_when_shapes_cost():
    from mamba_perception.ros.node import warmup_batches

    # compile / CUDA graphs: a batch of 1..n ready frames each has its own compiled graph
    assert warmup_batches(4, shape_specialized=True) == [1, 2, 3, 4]
    assert warmup_batches(1, shape_specialized=True) == [1]
    # eager: one size is enough (no per-shape one-off worth a longer configure)
    assert warmup_batches(4, shape_specialized=False) == [4]
