"""The base class of every error jaxsd raises for input it cannot use.

A missing or odd folder, a config key that does not exist, a cache made by another VAE,
an image that cannot be decoded: the user fixes these, so every `jaxsd` command reports an
`InputError` as one message (exit 2) that says what is wrong and what to do. Any other
exception is a bug in jaxsd and keeps its traceback (exit 1).

`InputError` derives from ValueError so code that catches ValueError keeps working;
subclasses that are about files also derive from FileNotFoundError where that is what they mean.
"""

from __future__ import annotations


class InputError(ValueError):
    """Input jaxsd cannot use; the message says what is wrong, where, and what to do."""
