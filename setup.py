"""Build script for the mamba_perception ament_python package.

Two installers read this file:

* colcon (``colcon build`` on a ROS 2 machine) runs setuptools with the options of
  ``setup.cfg``, which put console scripts into ``lib/mamba_perception`` where
  ``ros2 run`` looks for them.
* pip (``pip install -e .`` in a virtual environment) builds a wheel; wheels always put
  console scripts into ``bin``. For ``ros2 run`` to find them there as well, the wheel also
  carries a small launcher per console script under ``lib/mamba_perception`` that execs the
  one in ``bin``.
"""

from glob import glob
import os
import sys

from setuptools import setup
from setuptools.dist import Distribution

PACKAGE = 'mamba_perception'
# The code under kernels/ installs under this name: a bare top-level ``kernels`` would collide
# with the PyPI project of that name.
KERNELS_PACKAGE = 'mamba_perception_kernels'

CONSOLE_SCRIPTS = {
    'selftest_publisher': 'mamba_perception.ros.selftest:main',
    'classify': 'mamba_perception.models.classify:main',
    'convert': 'mamba_perception.models.convert:main',
    'perception_node': 'mamba_perception.ros.node:main',
    'replay': 'mamba_perception.replay.cli:main',
    'train': 'mamba_perception.train:main',
}

HERE = os.path.dirname(os.path.abspath(__file__))


def find_packages_under(root, import_name):
    """Return ``import_name`` and its subpackages for every folder under ``root`` with code."""
    packages = []
    for folder, _dirs, files in os.walk(os.path.join(HERE, root)):
        if '__init__.py' not in files:
            continue
        rel = os.path.relpath(folder, os.path.join(HERE, root))
        parts = [] if rel == '.' else rel.split(os.sep)
        packages.append('.'.join([import_name, *parts]))
    return sorted(packages)


def ros_run_launchers():
    """Write one ``lib/<package>`` launcher per console script; used for wheel builds only."""
    out_dir = os.path.join(HERE, 'build', 'ros_run_launchers')
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name in CONSOLE_SCRIPTS:
        path = os.path.join(out_dir, name)
        with open(path, 'w') as f:
            # <prefix>/lib/<package>/<name> -> <prefix>/bin/<name>, resolved at run time so the
            # launcher works in any prefix the wheel is installed into.
            f.write('#!/bin/sh\n'
                    f'# ros2 run entry point installed by pip; runs the console script {name}.\n'
                    f'exec "$(dirname "$0")/../../bin/{name}" "$@"\n')
        os.chmod(path, 0o755)
        paths.append(os.path.relpath(path, HERE))
    return paths


def data_files():
    """Files installed outside site-packages: the ament index marker, share/ and lib/."""
    files = [
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        (f'share/{PACKAGE}/launch', sorted(glob('launch/*.py'))),
        (f'share/{PACKAGE}/config', sorted(glob('config/*.yaml'))),
    ]
    building_wheel = any(cmd in sys.argv for cmd in ('bdist_wheel', 'editable_wheel'))
    if building_wheel:
        files.append((f'lib/{PACKAGE}', ros_run_launchers()))
    return files


class AmentPythonDistribution(Distribution):
    """Distribution whose data files survive an editable install.

    setuptools' ``editable_wheel`` installs data files only when the distribution answers
    ``has_data()``, a method distutils never defined (it has ``has_data_files()``), so
    ``pip install -e .`` would silently skip share/ and lib/.
    """

    def has_data(self):
        """Tell editable_wheel whether there are data files to install."""
        return self.has_data_files()


packages = find_packages_under(PACKAGE, PACKAGE) + find_packages_under('kernels', KERNELS_PACKAGE)

setup(
    distclass=AmentPythonDistribution,
    name=PACKAGE,
    version='0.1.0',
    packages=packages,
    package_dir={KERNELS_PACKAGE: 'kernels'},
    package_data={PACKAGE: ['data/*']},
    data_files=data_files(),
    python_requires='>=3.10',
    install_requires=['setuptools', 'numpy'],
    zip_safe=False,
    maintainer='mamba_perception maintainers',
    maintainer_email='maintainers@mamba-perception.dev',
    description='VMamba / Vim camera perception for ROS 2 with fused Triton scan kernels.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [f'{name} = {target}' for name, target in CONSOLE_SCRIPTS.items()],
    },
)
