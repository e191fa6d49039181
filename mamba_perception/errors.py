"""Exceptions raised by mamba_perception for problems a user can fix.

Every message names the offending thing (tensor, checkpoint key, topic and message index,
parameter) so that a log line alone says what to change.
"""


class MambaPerceptionError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(MambaPerceptionError):
    """A weight file is missing, unreadable, unsafe, or does not fit the architecture."""


class BundleError(CheckpointError):
    """A model bundle is missing, tampered with, or does not match its metadata."""


class InputError(MambaPerceptionError, ValueError):
    """A frame or tensor handed to the pipeline cannot be processed."""


class BagError(MambaPerceptionError):
    """A rosbag cannot be read: corrupt, truncated, missing topic, unknown type."""


class ParameterError(MambaPerceptionError, ValueError):
    """A node or command parameter is invalid."""


class SetupError(MambaPerceptionError):
    """The environment lacks something the package needs (a library, a device)."""
