"""The errors intforge raises: each says what went wrong, where, and what to do about it."""

from __future__ import annotations


class IntforgeError(Exception):
    """Base of every error intforge raises on bad input; the message is meant for the user."""


class UnsupportedOpError(IntforgeError):
    """The model uses an operator intforge cannot lower to integer arithmetic."""


class CaptureError(IntforgeError):
    """The model could not be captured with torch.export."""


class CalibrationError(IntforgeError):
    """The calibration data does not fit the model."""


class QuantizationError(IntforgeError):
    """A value cannot be represented under the integer contract (zero scale, accumulator overflow...)."""


class VerificationError(IntforgeError):
    """A compiled graph breaks the integer-only contract."""


class ArtifactError(IntforgeError):
    """A model.so / model.json pair is missing, mismatched or tampered with."""
