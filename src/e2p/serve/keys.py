"""The tenant key file `e2p serve --keys FILE` reads and `e2p keys add` writes: for every API key its salted
SHA-256 hash (never the key), its tenant and its role (`user`: inference and metadata of the tenant's users;
`admin`: also writes, deletes and the vectors of the tenant's users).

    {"format": "e2p-keys/1",
     "keys": [{"tenant": "acme", "role": "admin", "hash": "sha256:<salt hex>:<sha256(salt + key) hex>",
               "added": "2026-12-02T04:10:00Z"}]}

A fast hash is enough because keys are long random secrets (at least MIN_KEY_CHARS characters, `e2p keys add`
refuses shorter ones), not passwords; the salt keeps two files' hashes of one key apart. A key is checked
against every entry in constant time (no early exit), so timing tells nothing about which entry matched."""
from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .limits import Limits

FORMAT = "e2p-keys/1"
ROLES = ("user", "admin")
MIN_KEY_CHARS = 16
TENANT_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HASH = re.compile(r"sha256:([0-9a-f]{32}):([0-9a-f]{64})")
NEW_KEY_HINT = "python -c 'import secrets; print(\"sk-\" + secrets.token_urlsafe(32))'"


class KeyFileError(ConfigError):
    """A key file that cannot be used: the message is one line naming the file, the entry and the fix."""


@dataclass(frozen=True)
class KeyEntry:
    tenant: str
    role: str
    salt: bytes
    digest: bytes
    limits: Limits = Limits()  # this key's own rate limits (over its tenant's defaults; absent: unlimited)

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def matches(self, key: str) -> bool:
        return hmac.compare_digest(_digest(self.salt, key), self.digest)

    def to_json(self) -> dict:
        limits = {k: v for k, v in (("requests_per_minute", self.limits.requests_per_minute),
                                    ("tokens_per_minute", self.limits.tokens_per_minute)) if v is not None}
        return {"tenant": self.tenant, "role": self.role, "hash": f"sha256:{self.salt.hex()}:{self.digest.hex()}",
                **limits}


def limits_of(entry: dict, where: str) -> Limits:
    """The limits of a key-file entry or tenant settings object; KeyFileError for a value that is not a positive int."""
    values = {}
    for name in ("requests_per_minute", "tokens_per_minute"):
        value = entry.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise KeyFileError(f"{where}{name} must be a whole number >= 1 (or absent: unlimited), got {value!r}")
        values[name] = value
    return Limits(**values)


def _digest(salt: bytes, key: str) -> bytes:
    return hashlib.sha256(salt + key.encode()).digest()


