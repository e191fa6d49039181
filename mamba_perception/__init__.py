"""mamba_perception: camera perception with vision state-space models (VMamba, Vim).

The package core (models, kernels, ``Pipeline``, replay evaluation) is usable from plain Python;
only :mod:`mamba_perception.ros` imports rclpy. Importing this package loads neither torch
extensions, Triton nor ROS.
"""

__version__ = '0.1.0'
