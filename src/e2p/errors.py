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


class UpstreamError(E2PError, RuntimeError):
    """The engine behind e2p (a vLLM server in gateway mode) is down, slow or answered an error: `status` is the HTTP
    status e2p answers with (502 bad answer, 503 unreachable, 504 too slow), `code` the OpenAI-shaped error code."""

    def __init__(self, status: int, message: str, code: str = "upstream_error"):
        super().__init__(message)
        self.status, self.code = status, code
