"""`e2p serve`: an OpenAI-compatible HTTP server with continuous batching across users and a live embedding store.

Layers, as in vLLM's OpenAI entrypoint: `protocol` (request / response schemas), `serving` (`OpenAIServing`: what
the endpoint families share), the families `prompts` + `chat`, `users` and `health`, `auth` (keys), and `app` (the
FastAPI app: thin routes, errors, middleware); `e2p.load` loads the model to serve."""
from .app import create_app
from .serving import APIError, ServeConfig

__all__ = ["APIError", "ServeConfig", "create_app"]
