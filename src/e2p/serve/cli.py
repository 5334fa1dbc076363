"""`e2p serve`, `e2p users ...` and `e2p keys add` subcommands (registered by e2p.cli.build_parser via
add_serve_commands)."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from ..errors import ConfigError

log = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args) -> None:
    import uvicorn

    from ..config import resolve_projector
    from ..store import open_store
    from .app import create_app
    from .health import DrainingServer
    from .starting import StartingApp
    from ..loading import load
    from .logs import configure_json_logging
    from .serving import ServeConfig

    from .keys import find_key, limits_by_tenant, read_key_file

    keys, settings = read_key_file(args.keys) if args.keys else ([], {})  # KeyFileError: the file, entry and fix
    remember = {t for t, v in settings.items() if v.get("allow_remember")} | ({"default"} if args.allow_remember else set())
    configure_json_logging(logging.DEBUG if args.verbose else logging.INFO)
    api_keys = [k for k in (args.api_key or os.environ.get("E2P_API_KEY") or "").split(",") if k]
    admin_key = args.admin_key or os.environ.get("E2P_ADMIN_KEY") or None
    if not api_keys and not admin_key and not keys and not _is_loopback(args.host) and not args.no_auth:
        raise ConfigError(f"refusing to serve on {args.host} without keys: pass --keys FILE (`e2p keys add`), set "
                          "E2P_API_KEY / E2P_ADMIN_KEY (or --api-key / --admin-key), or pass --no-auth if the network "
                          "is trusted")
    if admin_key and admin_key in api_keys:
        raise ConfigError("the admin key must differ from the API keys")
    for plain in api_keys + ([admin_key] if admin_key else []):
        entry = find_key(keys, plain)
        if entry is not None:
            raise ConfigError(f"a key of --api-key / --admin-key is also in {args.keys} (tenant {entry.tenant!r}): "
                              "use one key per tenant and role")
    if not api_keys and not admin_key and not keys:
        log.warning("no API keys: the server is open to anyone who can reach it")
    from .batching import guest_rows_for

    rows = args.max_batch_size + guest_rows_for(args.max_batch_size)  # a tenant with no row may join a full batch
    from ..engines import vllm_engine_args

    engine = "vllm" if args.vllm_url else args.engine
    if args.projector:  # what can be checked without loading anything fails before the port opens
        from ..config import E2PConfig
        from ..engines import check_engine

        check_engine(engine, E2PConfig.load(resolve_projector(args.projector)))
    name = args.model_name or (f"e2p-{os.path.basename(os.path.normpath(args.projector))}" if args.projector else "e2p")
    config = ServeConfig(model_name=name, api_keys=api_keys, admin_key=admin_key, keys=keys,
                         log_user_ids=args.log_user_ids, max_body_bytes=args.max_body_bytes,
                         max_tokens_limit=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                         max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                         fair_shares=not args.no_fair_shares,
                         request_timeout_s=args.request_timeout, allow_unknown_users=args.allow_unknown_users,
                         max_messages=args.max_messages, max_prompt_chars=args.max_prompt_chars,
                         stall_seconds=args.stall_seconds, max_stop_strings=args.max_stop_strings,
                         max_stop_chars=args.max_stop_chars, max_embed_requests=args.max_embed_requests,
                         max_user_requests=args.max_user_requests,
                         profile_rule=args.profile_rule, remember_tenants=frozenset(remember),
                         tenant_limits=limits_by_tenant(settings), otlp_endpoint=args.otlp_endpoint,
                         projector_dir=str(resolve_projector(args.projector)) if args.projector else None,
                         metrics_key=args.metrics_key or os.environ.get("E2P_METRICS_KEY") or None)

    def build():
        """The model, the store and the app: loaded in a thread while the port already answers 503 `starting`."""
        model = load(args.projector, engine=engine, backbone=args.backbone, device=args.device, dtype=args.dtype,
                     gguf=args.gguf, max_batch_size=rows, max_prompt_tokens=args.max_prompt_tokens,
                     max_new_tokens=args.max_tokens_limit, vllm_args=vllm_engine_args(args), vllm_url=args.vllm_url,
                     vllm_dtype=args.vllm_dtype).model
        return create_app(model, open_store(args.store), config), model

    starting = StartingApp(build, on_failure=lambda: setattr(server, "should_exit", True))
    server = DrainingServer(uvicorn.Config(starting, host=args.host, port=args.port, log_config=None, access_log=False,
                                           timeout_graceful_shutdown=args.graceful_timeout,
                                           limit_concurrency=args.max_connections), drain_seconds=args.drain_seconds)
    try:
        server.run()
    finally:
        if hasattr(starting.model, "close"):
            starting.model.close()
    if starting.error is not None:
        raise starting.error


def cmd_users_import(args) -> None:
    from ..store import import_embeddings, open_store

    dim = args.dim
    if args.projector:
        from ..config import E2PConfig

        dim = E2PConfig.load(args.projector).embedding_dim or None
    store = open_store(args.store, dim=dim)
    tenant = _tenant(args)
    n = import_embeddings(args.file, store, ids_file=args.ids, chunk_rows=args.chunk_rows,
                          user_column=args.user_column, embedding_column=args.embedding_column, tenant=tenant)
    print(f"imported {n} embeddings into {args.store} (tenant {tenant}: {store.count(tenant)} users, "
          f"dimension {store.dim})")


def _tenant(args) -> str:
    from .keys import check_tenant

    return check_tenant(args.tenant)


def cmd_users_list(args) -> None:
    from ..store import CorruptEmbeddingError, open_store

    tenant = _tenant(args)
    store = open_store(args.store)
    print(f"tenant {tenant}: {store.count(tenant)} users, dimension {store.dim}")
    for user in store.users(limit=args.limit, tenant=tenant):
        try:
            rec = store.get(user, tenant)
        except CorruptEmbeddingError as exc:
            print(f"{user}\tDAMAGED: {exc}")
            continue
        if rec is not None:
            print(f"{user}\tversion {rec.version}\tdim {rec.dim}")


def cmd_users_delete(args) -> None:
    from ..store import open_store
    from ..store.vectors import check_user_id

    tenant = _tenant(args)
    store = open_store(args.store)
    missing = []
    for user in args.user:
        check_user_id(user)
        if not store.delete(user, tenant):
            missing.append(user)
    shared = hasattr(store, "purge")  # PostgreSQL: rows deleted and vacuumed; --purge rewrites the tables
    if shared and args.purge:
        store.purge()
    wiped = store.checkpoint()  # each delete checkpointed already; False if a reader held the WAL meanwhile
    for user in args.user:
        if user in missing:
            continue
        if shared:
            print(f"deleted {user} (tenant {tenant}): " + ("the tables were rewritten (VACUUM FULL), so its vector's bytes "
                  "are in none of their files" if args.purge else "row deleted and the tables vacuumed; --purge "
                  "rewrites them so its bytes are in none of their files") + " (PostgreSQL's WAL and backups keep "
                  "them until they are recycled: docs/privacy.md)")
        else:
            print(f"deleted {user} (tenant {tenant})" + (f": its vector's bytes are gone from {store.path} and its WAL"
                                                         if wiped else ""))
    if not wiped:
        print(f"warning: another process held {store.path}'s WAL open, so it still holds the deleted vectors' bytes "
              "until the next delete: run the same `e2p users delete` again after it ends", file=sys.stderr)
    if missing:
        raise ConfigError(f"no stored embedding for {', '.join(map(repr, missing))} in tenant {tenant} of "
                          f"{args.store}: check the ids and --tenant (`e2p users list`)")


def cmd_users_update(args) -> None:
    """A batch refresh: every event of a file folded into its user's live profile, by the rule a server uses."""
    from ..config import E2PConfig, resolve_projector
    from ..data.live_profile import ProfileRule, fold_event_file, serving_rule
    from ..store import open_store

    tenant = _tenant(args)
    if args.rule:
        rule = ProfileRule.load(args.rule)
    elif args.projector:
        folder = resolve_projector(args.projector)
        rule = serving_rule(folder, E2PConfig.load(folder))
    else:
        raise ConfigError("give --projector (its profile.json, else the mean of its encoder's vectors) or --rule FILE")
    if rule is None:
        raise ConfigError(f"{args.projector}'s embedding is several sentence slots: no live profile rule makes one")
    store = open_store(args.store, dim=rule.embedding_dim)
    users, events = fold_event_file(args.file, store, rule, tenant, progress=not args.quiet)
    print(f"folded {events} events into {users} users' profiles in {args.store} (tenant {tenant})")


