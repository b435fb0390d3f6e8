"""The model's own error: an input it cannot take (wrong bands, shape, size, layer index).

A ``ValueError``, so the model stays usable from Python without the command line; the command
layer reports it as a one-sentence user error (exit code 2).
"""

from __future__ import annotations


class ModelInputError(ValueError):
    """The tensors given to a model do not fit it."""


__all__ = ["ModelInputError"]
