"""Who may call what: the bearer key of a request names a `Caller`, a tenant and whether it is an admin. Keys come
from the tenant key file (`--keys FILE`, hashed: serve/keys.py) and from the single-key flags (`--api-key`,
`--admin-key`: the default tenant). Inference needs any key; writes to the store and a user's vector need an admin
key, and act on the caller's own tenant only; /metrics needs the metrics key (or the default admin key) when one is
set. Keys are compared in constant time."""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Mapping

from ..store import DEFAULT_TENANT
from .keys import find_key
from .limits import Limits
from fastapi import Request

from .serving import APIError, ServeConfig


@dataclass(frozen=True)
class Caller:
    """Whose request this is: its tenant (the namespace of its users) and whether it holds an admin key."""

    tenant: str = DEFAULT_TENANT
    admin: bool = False


def bearer_key(headers: Mapping[str, str]) -> str | None:
    """The key of an `Authorization: Bearer KEY` header, or None. Two Authorization headers are refused (401): which
    one a proxy or the server would read differs, so neither is trusted."""
    values = headers.getlist("authorization") if hasattr(headers, "getlist") else [headers.get("authorization", "")]
    if len(values) > 1:
        raise APIError(401, f"{len(values)} Authorization headers: send exactly one, `Authorization: Bearer KEY`",
                       code="invalid_api_key")
    header = values[0] if values else ""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _same(key: str, secret: str) -> bool:
    return hmac.compare_digest(key.encode(), secret.encode())


def _is_admin(config: ServeConfig, key: str | None) -> bool:
    return bool(key and config.admin_key and _same(key, config.admin_key))


def identify(config: ServeConfig, key: str) -> Caller | None:
    """The caller `key` names, or None for an unknown key (every key is compared: no early exit)."""
    legacy_admin = _is_admin(config, key)
    legacy_user = any([_same(key, k) for k in config.api_keys])
    entry = find_key(config.keys, key)
    if legacy_admin:
        return Caller(DEFAULT_TENANT, True)
    if legacy_user:
        return Caller(DEFAULT_TENANT, False)
    if entry is not None:
        return Caller(entry.tenant, entry.admin)
    return None


def authorize(config: ServeConfig, key: str | None, admin: bool = False) -> Caller:
    """The request's caller; 401 for a missing or unknown key, 403 when `admin` is needed and the key is not one."""
    if config.open:
        return Caller(DEFAULT_TENANT, True)
    if key is None:
        raise APIError(401, "missing API key: send `Authorization: Bearer KEY`", code="invalid_api_key")
    caller = identify(config, key)
    if caller is None:
        raise APIError(401, "incorrect API key provided: send a key this server knows (--keys file, --api-key or "
                            "--admin-key)", code="invalid_api_key")
    if admin and not caller.admin:
        if caller.tenant == DEFAULT_TENANT and not config.admin_key and not config.keys:
            raise APIError(403, "embedding writes are disabled: start the server with --admin-key (or E2P_ADMIN_KEY)"
                                " or an admin key in --keys", code="permission_denied")
        raise APIError(403, "this needs an admin key of your tenant", code="permission_denied")
    return caller


def rate_limit_of(config: ServeConfig, headers) -> tuple[str, Limits] | None:
    """(who, limits) for a request whose key has rate limits (its own over its tenant's), else None: no key, an unknown
    key (the route answers 401) or an unlimited one. `who` names the key by a hash prefix, never the key."""
    try:
        key = bearer_key(headers)
    except APIError:
        return None
    if key is None or config.open:
        return None
    if _is_admin(config, key) or any([_same(key, k) for k in config.api_keys]):
        limits = config.tenant_limits.get(DEFAULT_TENANT, Limits())
        who = f"{DEFAULT_TENANT}/{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    else:
        entry = find_key(config.keys, key)
        if entry is None:
            return None
        limits = entry.limits.over(config.tenant_limits.get(entry.tenant, Limits()))
        who = f"{entry.tenant}/{entry.digest.hex()[:16]}"
    return (who, limits) if limits.any else None


def authorize_metrics(config: ServeConfig, key: str | None) -> None:
    """With a metrics key configured, /metrics needs it (or the default tenant's admin key)."""
    metrics_key = config.metrics_key
    if metrics_key is not None:
        if key is None or not (_same(key, metrics_key) or _is_admin(config, key)):
            raise APIError(401, "metrics need the metrics key: send `Authorization: Bearer METRICS_KEY`",
                           code="invalid_api_key")


# --- the routers' dependencies: the request's caller, checked against the app's config --------------------------
async def inference_caller(request: Request) -> Caller:
    """Any key of the server (inference): its tenant; 401 otherwise."""
    return authorize(request.app.state.config, bearer_key(request.headers))


async def admin_caller(request: Request) -> Caller:
    """An admin key of its tenant (writes, deletes, vectors); 401 / 403 otherwise."""
    return authorize(request.app.state.config, bearer_key(request.headers), admin=True)


async def metrics_caller(request: Request) -> None:
    authorize_metrics(request.app.state.config, bearer_key(request.headers))
