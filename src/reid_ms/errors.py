"""The errors reid_ms raises.

Every failure a user can cause ends in a subclass of :class:`ReidMsError` whose message says what is
wrong, where (file, key, argument, shape) and what to do. The subclasses also derive from the builtin
exception a caller would expect (``ValueError``, ``FileNotFoundError``), so generic handlers still work.
"""

from __future__ import annotations


class ReidMsError(Exception):
    """Base class of every error raised by reid_ms."""


class ConfigError(ReidMsError, ValueError):
    """A model or function was given arguments that do not fit together (unknown name, bad size)."""


class InputError(ReidMsError, ValueError):
    """A tensor or label passed to a forward call has the wrong shape, dtype or range."""


class CheckpointError(ReidMsError, ValueError):
    """A checkpoint file cannot be read, or its content does not fit the model it is loaded into."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist or is not a file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asks to build an object that reid_ms refuses to create (code could run)."""


class InferenceModelError(ReidMsError, RuntimeError):
    """A model frozen by :func:`reid_ms.optimize_for_inference` was asked to train or change its weights."""
