"""What a load balancer and a client ask before anything else: `/healthz` (liveness: is the decoding worker alive and
making progress), `/readyz` (readiness: model loaded, store answering, not draining; a replica that received SIGTERM
turns not ready first, so the balancer stops sending before it stops, `DrainingServer`) and `/v1/models`."""
from __future__ import annotations

import logging
import threading

import uvicorn
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..devices import rss_bytes
from .auth import inference_caller, metrics_caller
from ..store import StoreError
from .protocol import Health, ModelCard, ModelList, Readiness, dump
from .serving import OpenAIServing

log = logging.getLogger("e2p.serve")


def health(serving: OpenAIServing) -> tuple[dict, int]:
    """Liveness of the decoding worker: 503 when it died or has made no step for `stall_seconds` while busy."""
    batcher, config = serving.batcher, serving.config
    age = batcher.step_age()
    status = ("unavailable" if not batcher.alive else "stalled" if age > config.stall_seconds else "ok")
    body = Health(status=status, model=config.model_name, queue_depth=batcher.depth(), max_queue=config.max_queue,
                  busy=batcher.busy, seconds_since_step=round(age, 3), rss_bytes=rss_bytes())
    return dump(body), 200 if status == "ok" else 503


def readiness(serving: OpenAIServing, draining: bool) -> tuple[dict, int]:
    """Ready when the model is loaded (the batcher runs), the store answers a read, and no drain has begun."""
    try:
        serving.store.ping()
        store = "ok"
    except StoreError as exc:
        log.warning("readiness: the store does not answer", extra={"error": str(exc)})
        store = "unavailable"
    loaded = serving.batcher.alive
    ready = loaded and store == "ok" and not draining
    body = Readiness(ready=ready, model_loaded=loaded, store=store, draining=draining)
    return dump(body), 200 if ready else 503


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM / SIGINT starts a drain: /readyz answers 503 at once while requests are still
    served for `drain_seconds`, so a load balancer stops sending first; then the usual graceful shutdown (a second
    signal stops at once, as in uvicorn)."""

    def __init__(self, config: uvicorn.Config, drain_seconds: float = 0.0):
        super().__init__(config)
        self.drain_seconds = drain_seconds

    def handle_exit(self, sig, frame) -> None:
        state = self.config.app.state
        if self.drain_seconds > 0 and not getattr(state, "draining", False):
            state.draining = True
            log.info("draining: /readyz answers 503; shutting down in %.1f s", self.drain_seconds)
            timer = threading.Timer(self.drain_seconds, super().handle_exit, (sig, frame))
            timer.daemon = True
            timer.start()
            return
        state.draining = True
        super().handle_exit(sig, frame)


def model_list(serving: OpenAIServing) -> dict:
    return dump(ModelList(data=[ModelCard(id=serving.config.model_name, created=serving.created)]))


def model_card(serving: OpenAIServing, name: str) -> dict:
    serving.check_model(name)
    return dump(ModelCard(id=serving.config.model_name, created=serving.created))


# --- the routes: the model list, liveness, Prometheus metrics ------------------------------------------------------
router = APIRouter()


@router.get("/v1/models", dependencies=[Depends(inference_caller)])
async def models(request: Request):
    return model_list(request.app.state.serving)


@router.get("/v1/models/{name}", dependencies=[Depends(inference_caller)])
async def model_card_route(name: str, request: Request):
    return model_card(request.app.state.serving, name)


@router.get("/healthz")
async def healthz(request: Request):
    """Liveness of the decoding worker: 503 when it died or has made no step for `stall_seconds` while busy."""
    body, status = health(request.app.state.serving)
    return JSONResponse(body, status_code=status)


@router.get("/readyz")
async def readyz(request: Request):
    """Readiness for a load balancer: 503 while the store does not answer or the replica drains (no key needed)."""
    body, status = readiness(request.app.state.serving, getattr(request.app.state, "draining", False))
    return JSONResponse(body, status_code=status)


@router.get("/metrics", dependencies=[Depends(metrics_caller)])
async def prometheus_metrics(request: Request):
    data, content_type = request.app.state.metrics.render()
    return Response(data, media_type=content_type)
