"""Shared pytest fixtures: ROS domain allocation, node processes, GPU skipping.

Markers (declared in pyproject.toml): ``ros`` for tests that start real nodes over DDS,
``gpu`` for tests that need CUDA (skipped with the reason printed when it is absent),
``slow`` for tests that take more than a few seconds. To add a marker, declare it in
pyproject.toml's ``markers`` list (``--strict-markers`` rejects undeclared ones).

ROS tests never share a DDS domain: each one takes its own ``ROS_DOMAIN_ID`` through an
exclusive lock file, so parallel runs on one machine (two checkouts, CI beside a developer)
do not hear each other, and all discovery stays on this host.
"""

import fcntl
import os
from pathlib import Path
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time

import pytest

# Domain ids 1..101 map to UDP ports that stay below Linux's ephemeral port range.
_DOMAIN_IDS = range(1, 102)
_LOCK_DIR = Path(tempfile.gettempdir()) / 'mamba_perception_ros_domains'


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU; none is visible (torch.cuda.is_available())')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def ros_domain_id():
    """An unused ROS_DOMAIN_ID, held exclusively (flock) for the duration of the test."""
    _LOCK_DIR.mkdir(exist_ok=True)
    start = os.getpid() % len(_DOMAIN_IDS)
    for offset in range(len(_DOMAIN_IDS)):
        domain_id = _DOMAIN_IDS[(start + offset) % len(_DOMAIN_IDS)]
        lock = open(_LOCK_DIR / f'{domain_id}.lock', 'w')
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        try:
            yield domain_id
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
        return
    pytest.fail('all ROS domain ids 1..101 are taken by other test runs on this machine')


def ros_env(domain_id):
    """Environment for a node process: its domain, discovery limited to this host."""
    env = dict(os.environ)
    env['ROS_DOMAIN_ID'] = str(domain_id)
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    env.pop('ROS_LOCALHOST_ONLY', None)  # deprecated; conflicts with the setting above
    env['PYTHONUNBUFFERED'] = '1'
    return env


def ros_executable(name):
    """Path of a package executable where ``ros2 run`` looks for it: <prefix>/lib/<package>/."""
    path = Path(sys.prefix) / 'lib' / 'mamba_perception' / name
    if not path.exists():
        pytest.fail(f'{path} is missing: the package is not installed the way ros2 run expects '
                    '(run tools/dev setup)')
    return path


class NodeProcess:
    """A node started as a real OS process; its output goes to a log file shown on failure."""

    def __init__(self, argv, env, log_path):
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, 'wb')
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self):
        if not self._log.closed:
            self._log.flush()
        return Path(self.log_path).read_text(errors='replace')

    def stop(self, timeout_s=10.0):
        """SIGINT (what Ctrl-C and ros2 launch send), then SIGKILL; always reaps."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def start_node(ros_domain_id, tmp_path, request):
    """Start ``start_node(executable, *ros_args)`` as a process in this test's domain."""
    started = []

    def start(executable, *args, env=None):
        argv = [str(ros_executable(executable)), *args]
        log = tmp_path / f'{executable}-{len(started)}.log'
        node = NodeProcess(argv, {**ros_env(ros_domain_id), **(env or {})}, log)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()
        report = getattr(request.node, 'rep_call', None)
        if report is not None and report.failed:
            print(f'--- output of {" ".join(node.argv)} ---\n{node.output()}')


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f'rep_{report.when}', report)


@pytest.fixture
def ros_node(ros_domain_id):
    """An rclpy node in this test process, in the test's domain, with its own context."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=ros_domain_id)
    node = rclpy.create_node('mamba_perception_test_probe', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)

    def spin_until(predicate, timeout_s, what):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            executor.spin_once(timeout_sec=0.05)
        pytest.fail(f'timed out after {timeout_s} s waiting for {what}')

    node.spin_until = spin_until
    try:
        yield node
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)


@pytest.fixture
def install_prefix():
    """The prefix the package is installed into (the venv): holds share/ and lib/."""
    return Path(sysconfig.get_paths()['data'])
