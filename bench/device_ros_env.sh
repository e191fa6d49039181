#!/usr/bin/env bash
# Real rclpy + Fast DDS + our vision_msgs copy on the lent GPU machine, which has CPython 3.12,
# torch and no network: a venv over the machine's python (--system-site-packages keeps its
# CUDA torch) with the PyPI ROS 2 Kilted wheels carried in .whl/ros, then the vision_msgs-
# compatible messages built by tools/dev (its build-vision-msgs step, without downloads).
#
# Wheels (once, on the development machine; .whl/ is git-ignored and sent with `carry`):
#   pip list --format=freeze | grep -i '^ros-' > /tmp/ros.txt      # in the dev venv
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl/ros -r /tmp/ros.txt
#   pip download --no-deps -d .whl/ros catkin-pkg docutils empy lark-parser   # build tools
#   pip download --no-deps -d .whl/ros rosbags   # the node deserialises camera frames with it
#
# Usage (on the GPU machine, from the repo root): source bench/device_ros_env.sh [VENV]
# Leaves the venv active (VIRTUAL_ENV, PATH); prints how long it took.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:-/tmp/rosvenv}
WHEELS=${ROS_WHEELS:-$ROOT/.whl/ros}
started=$SECONDS
[ -d "$WHEELS" ] || { echo "no $WHEELS: carry .whl (see this script's header)" >&2; return 1; }
# The ros_wheels_bootstrapper .pth hook needs a real site-packages (a venv), not PYTHONPATH.
# The machine's python3 is itself a venv (torch lives in its site-packages, which
# --system-site-packages would not see): a .pth file adds that directory.
python3 -m venv --without-pip "$VENV"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
python3 -c 'import site; print("\n".join(site.getsitepackages()))' > "$SITE/_machine_site.pth"
# pip (and setuptools) of the machine's python through that .pth; --ignore-installed because
# pip would otherwise see the outer environment's packages as already there.
PIP=("$VENV/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation
     --ignore-installed)
"${PIP[@]}" --find-links "$WHEELS" "$WHEELS"/*.whl "$WHEELS"/*.tar.gz
"$VENV/bin/python" -c 'import rclpy, sensor_msgs.msg, diagnostic_msgs.msg, rosbags.typesys'
MAMBA_PERCEPTION_VENV=$VENV "$ROOT/tools/dev" build-vision-msgs
# The package itself (no deps): its wheel puts the ros2-run launchers under lib/mamba_perception,
# where the node tests start the node from.
"${PIP[@]}" "$ROOT"
"$VENV/bin/python" -c 'import rclpy, vision_msgs.msg, torch; print("ros env ok: torch",
torch.__version__, "cuda", torch.cuda.is_available())'
export VIRTUAL_ENV=$VENV PATH=$VENV/bin:$PATH
echo "ROS env ready in $((SECONDS - started)) s: $VENV"
set +euo pipefail
