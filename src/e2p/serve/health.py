"""What a load balancer and a client ask before anything else: `/healthz` (is the decoding worker alive and making
progress) and `/v1/models` (the one model this server serves)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..devices import rss_bytes
from .auth import inference_caller, metrics_caller
from .protocol import Health, ModelCard, ModelList, dump
from .serving import OpenAIServing


def health(serving: OpenAIServing) -> tuple[dict, int]:
    """Liveness of the decoding worker: 503 when it died or has made no step for `stall_seconds` while busy."""
    batcher, config = serving.batcher, serving.config
    age = batcher.step_age()
    status = ("unavailable" if not batcher.alive else "stalled" if age > config.stall_seconds else "ok")
    body = Health(status=status, model=config.model_name, queue_depth=batcher.depth(), max_queue=config.max_queue,
                  busy=batcher.busy, seconds_since_step=round(age, 3), rss_bytes=rss_bytes())
    return dump(body), 200 if status == "ok" else 503


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


@router.get("/metrics", dependencies=[Depends(metrics_caller)])
async def prometheus_metrics(request: Request):
    data, content_type = request.app.state.metrics.render()
    return Response(data, media_type=content_type)
