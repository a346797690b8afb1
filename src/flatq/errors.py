"""User-facing errors.

Anything a user can cause (bad option, missing data folder, corrupt checkpoint) raises a
FlatqError with a message that names the problem; the CLI prints it on one line and exits
non-zero. Any other exception is a bug in flatq and keeps its traceback.
"""


class FlatqError(Exception):
    """A problem with the user's input, reported without a traceback."""


class ConfigError(FlatqError):
    """A configuration value (flag, YAML key) is unknown or out of range."""


class DataError(FlatqError):
    """A data set is missing, incomplete or corrupt."""


class CheckpointError(FlatqError):
    """A checkpoint is missing, corrupt or belongs to another model."""


class NonFiniteLossError(FlatqError):
    """Training produced a NaN or infinite loss; the weights were not updated with it."""
