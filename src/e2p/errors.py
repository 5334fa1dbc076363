"""Specific exceptions, so callers (CLI, server) can turn them into clear messages."""


class E2PError(Exception):
    """Base class of every error e2p raises on purpose."""


class ConfigError(E2PError, ValueError):
    """A configuration or checkpoint that cannot be used as given."""


class EmbeddingError(E2PError, ValueError):
    """An embedding of the wrong size, or with NaN / inf values."""


class BackboneMismatchError(E2PError, ValueError):
    """A projector loaded onto a backbone it was not trained for."""


class DataError(E2PError, ValueError):
    """Input data that cannot be used as given: the message names the file, the row and the fix (no row is skipped)."""
