"""One exception family, so callers can catch every laformer failure with one ``except``.

Each message names what is wrong (the file, tensor, field or argument) and says how to fix it.
"""


class LaFormerError(Exception):
    """Base class of every error laformer raises on purpose."""


class ConfigError(LaFormerError, ValueError):
    """A configuration value is missing, inconsistent or unsupported."""


class CheckpointError(LaFormerError):
    """A checkpoint cannot be found, read or mapped onto the model."""


class TokenizerError(LaFormerError):
    """Tokenizer files or arguments are missing or invalid."""


class GenerationError(LaFormerError, ValueError):
    """Invalid generation parameters or inputs (e.g. a prompt longer than the context)."""


class TrainingError(LaFormerError):
    """Invalid training data, arguments or checkpoints."""
