"""NATS users: one per service, each allowed only the subjects its role uses.

The server's `authorization` block is written from `PERMISSIONS`; a service connects as
the user named like it (`drafter`, `state`, ...), the CLI, benchmarks and tests as
`SPECMESH_NATS__USER` (default `admin`, allowed everything). Passwords are never
configured one by one: each is an HMAC of one secret (`SPECMESH_NATS__SECRET`, or a
random one the stack writes to `<run_dir>/nats/secret` with mode 0600) and the user name.

Least privilege on the bus: every user publishes only what its role sends and subscribes
only to what it serves; replies go through `allow_responses` (to a request it received)
and a per-user inbox prefix (`_INBOX_<user>.>`), so no service can read another's
replies. A drafter or verifier publishes nothing at all but replies, so it cannot commit
tokens, send tokens to a client or cancel requests.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from shared.messages import (
    SUBJECT_ASSIGNMENTS, SUBJECT_CANCEL, SUBJECT_COMMIT, SUBJECT_EXPLAIN, SUBJECT_GENERATE, SUBJECT_LEVEL,
    SUBJECT_OUTCOME, SUBJECT_PROFILE, SUBJECT_STATE_GET, SUBJECT_TOKENS,
)
from shared.settings import SERVICES, Settings

ADMIN = "admin"
KV_BUCKET = "specmesh_requests"  # the state service's JetStream key-value buckets: records,
KV_LOGPROBS_BUCKET = "specmesh_logprobs"  # and their log-probabilities, one key per commit
KV_RESPONSES_BUCKET = "specmesh_responses"  # the gateway's stored Responses API answers
_RESPONSES_STREAM = f"KV_{KV_RESPONSES_BUCKET}"

# user -> (may publish, may subscribe); inboxes, `$SRV` discovery and replies are added below.
PERMISSIONS: dict[str, tuple[list[str], list[str]]] = {
    "gateway": ([SUBJECT_GENERATE, SUBJECT_CANCEL, SUBJECT_STATE_GET, f"$KV.{KV_RESPONSES_BUCKET}.>",
                 *(f"$JS.API.{api}.{_RESPONSES_STREAM}" for api in ("STREAM.INFO", "STREAM.CREATE", "STREAM.MSG.GET")),
                 f"$JS.API.DIRECT.GET.{_RESPONSES_STREAM}.>"],
                [f"{SUBJECT_TOKENS}.>", SUBJECT_ASSIGNMENTS]),
    "target": ([f"{SUBJECT_LEVEL}.>", SUBJECT_COMMIT, SUBJECT_STATE_GET, SUBJECT_OUTCOME, SUBJECT_PROFILE,
                f"{SUBJECT_TOKENS}.>"],  # a target reports a failed request to its client itself
               [SUBJECT_GENERATE, SUBJECT_CANCEL]),
    "drafter": ([], [f"{SUBJECT_LEVEL}.>"]),
    "verifier": ([], [f"{SUBJECT_LEVEL}.>"]),
    "state": ([f"{SUBJECT_TOKENS}.>", "$JS.API.>", f"$KV.{KV_BUCKET}.>", f"$KV.{KV_LOGPROBS_BUCKET}.>"],
              [SUBJECT_COMMIT, SUBJECT_STATE_GET, SUBJECT_CANCEL]),
    "router": ([SUBJECT_ASSIGNMENTS], [SUBJECT_OUTCOME, SUBJECT_PROFILE, SUBJECT_EXPLAIN]),
}
assert set(PERMISSIONS) == set(SERVICES)


class NatsAuthError(RuntimeError):
    """The NATS credentials cannot be worked out (no secret, unknown user)."""


def inbox_prefix(user: str) -> str:
    return f"_INBOX_{user}"


def user_permissions(user: str) -> dict:
    """The server-side permissions of `user` (the `permissions` of its `authorization` entry)."""
    if user == ADMIN:
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    publish, subscribe = PERMISSIONS[user]
    return {
        # `$SRV.*.<service>` pings and info of the others (health checks, the router's discovery).
        "publish": {"allow": [*publish, "$SRV.>"]},
        # Its own `micro` endpoints answer `$SRV.PING`, `$SRV.PING.<name>`, `$SRV.PING.<name>.<id>`.
        "subscribe": {"allow": [*subscribe, f"{inbox_prefix(user)}.>", "$SRV.*", f"$SRV.*.{user}", f"$SRV.*.{user}.>"]},
        "allow_responses": True,
    }


def secret_path(settings: Settings) -> Path:
    return settings.run_dir / "nats" / "secret"


def secret(settings: Settings, create: bool = False) -> str:
    """The secret the passwords derive from: the setting, else the stack's file (made if `create`)."""
    if settings.nats.secret is not None:
        return settings.nats.secret.get_secret_value()
    path = secret_path(settings)
    if not path.exists():
        if not create:
            raise NatsAuthError(f"no NATS secret at {path}: start the stack (`make up`) or set SPECMESH_NATS__SECRET")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def password(secret_: str, user: str) -> str:
    return hmac.new(secret_.encode(), f"specmesh-nats:{user}".encode(), hashlib.sha256).hexdigest()


def server_config(settings: Settings, create: bool = True) -> str:
    """The `authorization` block of nats.conf (JSON is valid NATS configuration)."""
    key = secret(settings, create=create)
    users = [{"user": user, "password": password(key, user), "permissions": user_permissions(user)}
             for user in (*SERVICES, ADMIN)]
    return "authorization: " + json.dumps({"users": users}, indent=2) + "\n"


def credentials(settings: Settings, user: str | None = None) -> dict:
    """Keyword arguments for `nats.connect` as `user` (default: the configured CLI user)."""
    if not settings.nats.auth:
        return {}
    user = user or settings.nats.user
    if user != ADMIN and user not in PERMISSIONS:
        raise NatsAuthError(f"unknown NATS user {user!r}; users: {', '.join((*SERVICES, ADMIN))}")
    return {"user": user, "password": password(secret(settings), user), "inbox_prefix": inbox_prefix(user)}
