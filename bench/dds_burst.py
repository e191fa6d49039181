r"""Frames lost in DDS when several cameras' raw frames are written back to back.

Why: ``bench/node_dds.py`` published four cameras' raw 1280x720 frames from one participant,
one after another on each tick, and the first camera of every tick lost frames before the node
saw them (the node's input counters, not its keep-newest buffer). This isolates the transport:
no perception node, one subscriber process with the node's input QoS (raw subscriptions, best
effort, KEEP_LAST ``--reader-depth``) counting what arrives per camera, and this process
publishing in one of three ways:

* ``one_participant``: all cameras from one rclpy context, back to back (a multi-camera driver)
* ``spaced``: the same with ``--gap-ms`` between the cameras' writes
* ``participant_per_camera``: one context (DDS participant) per camera, back to back (separate
  drivers, as ``node_dds.py`` publishes now)

Frames sent while the cameras were still matching are not counted: the count starts on the tick
on which every camera had delivered a frame (``expected`` = frames sent from then, per camera).

    python bench/dds_burst.py --out /tmp/dds_burst.json   # Fast DDS LARGE_DATA, 30 Hz, 6 s
    FASTDDS_BUILTIN_TRANSPORTS='LARGE_DATA?sockets_size=8MB' python bench/dds_burst.py --dds env

The second form (LARGE_DATA's sockets_size option, 8 MB instead of the system default) removed
the one-participant loss on the development machine (``dds_burst_sockets8mb_cpu.json``); why
is not established (Fast DDS's shared-memory segments are the likely place).
"""

import argparse
import json
import os
import random
import select
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import provenance, write_json  # noqa: E402

MODES = ('one_participant', 'spaced', 'participant_per_camera')


