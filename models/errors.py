"""Domain exceptions raised by `models/`; messages name the fix, no HTTP status codes here."""

from __future__ import annotations


class ModelsError(Exception):
    """Root of every error `models/` raises on purpose."""


class DatasetMissingError(ModelsError):
    """The Fashion-MNIST files are not where we looked."""


class DatasetCorruptError(ModelsError):
    """A Fashion-MNIST file exists but cannot be read as IDX."""


class BundleError(ModelsError):
    """A bundle directory or its manifest is malformed."""


class BundleHashError(BundleError):
    """A bundle file's sha256 differs from the one its manifest records."""


class CodingShapeError(ModelsError):
    """Outputs handed to the encoder/decoder have the wrong shape or values."""


class RefinementError(ModelsError):
    """A refinement plan or engine request is not valid for this model."""


class ImportSpecError(ModelsError):
    """A user's models cannot be imported: a bad layer spec, weights that do not fit it, an ONNX
    operator we do not map, or a data file of the wrong shape. The message names the member and key."""
