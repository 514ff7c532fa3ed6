"""Every error type flaxbert raises for bad input, in one place: each message names the file, key, setting or
parameter at fault. Entry points catch these and print the message (never a traceback from deep inside JAX).
The modules that raise them import them from here (and re-export them where users have always found them)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


class DataError(ValueError):
    """Bad input data or settings; the message names the file (and line) where it applies."""


class InputError(ValueError):
    """A batch does not fit the model (shape, dtype or id range); the message names the key."""


class VocabError(ValueError):
    """A tokenizer directory or vocabulary cannot be used; the message names the path."""


class HFLoadError(ValueError):
    """A checkpoint cannot be loaded; the message names the file or parameter."""


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it is unreadable or corrupt."""