def subscriber(cameras: list, seconds: float, depth: int) -> None:
    """Child process: count raw frames per camera; print first-arrival stamps as JSON."""
    import rclpy
    from sensor_msgs.msg import Image

    from mamba_perception.ros import conversions, qos
    rclpy.init()
    node = rclpy.create_node('dds_burst_subscriber')
    stamps = {cam: [] for cam in cameras}
    for cam in cameras:  # taken and deserialized as the node takes camera frames
        node.create_subscription(
            Image, f'{cam}/image',
            lambda data, cam=cam: stamps[cam].append(
                _stamp_ns(conversions.deserialize_image(data))),
            qos.input_qos('best_effort', depth), raw=True)
    print('ready', flush=True)
    # Until the publisher says it is done (a line on stdin) and half a second more for the
    # last frames, or ``seconds`` at most.
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.05)
        if select.select([sys.stdin], [], [], 0)[0]:
            sys.stdin.readline()
            end = min(end, time.monotonic() + 0.5)
    print(json.dumps(stamps), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


def _stamp_ns(msg) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


def publish(mode: str, cameras: list, rate_hz: float, frames: int, gap_ms: float,
            width: int, height: int) -> dict:
    """Publish ``frames`` ticks; return the stamps sent per camera."""
    from builtin_interfaces.msg import Time
    import rclpy
    from sensor_msgs.msg import Image

    from mamba_perception.ros import qos
    contexts, nodes = [], []
    try:
        for k in range(len(cameras) if mode == 'participant_per_camera' else 1):
            contexts.append(rclpy.Context())
            contexts[-1].init()
            nodes.append(rclpy.create_node(f'dds_burst_publisher_{k}', context=contexts[-1]))
        publishers = {cam: nodes[k % len(nodes)].create_publisher(
            Image, f'{cam}/image', qos.input_qos('best_effort', 1))
            for k, cam in enumerate(cameras)}
        msg = Image(height=height, width=width, encoding='bgr8', step=3 * width)
        msg.data = np.random.default_rng(0).integers(0, 255, height * 3 * width,
                                                     np.uint8).tobytes()
        deadline = time.monotonic() + 20.0
        while not all(p.get_subscription_count() for p in publishers.values()):
            if time.monotonic() > deadline:
                raise RuntimeError('the subscriber did not match')
            time.sleep(0.05)
        time.sleep(1.0)  # discovery settles both ways
        sent = {cam: [] for cam in cameras}
        period, tick = 1.0 / rate_hz, time.monotonic()
        for _ in range(frames):
            for cam in cameras:
                now = time.time_ns()
                msg.header.stamp = Time(sec=now // 1_000_000_000, nanosec=now % 1_000_000_000)
                publishers[cam].publish(msg)
                sent[cam].append(now)
                if mode == 'spaced':
                    time.sleep(gap_ms / 1e3)
            tick += period
            time.sleep(max(0.0, tick - time.monotonic()))
        return sent
    finally:
        for node in nodes:
            node.destroy_node()
        for context in contexts:
            context.try_shutdown()


def run_mode(mode: str, args, env: dict) -> dict:
    cameras = [f'cam{k}' for k in range(args.cameras)]
    listen_s = args.frames / args.rate_hz + 60.0  # a bound; it stops when told
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), '--subscriber', '--cameras',
         str(args.cameras), '--listen-s', str(listen_s), '--reader-depth',
         str(args.reader_depth)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        if child.stdout.readline().strip() != 'ready':
            raise RuntimeError('the subscriber process did not start')
        sent = publish(mode, cameras, args.rate_hz, args.frames, args.gap_ms, args.width,
                       args.height)
        out, _ = child.communicate('done\n', timeout=listen_s + 30)
    finally:
        if child.poll() is None:
            child.kill()
    received = json.loads(out.strip().splitlines()[-1])
    # Counted from the tick on which every camera had delivered a frame: before it, readers
    # and writers of some cameras may still be matching. sent[cam][i] is tick i's stamp.
    first_ticks = [sent[cam].index(min(received[cam])) for cam in cameras if received[cam]]
    start_tick = max(first_ticks) if len(first_ticks) == len(cameras) else len(sent[cameras[0]])
    per_camera = {}
    for cam in cameras:
        got = set(received[cam])
        expected = set(sent[cam][start_tick:])
        per_camera[cam] = {'expected': len(expected), 'received': len(got & expected),
                           'lost': len(expected - got)}
    return {'mode': mode, 'start_tick': start_tick, 'per_camera': per_camera}


def run(args, env: dict) -> list:
    """One row per mode; this process publishes with ``env``'s DDS setup (restored after)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        rows = []
        for mode in args.modes:
            row = run_mode(mode, args, env)
            lost = {cam: c['lost'] for cam, c in row['per_camera'].items()}
            print(f'{mode:24s} lost per camera {lost} of ~{args.frames}', flush=True)
            rows.append(row)
        return rows
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cameras', type=int, default=4)
    parser.add_argument('--rate-hz', type=float, default=30.0)
    parser.add_argument('--frames', type=int, default=180, help='ticks published per mode')
    parser.add_argument('--width', type=int, default=1280)
    parser.add_argument('--height', type=int, default=720)
    parser.add_argument('--gap-ms', type=float, default=2.0, help="'spaced' mode's gap")
    parser.add_argument('--reader-depth', type=int, default=1,
                        help="the subscriber's KEEP_LAST depth (the node's input_depth)")
    parser.add_argument('--modes', nargs='+', choices=MODES, default=list(MODES))
    parser.add_argument('--dds', choices=('large_data', 'env'), default='large_data')
    parser.add_argument('--out', default=None)
    parser.add_argument('--subscriber', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--listen-s', type=float, default=0.0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.subscriber:
        subscriber([f'cam{k}' for k in range(args.cameras)], args.listen_s, args.reader_depth)
        return
    env = dict(os.environ)
    env.setdefault('ROS_DOMAIN_ID', str(random.randint(1, 100)))
    if args.dds == 'large_data':
        env['FASTDDS_BUILTIN_TRANSPORTS'] = 'LARGE_DATA'
    rows = run(args, env)
    if args.out:
        write_json(args.out, {'benchmark': 'dds_burst', 'method': __doc__.split('\n\n')[1],
                              'provenance': provenance({
                                  'args': vars(args), 'ros_domain_id': env['ROS_DOMAIN_ID'],
                                  'FASTDDS_BUILTIN_TRANSPORTS':
                                      env.get('FASTDDS_BUILTIN_TRANSPORTS'),
                                  'RMW_IMPLEMENTATION': env.get('RMW_IMPLEMENTATION')}),
                              'results': rows})


if __name__ == '__main__':
    main()
