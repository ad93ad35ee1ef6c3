"""NATS users per service: each is allowed only its own subjects; a drafter cannot commit."""

from __future__ import annotations

import asyncio
import json
import re

import nats
import nats.errors
import pytest

from shared import nats_auth
from shared.messages import (
    SUBJECT_CANCEL, SUBJECT_COMMIT, SUBJECT_STATE_GET, SUBJECT_TOKENS, Cancel, Commit, RequestState, StateQuery,
    TokenBatch, decode, encode,
)
from shared.settings import SERVICES, Settings


def _matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: `*` one token, `>` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def _may_publish(user: str, subject: str) -> bool:
    return any(_matches(p, subject) for p in nats_auth.user_permissions(user)["publish"]["allow"])


def test_matcher_follows_nats_wildcards():
    assert _matches("specmesh.level.>", "specmesh.level.drafter-code.drafter-1")
    assert not _matches("specmesh.level.>", "specmesh.level")
    assert _matches("$SRV.*", "$SRV.PING") and not _matches("$SRV.*", "$SRV.PING.state")


def test_only_the_target_commits_and_only_state_and_target_send_tokens():
    committers = [u for u in (*SERVICES, nats_auth.ADMIN) if _may_publish(u, SUBJECT_COMMIT)]
    assert committers == ["target", nats_auth.ADMIN]
    senders = [u for u in SERVICES if _may_publish(u, f"{SUBJECT_TOKENS}.r1")]
    assert senders == ["state", "target"]
    for user in ("drafter", "verifier"):
        publish = nats_auth.user_permissions(user)["publish"]["allow"]
        assert all(p.startswith("$SRV.") for p in publish), publish  # replies only, via allow_responses


def test_each_user_reads_only_its_own_inbox():
    for user in SERVICES:
        subscribe = nats_auth.user_permissions(user)["subscribe"]["allow"]
        assert not any(_matches(p, "_INBOX.abc.1") for p in subscribe), user
        others = [u for u in SERVICES if u != user]
        assert not any(_matches(p, f"{nats_auth.inbox_prefix(o)}.abc.1") for p in subscribe for o in others), user


def test_passwords_derive_from_the_secret_and_the_file_is_private(tmp_path):
    settings = Settings(run_dir=tmp_path)
    with pytest.raises(nats_auth.NatsAuthError, match="make up"):
        nats_auth.credentials(settings, "drafter")
    conf = nats_auth.server_config(settings)
    assert (nats_auth.secret_path(settings).stat().st_mode & 0o777) == 0o600
    users = json.loads(conf.removeprefix("authorization: "))["users"]
    assert sorted(u["user"] for u in users) == sorted((*SERVICES, nats_auth.ADMIN))
    assert len({u["password"] for u in users}) == len(users)
    assert nats_auth.server_config(settings) == conf  # the secret is reused, not regenerated
    creds = nats_auth.credentials(settings, "drafter")
    assert creds["password"] == next(u["password"] for u in users if u["user"] == "drafter")
    with pytest.raises(nats_auth.NatsAuthError, match="unknown NATS user"):
        nats_auth.credentials(settings, "mallory")
    assert nats_auth.credentials(Settings(run_dir=tmp_path, nats={"auth": False})) == {}


async def _connect(settings, user: str, errors: list[str]):
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(settings.nats.client_url, error_cb=on_error, max_reconnect_attempts=0,
                              **nats_auth.credentials(settings, user))


@pytest.mark.stack
def test_a_drafter_cannot_commit_or_send_tokens_on_the_real_stack(stack):
    _, settings = stack
    rid = "auth-test-commit"
    commit = Commit(rid, epoch=1, position=0, tokens=[5, 6], prompt=[1, 2, 3])

    async def go():
        errors: list[str] = []
        admin = await _connect(settings, nats_auth.ADMIN, errors)
        drafter = await _connect(settings, "drafter", errors)
        target = await _connect(settings, "target", errors)
        try:
            seen = []

            async def on_tokens(msg) -> None:
                seen.append(msg)

            sub = await admin.subscribe(f"{SUBJECT_TOKENS}.{rid}", cb=on_tokens)
            await admin.flush()
            with pytest.raises(nats.errors.TimeoutError):  # the server drops it: nobody answers
                await drafter.request(SUBJECT_COMMIT, encode(commit), timeout=1.5)
            await drafter.publish(f"{SUBJECT_TOKENS}.{rid}", encode(TokenBatch(rid, 1, 0, [9, 9])))
            await drafter.flush()
            await asyncio.sleep(0.3)
            after_drafter = decode((await admin.request(SUBJECT_STATE_GET, encode(StateQuery(rid)), timeout=5)).data,
                                   RequestState)
            forged_tokens = len(seen)
            # The same commit from the target is accepted and forwarded to the client's subject.
            await target.request(SUBJECT_COMMIT, encode(commit), timeout=5)
            after_target = decode((await admin.request(SUBJECT_STATE_GET, encode(StateQuery(rid)), timeout=5)).data,
                                  RequestState)
            await asyncio.sleep(0.3)
            await sub.unsubscribe()
            await admin.publish(SUBJECT_CANCEL, encode(Cancel(rid)))
            await admin.flush()
            return errors, after_drafter, forged_tokens, after_target, len(seen)
        finally:
            for nc in (admin, drafter, target):
                await nc.close()

    errors, after_drafter, forged_tokens, after_target, delivered = asyncio.run(go())
    violations = [e for e in errors if re.search("permissions violation", e, re.I)]
    assert any(SUBJECT_COMMIT in e for e in violations), errors
    assert any(f"{SUBJECT_TOKENS}.{rid}" in e for e in violations), errors
    assert not after_drafter.found and forged_tokens == 0
    assert after_target.found and after_target.committed == [5, 6]
    assert delivered == 1


@pytest.mark.stack
def test_wrong_or_missing_credentials_are_refused(stack):
    _, settings = stack

    async def attempt(**kwargs) -> str:
        try:
            nc = await nats.connect(settings.nats.client_url, max_reconnect_attempts=0, connect_timeout=3,
                                    allow_reconnect=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the refusal is the point
            return str(exc) or type(exc).__name__
        await nc.close()
        return "connected"

    assert asyncio.run(attempt()) != "connected"
    assert asyncio.run(attempt(user="drafter", password="not-the-password")) != "connected"
    assert asyncio.run(attempt(**nats_auth.credentials(settings, "drafter"))) == "connected"
