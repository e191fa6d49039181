"""The kernels' input error (kernels import nothing from mamba_perception)."""


class ScanInputError(ValueError):
    """Bad input to a scan op; the message names the tensor and its shape / dtype / device."""