def cmd_keys_tenant(args) -> None:
    from .keys import set_tenant

    current = set_tenant(args.file, args.tenant, allow_remember=args.allow_remember,
                         requests_per_minute=args.requests_per_minute, tokens_per_minute=args.tokens_per_minute)
    print(f"tenant {args.tenant} in {args.file}: {current}")


def cmd_keys_add(args) -> None:
    from .keys import add_key

    key = args.key
    if key is None:
        if sys.stdin.isatty():
            import getpass

            key = getpass.getpass("API key (not shown): ")
        else:
            key = sys.stdin.readline()
        key = key.rstrip("\r\n")
    from .limits import Limits

    entry = add_key(args.file, args.tenant, args.role, key, Limits(args.requests_per_minute, args.tokens_per_minute))
    print(f"added a key of tenant {entry.tenant} (role {entry.role}) to {args.file}: its salted SHA-256 hash, not "
          "the key")


def add_serve_commands(sub) -> None:
    """Add `serve`, `users` and `keys` to the `e2p` subcommand parser."""
    from ..backbone import BACKBONE_HELP
    from ..devices import add_device_arguments
    from ..engines import add_engine_arguments

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a live user-embedding store")
    s.add_argument("--projector", default=None, help="a shipped name (persona-deep-k1) or a folder `e2p train` wrote (omit: the plain backbone)")
    s.add_argument("--backbone", default=None, help=BACKBONE_HELP)
    add_device_arguments(s)
    add_engine_arguments(s)
    s.add_argument("--vllm-url", default=None,
                   help="gateway mode: the running `vllm serve MODEL --enable-prompt-embeds` (e.g. http://127.0.0.1:8001) "
                        "that runs the backbone; e2p authenticates, resolves users, builds every prompt's embeddings "
                        "and streams vLLM's answer back (implies --engine vllm)")
    s.add_argument("--vllm-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="with --vllm-url: the dtype prompt embeddings travel in (bfloat16 halves the bytes; use the "
                        "dtype vLLM runs in)")
    s.add_argument("--store", required=True, help="the user store: a SQLite file (created if missing), or "
                   "postgresql://USER@HOST:PORT/DB, one database every replica shares (schema created on first use)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (other than loopback needs keys)")
    s.add_argument("--port", type=int, default=8000,
                   help="TCP port")
    s.add_argument("--api-key", default=None, help="inference key(s), comma separated (prefer env E2P_API_KEY)")
    s.add_argument("--admin-key", default=None, help="key for embedding writes (prefer env E2P_ADMIN_KEY)")
    s.add_argument("--keys", default=None,
                   help="tenant key file (`e2p keys add`): hashed keys, each with its tenant and role user|admin")
    s.add_argument("--log-user-ids", action="store_true",
                   help="name the user a request speaks for in log lines (default: the tenant only)")
    s.add_argument("--no-auth", action="store_true", help="allow serving without keys on a non-loopback host")
    s.add_argument("--model-name", default=None, help="model id clients send (default: e2p-<projector dir name>)")
    s.add_argument("--no-fair-shares", action="store_true",
                   help="step every row every time instead of by tenants' fair shares of tokens (a GPU, where a "
                        "bigger batch costs little more than one row)")
    s.add_argument("--max-batch-size", type=int, default=8,
                   help="rows decoded together (continuous batching)")
    s.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long the batcher waits for more requests")
    s.add_argument("--max-queue", type=int, default=64, help="queued requests before answering 429")
    s.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask for")
    s.add_argument("--default-max-tokens", type=int, default=128,
                   help="max_tokens of a request that sends none")
    s.add_argument("--max-prompt-tokens", type=int, default=1024,
                   help="longer prompts answer 400 context_length_exceeded")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="larger request bodies answer 413")
    s.add_argument("--request-timeout", type=float, default=120.0, help="seconds before a request is answered 504")
    s.add_argument("--graceful-timeout", type=float, default=60.0, help="seconds to finish in-flight requests on shutdown")
    s.add_argument("--drain-seconds", type=float, default=0.0,
                   help="on SIGTERM, answer /readyz 503 and keep serving this long before shutting down, so a load "
                        "balancer stops sending first (e.g. 10 behind one; 0: shut down at once)")
    s.add_argument("--max-connections", type=int, default=None, help="uvicorn limit_concurrency (503 above it)")
    s.add_argument("--allow-unknown-users", action="store_true", help="unknown `user`: answer unpersonalized, not 404")
    s.add_argument("--max-messages", type=int, default=256, help="chat messages per request (400 above it)")
    s.add_argument("--max-prompt-chars", type=int, default=32_000, help="characters of prompt text per request (400 above)")
    s.add_argument("--max-stop-strings", type=int, default=16, help="`stop` strings per request (400 above it)")
    s.add_argument("--max-stop-chars", type=int, default=256, help="characters per `stop` string (400 above it)")
    s.add_argument("--max-embed-requests", type=int, default=8,
                   help="text embeddings in flight (/v1/embeddings, PUT {\"text\"}) on their own thread (429 above)")
    s.add_argument("--max-user-requests", type=int, default=32,
                   help="PUT / GET / DELETE /v1/users/{id}/embedding in flight on their own threads (429 above)")
    s.add_argument("--stall-seconds", type=float, default=30.0,
                   help="/healthz answers 503 when the decoding worker made no step for this long while busy")
    s.add_argument("--profile-rule", default=None,
                   help="the live profile's rule for POST /v1/users/{id}/events (default: the projector's profile.json, "
                        "else the mean of its encoder's vectors)")
    s.add_argument("--allow-remember", action="store_true",
                   help="the default tenant's chats may fold their message into the user's profile (e2p.remember); "
                        "other tenants: `e2p keys tenant --allow-remember`")
    s.add_argument("--otlp-endpoint", default=None,
                   help="export OpenTelemetry traces of requests (route, store, queue, prefill, decode; never a user id) "
                        "to this OTLP/HTTP collector, e.g. http://127.0.0.1:4318/v1/traces (default: off)")
    s.add_argument("--metrics-key", default=None, help="key GET /metrics needs (prefer env E2P_METRICS_KEY; default: open)")
    s.set_defaults(func=cmd_serve)

    u = sub.add_parser("users", help="manage the embedding store")
    usub = u.add_subparsers(dest="users_command", required=True)
    i = usub.add_parser("import", help="import embeddings from .parquet / .csv / .jsonl / .npz / .npy")
    i.add_argument("file", help="a .parquet/.csv/.jsonl/.npz/.npy table of users and vectors")
    i.add_argument("--store", required=True,
                   help="the store: a SQLite file (created if missing) or postgresql://USER@HOST:PORT/DB")
    i.add_argument("--projector", default=None, help="check the dimension against this projector's embedding_dim")
    i.add_argument("--dim", type=int, default=None, help="expected embedding dimension")
    i.add_argument("--ids", default=None, help="for a plain [N, E] .npy: a text file with one user id per line")
    i.add_argument("--user-column", default="user", help="Parquet / CSV / JSONL user id column (default: user)")
    i.add_argument("--embedding-column", default="embedding", help="Parquet / CSV / JSONL vector column (default: embedding)")
    i.add_argument("--chunk-rows", type=int, default=10_000, help="rows read and checked at a time (memory bound)")
    i.add_argument("--tenant", default="default", help="the tenant whose users these are (default: default)")
    i.set_defaults(func=cmd_users_import)
    ls = usub.add_parser("list", help="list stored users")
    ls.add_argument("--store", required=True,
                    help="the store: a SQLite file or postgresql://USER@HOST:PORT/DB")
    ls.add_argument("--limit", type=int, default=50,
                    help="list at most this many users")
    ls.add_argument("--tenant", default="default", help="list this tenant's users (default: default)")
    ls.set_defaults(func=cmd_users_list)
    d = usub.add_parser("delete", help="delete users' embeddings (their bytes too: database and WAL)")
    d.add_argument("user", nargs="+", help="user id(s) to delete")
    d.add_argument("--store", required=True, help="the store: a SQLite file or postgresql://USER@HOST:PORT/DB")
    d.add_argument("--tenant", default="default", help="the tenant whose users these are (default: default)")
    d.add_argument("--purge", action="store_true", help="on a postgresql:// store: VACUUM FULL afterwards, so the "
                                                        "deleted vectors' bytes are in none of the tables' files")
    d.set_defaults(func=cmd_users_delete)

    up = usub.add_parser("update", help="fold a file of events (what users did) into their live profiles")
    up.add_argument("file", help="JSON lines: {\"user\": ID, \"text\": TEXT} or {\"user\": ID, \"vector\": [...]}, in order")
    up.add_argument("--store", required=True, help="the store: a SQLite file (created if missing) or postgresql://USER@HOST:PORT/DB")
    up.add_argument("--projector", default=None, help="the served projector: its profile.json is the rule")
    up.add_argument("--rule", default=None, help="a profile rule file (<users>.profile.json from `e2p data`)")
    up.add_argument("--tenant", default="default", help="the tenant whose users these are (default: default)")
    up.add_argument("--quiet", action="store_true", help="no progress bar")
    up.set_defaults(func=cmd_users_update)

    k = sub.add_parser("keys", help="manage the tenant key file of `e2p serve --keys`")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    a = ksub.add_parser("add", help="add an API key (stored as a salted hash) for a tenant and role")
    a.add_argument("--file", required=True, help="the key file (created if missing, replaced atomically)")
    a.add_argument("--tenant", required=True, help="the tenant the key belongs to (letters, digits, . _ -)")
    a.add_argument("--role", required=True, choices=["user", "admin"],
                   help="user: inference and metadata; admin: also writes, deletes and vectors of the tenant's users")
    a.add_argument("--key", default=None,
                   help="the plain key (omit: read from standard input, which keeps it out of `ps` and shell history)")
    a.add_argument("--requests-per-minute", type=int, default=None,
                   help="this key's own request limit (default: its tenant's, `e2p keys tenant`; none: unlimited)")
    a.add_argument("--tokens-per-minute", type=int, default=None,
                   help="this key's own limit of prompt + completion tokens per minute (default: its tenant's)")
    a.set_defaults(func=cmd_keys_add)
    t = ksub.add_parser("tenant", help="set a tenant's settings in the key file")
    t.add_argument("--file", required=True, help="the key file (created if missing, replaced atomically)")
    t.add_argument("--tenant", required=True, help="the tenant (letters, digits, . _ -)")
    t.add_argument("--allow-remember", action=argparse.BooleanOptionalAction, default=None,
                   help="chats of this tenant may fold their message into the user's profile (e2p.remember)")
    t.add_argument("--requests-per-minute", type=int, default=None,
                   help="the tenant's default request limit per key (0: unlimited; a key's own limit wins)")
    t.add_argument("--tokens-per-minute", type=int, default=None,
                   help="the tenant's default limit of prompt + completion tokens per key and minute (0: unlimited)")
    t.set_defaults(func=cmd_keys_tenant)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `e2p serve` / `e2p users`")
