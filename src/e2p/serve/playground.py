"""The playground (`GET /playground`): a static page, shipped in the package (`serve/static/`, no CDN, no build
step), that compares replies of up to four users side by side through the server's public API only, plus the
read-only endpoints it needs, which any client may call alike: `GET /v1/projector` (the served projector's card),
and for admins `GET /v1/users` (the tenant's users' metadata) and `GET /v1/users/map` (their 2-D PCA map)."""
from __future__ import annotations

import logging
from importlib import resources

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from ..store import StoreError
from .auth import Caller, admin_caller, inference_caller
from .card import projector_card
from .protocol_users import MapPoint, ProjectorCard, UserList, UserListing, UserMap
from .serving import APIError
from .usermap import as_the_projector_reads, pca_2d

log = logging.getLogger("e2p.serve")

STATIC = resources.files("e2p.serve") / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
# the page loads nothing but its own files and talks to nothing but this server
HEADERS = {"content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                      "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
           "x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "cache-control": "no-cache"}
MAX_LIST, MAX_MAP = 500, 5000


def asset(name: str) -> Response:
    """One of the page's files, by its plain name (no paths: nothing outside `static/` can be named)."""
    suffix = name[name.rfind("."):] if "." in name else ""
    file = STATIC / name
    if "/" in name or "\\" in name or suffix not in TYPES or not file.is_file():
        raise APIError(404, f"no playground file {name!r}: open /playground", code="not_found")
    return Response(file.read_bytes(), media_type=TYPES[suffix], headers=HEADERS)


def _text_param(value: str, param: str) -> str:
    if any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise APIError(400, f"{param} contains control characters: send printable text", param=param,
                       code="invalid_value")
    return value


def _store_down(exc: StoreError) -> APIError:
    return APIError(503, f"the embedding store cannot be read: {exc}", type="server_error", code="store_unavailable",
                    headers={"retry-after": "1"})


router = APIRouter()


@router.get("/playground", include_in_schema=False)
async def playground_page():
    return asset("index.html")


@router.get("/playground/{name}", include_in_schema=False)
async def playground_file(name: str):
    return asset(name)


@router.get("/v1/projector", response_model=ProjectorCard)
async def projector(request: Request, caller: Caller = Depends(inference_caller)) -> ProjectorCard:
    """The served model and projector (backbone, k, injection) and the verdict of its training report: does
    the embedding carry the person, with the intervals (or that nothing was measured); and the caller's role."""
    users = request.app.state.users
    encoder = users.embedder.name if users.embedder is not None else None
    return projector_card(request.app.state.serving, caller.tenant, caller.admin, encoder)


@router.get("/v1/users", response_model=UserList)
async def list_users(request: Request,
                     prefix: str = Query("", max_length=256, description="ids that start with this"),
                     after: str = Query("", max_length=256, description="`next_after` of the page before"),
                     limit: int = Query(50, ge=1, le=MAX_LIST),
                     caller: Caller = Depends(admin_caller)) -> UserList:
    """Admin: a page of the tenant's users in id order, with dimension, version and update time (no vector)."""
    store, admission = request.app.state.store, request.app.state.users.user_admission
    prefix, after = _text_param(prefix, "prefix"), _text_param(after, "after")
    try:
        rows = await admission.run(store.listing, limit + 1, after, prefix, caller.tenant)
        total = await admission.run(store.count, caller.tenant)
    except StoreError as exc:
        raise _store_down(exc) from None
    more = len(rows) > limit
    rows = rows[:limit]
    return UserList(data=[UserListing(**r) for r in rows], total=total, has_more=more,
                    next_after=rows[-1]["user"] if more else None)


@router.get("/v1/users/map", response_model=UserMap)
async def user_map(request: Request,
                   limit: int = Query(1000, ge=1, le=MAX_MAP, description="users on the map (first in id order)"),
                   caller: Caller = Depends(admin_caller)) -> UserMap:
    """Admin: the tenant's users (the first `limit` in id order) on the first two principal components of their
    embeddings as the projector reads them (centred, unit length), computed here: coordinates, never vectors."""
    serving, store = request.app.state.serving, request.app.state.store
    pconfig = serving.model.projector.config if serving.model.projector is not None else None
    mean = np.asarray(pconfig.embedding_mean, dtype=np.float64) if pconfig and pconfig.embedding_mean else None

    def compute():
        records, damaged = store.records(limit, caller.tenant)
        if not records:
            return [], np.zeros((0, 2)), [0.0, 0.0], damaged, store.count(caller.tenant)
        coords, shares = pca_2d(as_the_projector_reads(np.stack([r.vector for r in records]), mean))
        return [r.user for r in records], coords, shares, damaged, store.count(caller.tenant)

    try:
        ids, coords, shares, damaged, total = await request.app.state.users.user_admission.run(compute)
    except StoreError as exc:
        raise _store_down(exc) from None
    points = [MapPoint(user=u, x=round(float(x), 6), y=round(float(y), 6)) for u, (x, y) in zip(ids, coords)]
    return UserMap(total=total, shown=len(points), damaged=damaged, explained_variance=shares, points=points)
