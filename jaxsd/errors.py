"""The base classes of every error jaxsd raises for input it cannot use.

A missing or odd folder, a config key that does not exist, a cache made by another VAE,
an image that cannot be decoded: the user fixes these, so every `jaxsd` command reports an
`InputError` as one message (exit 2) that says what is wrong and what to do (jaxsd/cli.py).
Any other exception is a bug in jaxsd and keeps its traceback (exit 1).

`InputError` derives from ValueError so code that catches ValueError keeps working;
subclasses that are about missing files also derive from FileNotFoundError.
This module imports nothing, so every layer (models, convert, data, ...) may raise these.
"""

from __future__ import annotations


class InputError(ValueError):
    """Input jaxsd cannot use; the message says what is wrong, where, and what to do."""


class InputNotFoundError(InputError, FileNotFoundError):
    """A file or folder the user named does not exist, or lacks what it must hold."""


class ConfigError(InputError):
    """A config file or override names an unknown key or has a value jaxsd cannot use."""
