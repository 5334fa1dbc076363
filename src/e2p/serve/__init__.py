"""`e2p serve`: an OpenAI-compatible HTTP server with continuous batching across users and a live embedding store."""
from .app import APIError, ServeConfig, create_app, load_model

__all__ = ["APIError", "ServeConfig", "create_app", "load_model"]
