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


class NonFiniteOutputError(MambaPerceptionError):
    """The model output NaN or Inf for one or more frames (broken weights, fp16 overflow).

    Left unchecked, the argmax and the score threshold would turn such output into an all-zero
    mask and no boxes, which look like an empty scene. ``bad_frames`` maps the index of each bad
    frame in the call to the names of its non-finite outputs (``'detection scores'``,
    ``'detection boxes'``, ``'segmentation logits'``); ``results`` holds the call's results in
    order, ``None`` at those indices, so the other frames of a batch are not lost.
    """

    def __init__(self, message: str, bad_frames: 'dict | None' = None,
                 results: 'list | None' = None) -> None:
        super().__init__(message)
        self.bad_frames = dict(bad_frames or {})
        self.results = list(results or [])
