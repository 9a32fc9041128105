"""Exceptions that the CLI turns into a one-line message and a non-zero exit.

Every check that can reject user input raises a subclass of :class:`DapruneError` *before* any
output is written, so a failed run never leaves a half-written folder behind.
"""


class DapruneError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class UnsupportedModelError(DapruneError):
    """The model's architecture has no adapter."""


class ConfigError(DapruneError):
    """A setting is out of range or inconsistent (sparsity, block range, budget)."""


class CalibrationError(DapruneError):
    """Calibration data is missing, too short or produced unusable activations."""


class ModelSourceError(DapruneError):
    """A model path/id cannot be resolved or its files are missing or corrupt."""


class OutputError(DapruneError):
    """The output folder exists, or cannot be written."""


class NumericalError(DapruneError):
    """Non-finite activations or statistics."""


class CorruptWeightsError(ModelSourceError):
    """A weights file cannot be read: truncated, not safetensors, or an index naming a missing shard."""


class WeightsMismatchError(ModelSourceError):
    """The weights do not fit the config: missing tensors or tensors of the wrong shape."""


class TokenizerError(CalibrationError):
    """The tokenizer is missing, lacks a special token the calibration needs, or does not fit the model."""


class DeviceError(ConfigError):
    """The requested compute device does not exist on this machine."""


class ResumeError(DapruneError):
    """A work folder from an interrupted run exists but was made with different settings or inputs."""
