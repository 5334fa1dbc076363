"""`e2p serve`: an OpenAI-compatible HTTP server with continuous batching across users and a live embedding store.

Layers, as in vLLM's OpenAI entrypoint: `protocol` (request / response schemas), `serving` (`OpenAIServing`: the
checks and answers behind the routes), `app` (the FastAPI app: routes, auth, errors, middleware)."""
from .app import create_app
from .serving import APIError, ServeConfig, load_model

__all__ = ["APIError", "ServeConfig", "create_app", "load_model"]
