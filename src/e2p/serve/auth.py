"""Who may call what: the bearer key of a request checked against the server's keys (inference: an API key or the
admin key; writes to the store: the admin key; /metrics: the metrics key, when one is set). Keys are compared in
constant time."""
from __future__ import annotations

import hmac
from typing import Mapping

from .serving import APIError, ServeConfig


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


def _is_api_key(config: ServeConfig, key: str) -> bool:
    return any(_same(key, k) for k in config.api_keys)


def authorize(config: ServeConfig, key: str | None, admin: bool = False) -> bool:
    """Raise 401 / 403 unless `key` (a bearer key, or None) is allowed; return whether it is the admin key."""
    is_admin = _is_admin(config, key)
    if config.open:
        return True
    if key is None:
        raise APIError(401, "missing API key: send `Authorization: Bearer KEY`", code="invalid_api_key")
    if admin:
        if not config.admin_key:
            raise APIError(403, "embedding writes are disabled: start the server with --admin-key (or E2P_ADMIN_KEY)",
                           code="permission_denied")
        if not is_admin:
            if not _is_api_key(config, key):
                raise APIError(401, "incorrect API key", code="invalid_api_key")
            raise APIError(403, "this needs the admin key", code="permission_denied")
        return True
    if is_admin or _is_api_key(config, key):
        return is_admin
    raise APIError(401, "incorrect API key provided", code="invalid_api_key")


def authorize_metrics(config: ServeConfig, key: str | None) -> None:
    """With a metrics key configured, /metrics needs it (or the admin key)."""
    metrics_key = config.metrics_key
    if metrics_key is not None:
        if key is None or not (_same(key, metrics_key) or _is_admin(config, key)):
            raise APIError(401, "metrics need the metrics key: send `Authorization: Bearer METRICS_KEY`",
                           code="invalid_api_key")
