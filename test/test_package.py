"""The package is installed where ROS 2 tools look, and the core stays ROS-free."""

import ast
import os
from pathlib import Path
import shutil
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parents[1]


def console_scripts():
    """The CONSOLE_SCRIPTS table of setup.py, read without running setup()."""
    tree = ast.parse((REPO / 'setup.py').read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == 'CONSOLE_SCRIPTS':
            return ast.literal_eval(node.value)
    raise AssertionError('setup.py has no CONSOLE_SCRIPTS table')


def test_package_xml_is_a_valid_format3_ament_python_manifest():
    catkin_pkg = pytest.importorskip('catkin_pkg.package')
    package = catkin_pkg.parse_package(str(REPO / 'package.xml'))
    package.validate()
    assert package.package_format == 3
    assert package.name == 'mamba_perception'
    assert package.get_build_type() == 'ament_python'
    exec_deps = {dep.name for dep in package.exec_depends}
    for needed in ('rclpy', 'sensor_msgs', 'vision_msgs', 'diagnostic_msgs', 'std_msgs',
                   'geometry_msgs', 'cv_bridge', 'launch_ros', 'python3-numpy',
                   'python3-opencv', 'python3-torch', 'python3-torchvision'):
        assert needed in exec_deps, f'package.xml lacks <exec_depend>{needed}</exec_depend>'


def test_share_files_are_installed_where_ros2_looks(install_prefix):
    share = install_prefix / 'share' / 'mamba_perception'
    assert (share / 'package.xml').read_bytes() == (REPO / 'package.xml').read_bytes()
    marker = install_prefix / 'share/ament_index/resource_index/packages/mamba_perception'
    assert marker.is_file(), 'ament index marker missing: ros2 pkg would not find the package'
    for folder, pattern in (('launch', '*.py'), ('config', '*.yaml')):
        for source in sorted((REPO / folder).glob(pattern)):
            installed = share / folder / source.name
            assert installed.is_file(), f'{installed} missing (setup.py data_files)'


@pytest.mark.parametrize('name', sorted(console_scripts()))
def test_every_console_script_is_runnable_from_lib(install_prefix, name):
    target = console_scripts()[name]
    launcher = install_prefix / 'lib' / 'mamba_perception' / name
    assert launcher.is_file() and os.access(launcher, os.X_OK), \
        f'{launcher} missing or not executable: ros2 run mamba_perception {name} would fail'
    assert (install_prefix / 'bin' / name).is_file()
    module, function = target.split(':')
    probe = f'import importlib; assert callable(getattr(importlib.import_module({module!r}), ' \
            f'{function!r}))'
    result = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True)
    assert result.returncode == 0, f'{name} -> {target} does not resolve:\n{result.stderr}'


def test_kernels_import_under_a_unique_name():
    code = ('import importlib.util, mamba_perception_kernels as k; '
            'print(k.__file__); print(importlib.util.find_spec("kernels"))')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd='/')
    assert result.returncode == 0, result.stderr
    kernels_file, bare_spec = result.stdout.split('\n')[:2]
    assert Path(kernels_file).parent == REPO / 'kernels'
    assert bare_spec == 'None', 'a bare top-level "kernels" package would collide with PyPI'


def test_core_import_pulls_in_neither_ros_nor_triton():
    code = ('import sys, mamba_perception, mamba_perception.results, mamba_perception.errors; '
            'print(sorted(m for m in ("rclpy", "triton") if m in sys.modules))')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[]'


def test_vision_msgs_type_hashes_match_upstream():
    """Our vision_msgs copy (or the real one) must hash like upstream vision_msgs 4.1.1."""
    import json

    import vision_msgs
    expected = json.loads((REPO / 'interfaces/upstream_type_hashes.json').read_text())
    share = Path(vision_msgs.__file__).resolve()
    while not (share / 'share' / 'vision_msgs').is_dir():
        assert share != share.parent, 'no share/vision_msgs above the vision_msgs module'
        share = share.parent
    msg_dir = share / 'share' / 'vision_msgs' / 'msg'
    for name, hash_string in expected['hashes'].items():
        described = json.loads((msg_dir / f'{name}.json').read_text())
        assert described['type_hashes'][0]['hash_string'] == hash_string, name


def _tools_dev(args, env_update, tmp_path, path=None):
    env = {**os.environ, 'MAMBA_PERCEPTION_VENV': str(tmp_path / 'venv'), **env_update}
    if path is not None:
        env['PATH'] = path
    return subprocess.run(['bash', str(REPO / 'tools' / 'dev'), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_setup_says_clearly_when_python311_is_missing(tmp_path):
    result = _tools_dev(['check'], {'PYTHON': 'python3.11-that-does-not-exist'}, tmp_path)
    assert result.returncode == 1
    assert 'needs CPython 3.11' in result.stderr


def test_setup_says_clearly_when_python_is_not_311(tmp_path):
    fake = tmp_path / 'python3.11'
    fake.write_text('#!/bin/sh\necho 3.10\n')
    fake.chmod(0o755)
    result = _tools_dev(['check'], {'PYTHON': str(fake)}, tmp_path)
    assert result.returncode == 1
    assert 'is Python 3.10; this project needs 3.11' in result.stderr


def test_setup_says_clearly_when_cmake_is_missing(tmp_path):
    # A PATH holding every tool the script uses except cmake.
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'python3.11').symlink_to(os.path.realpath(sys.executable))
    for tool in ('bash', 'cat', 'sha256sum', 'cut', 'mktemp', 'grep', 'tail',
                 'sed', 'nproc', 'rm', 'dirname', 'c++'):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    result = _tools_dev(['check'], {'ROS_DISTRO': ''}, tmp_path, path=str(bin_dir))
    assert result.returncode == 1, result.stderr
    assert 'no cmake on PATH' in result.stderr


def test_setup_says_clearly_when_the_registry_is_unreachable(tmp_path):
    offline = {'PIP_CONFIG_FILE': os.devnull, 'PIP_FIND_LINKS': '',
               'PIP_INDEX_URL': 'http://127.0.0.1:9/simple', 'PIP_EXTRA_INDEX_URL': ''}
    result = _tools_dev(['check'], offline, tmp_path)
    assert result.returncode == 1
    assert 'cannot download from the Python package registry' in result.stderr


@pytest.mark.slow
def test_colcon_build_installs_the_ros_layout(tmp_path):
    """The robot path: colcon (ament_python build type) puts executables where ros2 run looks."""
    colcon = Path(sys.prefix) / 'bin' / 'colcon'
    if not colcon.exists():
        pytest.skip('colcon is not installed in this environment (tools/requirements/test.txt)')
    src = tmp_path / 'src' / 'mamba_perception'
    subprocess.run(['git', 'clone', '-q', str(REPO), str(src)], check=True)
    build = subprocess.run([str(colcon), 'build', '--packages-select', 'mamba_perception'],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    prefix = tmp_path / 'install' / 'mamba_perception'
    for name in console_scripts():
        assert os.access(prefix / 'lib' / 'mamba_perception' / name, os.X_OK), name
    assert (prefix / 'share' / 'mamba_perception' / 'package.xml').is_file()
    assert (prefix / 'share/ament_index/resource_index/packages/mamba_perception').is_file()
    site = next(prefix.glob('lib/python3*/site-packages'))
    probe = subprocess.run(
        [sys.executable, '-c', 'import mamba_perception_kernels as k; print(k.__file__)'],
        env={**os.environ, 'PYTHONPATH': str(site)}, cwd=tmp_path, capture_output=True,
        text=True)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).is_relative_to(site)
