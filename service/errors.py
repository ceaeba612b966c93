"""The LineWatch error tree.

Every error a user can cause (a bad config, a missing model file, a camera that is
down) is a :class:`LineWatchError`; the CLI prints its message as one paragraph and
exits non-zero, without a traceback.
"""

from __future__ import annotations


class LineWatchError(Exception):
    """Base of every error LineWatch raises on purpose."""


class ConfigError(LineWatchError):
    """The configuration is invalid (the message names the YAML path and line)."""


class SourceError(LineWatchError):
    """A frame source could not be opened or read."""


class ModelError(LineWatchError):
    """A model file is missing, unreadable or matches no adapter."""


class CalibrationError(LineWatchError):
    """Calibration input is degenerate or inconsistent."""


class DataError(LineWatchError):
    """A dataset or annotation file is malformed."""
