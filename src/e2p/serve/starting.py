"""The port opens before the model loads: `StartingApp` answers while `build()` loads the model and store in a thread
(`/readyz` and `/healthz` 503 `starting`, every other route an OpenAI-shaped 503 with Retry-After), then hands every
request to the app it built, whose lifespan (the batcher) it runs. A load balancer sees a replica that is up but not
ready, instead of a refused connection; a failed load stops the server with the load's error."""
from __future__ import annotations

import asyncio
import json
import logging
import threading

from starlette.datastructures import State

log = logging.getLogger("e2p.serve")


class StartingApp:
    """ASGI app around `build() -> (app, model)`, run in a thread at start-up; see the module doc."""

    def __init__(self, build, on_failure=None):
        self.build, self.on_failure = build, on_failure
        self.app = self.model = self.error = None
        self._state = State()
        self._lifespan = None

    @property
    def state(self):
        """The built app's state once there is one (DrainingServer sets `draining` on it)."""
        return self.app.state if self.app is not None else self._state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan_events(receive, send)
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        if path in ("/readyz", "/healthz"):
            body = {"ready": False, "status": "starting", "model_loaded": False, "store": "unknown", "draining": False}
        else:
            body = {"error": {"message": "the server is starting (loading the model): retry shortly", "type": "server_error",
                              "param": None, "code": "starting"}}
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    async def _lifespan_events(self, receive, send) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                threading.Thread(target=self._load, args=(loop,), name="e2p-load", daemon=True).start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._lifespan is not None:
                    await self._lifespan.__aexit__(None, None, None)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _load(self, loop) -> None:
        try:
            app, model = self.build()
            draining = getattr(self._state, "draining", False)
            asyncio.run_coroutine_threadsafe(self._start(app), loop).result()
            self.model = model
            if draining:
                app.state.draining = True
            log.info("ready: the model is loaded")
        except BaseException as exc:  # the server cannot serve: stop it, the CLI reports the error
            self.error = exc
            log.error("start-up failed: %s", exc)
            if self.on_failure is not None:
                self.on_failure()

    async def _start(self, app) -> None:
        self._lifespan = app.router.lifespan_context(app)
        await self._lifespan.__aenter__()
        self.app = app