def check_tenant(tenant: str, where: str = "") -> str:
    if not isinstance(tenant, str) or not TENANT_RULE.fullmatch(tenant):
        raise KeyFileError(f"{where}tenant {tenant!r} is not a tenant name: use 1-64 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    return tenant


def check_role(role: str, where: str = "") -> str:
    if role not in ROLES:
        raise KeyFileError(f"{where}role {role!r} is not a role: use \"user\" or \"admin\"")
    return role


def new_entry(tenant: str, role: str, key: str, limits: Limits = Limits()) -> KeyEntry:
    check_tenant(tenant)
    check_role(role)
    if not isinstance(key, str) or len(key) < MIN_KEY_CHARS or key != key.strip() or not key.isprintable():
        raise KeyFileError(f"an API key must be at least {MIN_KEY_CHARS} printable characters without surrounding "
                           f"spaces (a long random secret): make one with {NEW_KEY_HINT}")
    salt = secrets.token_bytes(16)
    return KeyEntry(tenant, role, salt, _digest(salt, key), limits)


def load_keys(path: str | Path) -> list[KeyEntry]:
    """The entries of a key file; KeyFileError (one line: the file, the entry, what to fix) for anything off."""
    return read_key_file(path)[0]


def read_key_file(path: str | Path) -> tuple[list[KeyEntry], dict[str, dict]]:
    """A key file read and checked once: (its entries, its per-tenant settings)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist: write it with `e2p keys add --file {path} "
                           "--tenant T --role user|admin`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"key file {path} cannot be read ({exc}): check its path and permissions") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeyFileError(f"key file {path} is not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}): fix it "
                           "or write it again with `e2p keys add`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("keys"), list):
        raise KeyFileError(f"key file {path} is not an e2p key file: it must be a JSON object with \"format\": "
                           f"\"{FORMAT}\" and a \"keys\" list (write it with `e2p keys add`)")
    entries = []
    for n, item in enumerate(data["keys"]):
        where = f"key file {path}, keys[{n}]: "
        if not isinstance(item, dict):
            raise KeyFileError(f"{where}each entry must be an object with \"tenant\", \"role\" and \"hash\"")
        check_tenant(item.get("tenant"), where)
        check_role(item.get("role"), where)
        if "key" in item:
            raise KeyFileError(f"{where}holds a plain \"key\": key files hold hashes only; remove the entry and add "
                               "the key with `e2p keys add` (and rotate it: it was on disk in plain text)")
        match = _HASH.fullmatch(str(item.get("hash", "")))
        if match is None:
            raise KeyFileError(f"{where}\"hash\" must be \"sha256:<32 hex salt>:<64 hex digest>\" as `e2p keys add` "
                               "writes it")
        entries.append(KeyEntry(item["tenant"], item["role"], bytes.fromhex(match[1]), bytes.fromhex(match[2]),
                                limits_of(item, where)))
    return entries, _checked_tenants(data.get("tenants", {}), path)


def tenant_settings(path: str | Path) -> dict[str, dict]:
    """The key file's per-tenant settings, `{"tenants": {"acme": {"allow_remember": true}}}` ({} when none)."""
    return read_key_file(path)[1]


def _checked_tenants(tenants, path) -> dict[str, dict]:
    if not isinstance(tenants, dict) or not all(isinstance(v, dict) for v in tenants.values()):
        raise KeyFileError(f"key file {path}: \"tenants\" must be an object of tenant -> settings object; write it "
                           "with `e2p keys tenant`")
    for name, settings in tenants.items():
        check_tenant(name, f"key file {path}, tenants: ")
        limits_of(settings, f"key file {path}, tenants[{name!r}]: ")
    return tenants


def tenant_limits(path: str | Path) -> dict[str, Limits]:
    """Each tenant's default rate limits from the key file (tenants without any are left out)."""
    return limits_by_tenant(tenant_settings(path))


def limits_by_tenant(settings: dict[str, dict]) -> dict[str, Limits]:
    """Tenant settings -> each tenant's default rate limits (tenants without any left out)."""
    out = {name: limits_of(v, "") for name, v in settings.items()}
    return {name: limits for name, limits in out.items() if limits.any}


def set_tenant(path: str | Path, tenant: str, **settings) -> dict:
    """Set `tenant`'s settings (allow_remember, requests_per_minute, tokens_per_minute) in the key file, replaced
    atomically like `add_key`; a setting given as None stays as it is, a limit of 0 is removed (unlimited)."""
    path = Path(path)
    check_tenant(tenant)
    body = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"format": FORMAT, "keys": []}
    if path.exists():
        tenant_settings(path)
    given = {k: v for k, v in settings.items() if v is not None}  # None: leave as it is; a limit of 0: remove it
    limits_of({k: v for k, v in given.items() if v != 0}, "")
    current = {k: v for k, v in {**body.get("tenants", {}).get(tenant, {}), **given}.items()
               if not (k.endswith("_per_minute") and v == 0)}
    body["tenants"] = {**body.get("tenants", {}), tenant: current}
    _write_atomically(path, body)
    return current


def find_key(entries: list[KeyEntry], key: str) -> KeyEntry | None:
    """The entry `key` belongs to, or None; every entry is checked (constant time in which one matched)."""
    found = None
    for entry in entries:
        if entry.matches(key) and found is None:
            found = entry
    return found


def add_key(path: str | Path, tenant: str, role: str, key: str, limits: Limits = Limits()) -> KeyEntry:
    """Add `key` (hashed) for `tenant` with `role` (and its own rate `limits`) to the key file at `path`, creating it if
    missing; the file is replaced atomically (a temporary file in the same folder, fsync, rename) and readable by its
    owner only."""
    path = Path(path)
    entries = load_keys(path) if path.exists() else []
    limits_of({"requests_per_minute": limits.requests_per_minute, "tokens_per_minute": limits.tokens_per_minute}, "")
    entry = new_entry(tenant, role, key, limits)
    existing = find_key(entries, key)
    if existing is not None:
        raise KeyFileError(f"this key is already in {path} (tenant {existing.tenant!r}, role {existing.role!r}): "
                           f"use a new key, {NEW_KEY_HINT}")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    # the file as written: its keys with any fields of their own, and its other fields (tenants) kept
    body = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"keys": []}
    body = {**body, "format": FORMAT, "keys": body["keys"] + [{**entry.to_json(), "added": now}]}
    _write_atomically(path, body)
    return entry


def _write_atomically(path: Path, body: dict) -> None:
    """A temporary file in the same folder, fsync, rename; readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
