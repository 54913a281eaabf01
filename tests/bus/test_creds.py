"""NATS authentication: a member's credentials let it offer events as itself and nothing else.

Against a real nats-server running with the embedded server's trust chain (operator → account),
the way ``collabbus up`` runs it.
"""

from __future__ import annotations

import asyncio
import json
import base64
import copy
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import nkeys
import orjson
import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from bus.asyncapi import asyncapi_document
from bus.client import offer, offer_raw
from bus.credentials import (
    Authority,
    MEMBER_SUBSCRIPTIONS,
    CredentialsError,
    decode_jwt_claims,
    member_inbox_prefix,
    new_seed,
    partner_creds,
    partner_permissions,
    public_key,
    read_account_seed,
)
from bus.runtime import Bus
from bus.server import EmbeddedNats, free_port
from bus.streams import EVENTS_STREAM, LIVE_SUBJECTS
from handlers.confidential import CONFIDENTIAL, public_live_subjects, public_log_subjects
from ops.settings import Settings
from schemas import registry
from tests.commands import acollabbus
from tests.conftest import OPERATOR, join, load_fixtures, unique

FIXTURE = load_fixtures()["project.registered"]
MAX_EVENT_BYTES = Settings().max_event_bytes


def project_event(institution: str) -> dict[str, Any]:
    event = copy.deepcopy(FIXTURE["event"])
    event.update(id=unique("creds"), source=f"/institutions/{institution}")
    event["data"].update(project_id=unique("p"), owner=institution)
    event["subject"] = event["data"]["project_id"]
    return event


class Member:
    """A member's own connection, authenticated with the credentials the bus issued to it."""

    def __init__(self, institution: str, nc: Client, errors: list[Exception]) -> None:
        self.institution, self.nc, self.errors = institution, nc, errors

    async def violations(self, expected: int = 1, timeout: float = 5.0) -> list[str]:
        """The permission violations the server reported on this connection (waits for ``expected``)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            found = [str(e) for e in self.errors if "permissions violation" in str(e)]
            if len(found) >= expected:
                return found
            await asyncio.sleep(0.05)
        return [str(e) for e in self.errors if "permissions violation" in str(e)]


async def connect_member(url: str, creds: Path, institution: str) -> Member:
    errors: list[Exception] = []

    async def record(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(url, user_credentials=str(creds), error_cb=record, name=institution,
                            inbox_prefix=member_inbox_prefix(institution))
    return Member(institution, nc, errors)


async def new_member(nats_server: EmbeddedNats, partner: Client, tmp_path: Path, prefix: str = "m") -> Member:
    """A new member, joined, with credentials the bus issued and its own connection."""
    institution = unique(prefix)
    await join(partner, institution, FIXTURE["kind"], country="TR")
    assert nats_server.authority is not None
    creds = tmp_path / f"{institution}.creds"
    creds.write_text(partner_creds(nats_server.authority.account, institution))
    return await connect_member(nats_server.url, creds, institution)


@pytest.fixture
async def member(nats_server: EmbeddedNats, partner: Client, tmp_path: Path) -> AsyncIterator[Member]:
    connected = await new_member(nats_server, partner, tmp_path)
    yield connected
    await connected.nc.close()


async def test_a_members_oversize_offer_is_refused_unread_and_its_connection_kept(member: Member) -> None:
    """CONTRACT §4: malformed input gets a rejection, never a dropped connection — a size limit in
    the credentials below the server's made the server close a member's connection instead."""
    huge = await offer_raw(member.nc, f"collab.ingress.{member.institution}.project.registered", b" " * (3 * MAX_EVENT_BYTES),
                           {"Content-Type": "application/cloudevents+json"})
    assert huge.reason == "too_large" and [p.type for p in huge.errors] == ["too_large"], huge.as_dict()
    assert member.nc.is_connected and member.errors == []
    assert (await offer(member.nc, member.institution, project_event(member.institution))).accepted


async def test_a_member_offers_events_as_itself(member: Member) -> None:
    verdict = await offer(member.nc, member.institution, project_event(member.institution))
    assert verdict.accepted, verdict.as_dict()
    assert member.errors == []


async def test_offering_as_another_member_is_refused_by_the_server(member: Member, partner: Client, bus: Bus) -> None:
    other = unique("other")
    await join(partner, other, FIXTURE["kind"], country="TR")
    event = project_event(other)  # a well-formed event in the other member's name
    verdict = await offer(member.nc, other, event, timeout=1.0)  # the server drops it: the gate never sees it
    assert verdict.reason == "unavailable" and "no verdict" in verdict.errors[0].msg
    assert await member.violations() == [
        f'nats: permissions violation for publish to "collab.ingress.{other}.project.registered"'
    ]
    with pytest.raises(NotFoundError):
        await bus.js.get_last_msg(EVENTS_STREAM, f"collab.events.{other}.project.registered.{event['subject']}")
    # Its own subjects still work on the same connection.
    assert (await offer(member.nc, member.institution, project_event(member.institution))).accepted


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more at the end."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or token not in ("*", tokens[index]):
            return False
    return len(tokens) == len(wanted)


def test_the_public_log_subjects_are_those_of_every_type_but_the_confidential_ones() -> None:
    subjects = public_log_subjects()
    assert "collab.events.*.project.>" in subjects and "collab.events.*.call.published.*" in subjects
    for event_type in registry.event_types():
        logged = f"collab.events.some-member.{event_type}.some-subject"
        matched = [pattern for pattern in subjects if subject_matches(pattern, logged)]
        assert len(matched) == (0 if event_type in CONFIDENTIAL else 1), (event_type, matched)
    # Members subscribe to the same subjects under collab.live, where the log's server republishes what it stored.
    live = public_live_subjects()
    assert live == [subject.replace("collab.events.", "collab.live.", 1) for subject in subjects]
    assert all(subject_matches(LIVE_SUBJECTS, subject) for subject in live)  # where the log's server republishes
    assert partner_permissions("m-1")["sub"]["allow"] == [f"{member_inbox_prefix('m-1')}.>", *live]


async def test_a_member_follows_the_public_log_live(member: Member, nats_server: EmbeddedNats, partner: Client, tmp_path: Path) -> None:
    """Subscribed to every public live subject, a member receives another member's joining and
    its event as the log stored them, each with its log sequence, with no permission violation."""
    received: asyncio.Queue[Any] = asyncio.Queue()

    async def take(msg: Any) -> None:
        await received.put(msg)

    for subject in public_live_subjects():
        await member.nc.subscribe(subject, cb=take)
    await member.nc.flush()
    neighbour = await new_member(nats_server, partner, tmp_path, "other")
    try:
        event = project_event(neighbour.institution)
        verdict = await offer(neighbour.nc, neighbour.institution, event)
        assert verdict.accepted, verdict.as_dict()
        messages: list[Any] = []
        while not messages or messages[-1].subject != f"collab.live.{neighbour.institution}.project.registered.{event['subject']}":
            messages.append(await asyncio.wait_for(received.get(), timeout=5.0))
    finally:
        await neighbour.nc.close()
    joined = [m for m in messages if m.subject == f"collab.live.{OPERATOR}.institution.joined.{neighbour.institution}"]
    assert len(joined) == 1  # its joining, too
    msg = messages[-1]
    assert msg.headers["Nats-Msg-Id"] == event["id"]
    assert msg.headers["Nats-Stream"] == EVENTS_STREAM and msg.headers["Nats-Sequence"] == str(verdict.seq)
    # Only the headers the AsyncAPI document names (none a partner forwarding it to a stream of
    # its own would trip on, as on Nats-Expected-Stream).
    documented = json.loads(json.dumps(asyncapi_document()))["components"]["messages"]
    live = next(message for name, message in documented.items() if name.startswith("live"))
    assert set(msg.headers) <= set(live["headers"]["properties"]), msg.headers
    assert msg.headers["Nats-Subject"] == f"collab.events.{neighbour.institution}.project.registered.{event['subject']}"
    logged = await partner.jetstream().get_msg(EVENTS_STREAM, verdict.seq)
    assert msg.data == logged.data and orjson.loads(msg.data)["data"]["project_id"] == event["data"]["project_id"]
    # in the log's order: each message's sequence is above the one before it
    sequences = [int(m.headers["Nats-Sequence"]) for m in messages]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    await member.nc.flush()
    assert member.errors == []


async def test_what_a_member_follows_live_is_the_log_not_what_was_offered(
    member: Member, nats_server: EmbeddedNats, partner: Client, tmp_path: Path
) -> None:
    """An event offered twice arrives once; an offer under an id another event holds (refused as
    ``id_taken``) does not arrive at all, though the gate published it before the log refused it.
    Who subscribes to the log's own subjects (the bus's user here) sees both."""
    live: asyncio.Queue[Any] = asyncio.Queue()
    published: asyncio.Queue[Any] = asyncio.Queue()
    await member.nc.subscribe("collab.live.*.project.>", cb=live.put)
    await partner.subscribe("collab.events.*.project.>", cb=published.put)
    await member.nc.flush()
    await partner.flush()
    neighbour = await new_member(nats_server, partner, tmp_path, "other")
    try:
        event = project_event(neighbour.institution)
        first = await offer(neighbour.nc, neighbour.institution, event)
        again = await offer(neighbour.nc, neighbour.institution, event)
        assert first.accepted and again.accepted and again.duplicate and again.seq == first.seq
        clash = project_event(member.institution)
        clash["id"] = event["id"]  # another member's event under the same id
        taken = await offer(member.nc, member.institution, clash)
        assert not taken.accepted and taken.errors[0].type == "id_taken", taken.as_dict()
        last = project_event(neighbour.institution)
        assert (await offer(neighbour.nc, neighbour.institution, last)).accepted
        ids: list[str] = []
        while not ids or ids[-1] != last["id"]:
            ids.append((await asyncio.wait_for(live.get(), timeout=5.0)).headers["Nats-Msg-Id"])
        seen: list[tuple[str, str]] = []
        while not seen or seen[-1][0] != last["id"]:
            msg = await asyncio.wait_for(published.get(), timeout=5.0)
            seen.append((msg.headers["Nats-Msg-Id"], orjson.loads(msg.data)["source"]))
    finally:
        await neighbour.nc.close()
    assert ids == [event["id"], last["id"]]
    assert seen == [(event["id"], event["source"]), (event["id"], event["source"]), (event["id"], clash["source"]),
                    (last["id"], last["source"])]
    assert member.errors == []


async def test_a_member_cannot_read_the_whole_log_nor_confidential_subjects_nor_use_jetstream(member: Member) -> None:
    refused = ("collab.live.>", "collab.live.*.call.>", "collab.live.*.call.application_submitted.*",
               "collab.live.*.validation.review_submitted.*",
               # nor the log's own subjects, where offers are published before the log takes or refuses them
               "collab.events.>", "collab.events.*.project.>", "collab.events.*.call.published.*")
    for subject in refused:
        await member.nc.subscribe(subject)
    await member.nc.flush()
    assert sorted(await member.violations(len(refused))) == sorted(
        f'nats: permissions violation for subscription to "{subject}"' for subject in refused)

    with pytest.raises(nats.errors.TimeoutError):
        await member.nc.jetstream(timeout=1.0).stream_info(EVENTS_STREAM)
    violations = await member.violations(5)
    assert any('publish to "$js.api.stream.info.collab_events"' in v.lower() for v in violations), violations


async def test_a_members_connection_holds_a_hundred_subscriptions(member: Member) -> None:
    """Its request inbox's and 99 more; the server refuses the next (and keeps the connection),
    and nats-py closes the connection on that refusal, as the README says."""
    assert (await offer(member.nc, member.institution, project_event(member.institution))).accepted  # the inbox's
    for n in range(MEMBER_SUBSCRIPTIONS - 1):
        await member.nc.subscribe(f"collab.live.*.project.registered.s{n}")
    await member.nc.flush()
    assert (await offer(member.nc, member.institution, project_event(member.institution))).accepted
    assert member.errors == [] and member.nc.is_connected
    await member.nc.subscribe("collab.live.*.project.registered.one-more")
    deadline = asyncio.get_running_loop().time() + 5
    while not member.nc.is_closed:
        assert asyncio.get_running_loop().time() < deadline, "the connection stayed open"
        await asyncio.sleep(0.05)
    assert str(member.nc.last_error) == "nats: maximum subscriptions exceeded"  # (its closed callback, not its error one)


async def test_a_member_sees_neither_the_bus_nor_other_members_through_inboxes(
    member: Member, partner: Client, nats_server: EmbeddedNats, tmp_path: Path, bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    """What reaches inboxes — the bus's pull deliveries (whole events), other members' verdicts,
    the gate's acks — is out of a member's reach; and no reply subject a member chooses makes the
    bus publish anywhere but an inbox."""
    for subject in ("_INBOX.>", "_COLLABBUS.INBOX.>"):
        await member.nc.subscribe(subject)
        await member.nc.flush()
    violations = await member.violations(2)  # (the server writes the subject in lower case)
    assert sorted(violations) == sorted(f'nats: permissions violation for subscription to "{subject}"'
                                        for subject in ("_inbox.>", "_collabbus.inbox.>"))
    # The bus's connections have their inboxes outside ``_INBOX.``.
    assert bus.nc._inbox_prefix == bytearray(b"_COLLABBUS.INBOX")

    neighbour = await new_member(nats_server, partner, tmp_path, "other")
    other = neighbour.institution
    try:
        await member.nc.subscribe(f"_INBOX.{other}.>")
        await member.nc.flush()
        assert f'nats: permissions violation for subscription to "_inbox.{other}.>"' in await member.violations(3)
        assert (await offer(neighbour.nc, other, project_event(other))).accepted
        # Nor can a member have the gate write into another's inboxes or onto wildcard subjects (the
        # bus's own inboxes are answered, for its operator's offers: their names are unguessable).
        landed: list[str] = []

        async def land(msg: Any) -> None:
            landed.append(msg.subject)

        await neighbour.nc.subscribe(f"_INBOX.{other}.>", cb=land)
        await partner.subscribe("_COLLABBUS.INBOX.spoofed.>", cb=land)  # (the bus's own connection watching)
        await neighbour.nc.flush()
        await partner.flush()
        for reply in (f"_INBOX.{other}.spoofed", f"_INBOX.{other}.*", f"_INBOX.{other}.>", "_COLLABBUS.INBOX.spoofed.>",
                      f"_INBOX.{member.institution}.*"):
            await member.nc.publish(f"collab.ingress.{member.institution}.project.registered",
                                    orjson.dumps(project_event(member.institution)), reply=reply)
        await member.nc.flush()
        await asyncio.sleep(0.5)
        assert landed == []
        # Said in the log once a minute, not once an offer (a member could fill the disk with it).
        refusals = [r for r in caplog.records if "was not judged" in r.getMessage() and member.institution in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]
        assert (await offer(member.nc, member.institution, project_event(member.institution))).accepted  # its own: answered
    finally:
        await neighbour.nc.close()

    # A reply subject in the log: the gate does not judge the offer (nothing logged), nor answer there.
    event = project_event(member.institution)
    target = f"collab.events.{member.institution}.project.registered.injected"
    await member.nc.publish(f"collab.ingress.{member.institution}.project.registered", orjson.dumps(event),
                            reply=target, headers={"Content-Type": "application/cloudevents+json"})
    await member.nc.flush()
    await asyncio.sleep(0.5)
    with pytest.raises(NotFoundError):
        await bus.js.get_last_msg(EVENTS_STREAM, target)
    again = await offer(member.nc, member.institution, event)  # the same event offered properly
    assert again.accepted and not again.duplicate, again.as_dict()  # logged now, for the first time
    # A client connected without its inbox prefix (the default `_INBOX.`): its offer is not judged
    # either, so the event it will offer again (it saw only a timeout) is not logged yet.
    unanswered = project_event(member.institution)
    await member.nc.publish(f"collab.ingress.{member.institution}.project.registered", orjson.dumps(unanswered),
                            reply="_INBOX.aB3dE6gH9jK2mN5pQ8rS1t.1")
    await member.nc.flush()
    await asyncio.sleep(0.5)
    first = await offer(member.nc, member.institution, unanswered)
    assert first.accepted and not first.duplicate, first.as_dict()


@pytest.mark.parametrize("how", ["no credentials", "a foreign account"])
async def test_a_connection_without_valid_credentials_is_refused(nats_server: EmbeddedNats, tmp_path: Path, how: str) -> None:
    options: dict[str, Any] = {}
    if how == "a foreign account":
        foreign = nkeys.from_seed(bytearray(new_seed(nkeys.PREFIX_BYTE_ACCOUNT)))
        creds = tmp_path / "foreign.creds"
        creds.write_text(partner_creds(foreign, "tr-mersin-bb"))
        options["user_credentials"] = str(creds)
    errors: list[Exception] = []

    async def record(exc: Exception) -> None:
        errors.append(exc)

    with pytest.raises(Exception):
        await nats.connect(nats_server.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3,
                           error_cb=record, **options)
    assert any("Authorization Violation" in str(e) for e in errors), errors


async def test_credentials_that_expire_work_until_then_and_are_refused_after(
    nats_server: EmbeddedNats, partner: Client, tmp_path: Path
) -> None:
    """Credentials issued with an expiry: a member connects and offers with them; at the expiry
    the server closes the connection, and they are refused from then on."""
    import time

    institution = unique("expiring")
    await join(partner, institution, FIXTURE["kind"], country="FI")
    assert nats_server.authority is not None
    until = int(time.time()) + 3
    creds = tmp_path / "expiring.creds"
    creds.write_text(partner_creds(nats_server.authority.account, institution, expires=until))
    assert decode_jwt_claims(creds.read_text().splitlines()[1])["exp"] == until
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    nc = await nats.connect(nats_server.url, user_credentials=str(creds), inbox_prefix=member_inbox_prefix(institution),
                            allow_reconnect=False, closed_cb=on_closed)
    try:
        assert (await offer(nc, institution, project_event(institution))).accepted
        await asyncio.wait_for(closed.wait(), timeout=10)  # closed by the server at the expiry
        assert time.time() >= until - 1
    finally:
        await nc.close()
    errors: list[Exception] = []

    async def record(exc: Exception) -> None:
        errors.append(exc)

    # The server refuses a JWT once the second of its `exp` is past (it compares whole seconds:
    # within that second a new connection is still let in).
    await asyncio.sleep(max(0.0, until + 1.2 - time.time()))
    with pytest.raises(Exception):
        await nats.connect(nats_server.url, user_credentials=str(creds), allow_reconnect=False, max_reconnect_attempts=0,
                           connect_timeout=3, error_cb=record, inbox_prefix=member_inbox_prefix(institution))
    assert any("Authorization Violation" in str(e) or "Expired" in str(e) for e in errors), errors


def test_issued_credentials_are_a_standard_creds_file(nats_server: EmbeddedNats) -> None:
    assert nats_server.authority is not None
    account = nats_server.authority.account
    text = partner_creds(account, "fi-thl")
    lines = text.splitlines()
    assert lines[0] == "-----BEGIN NATS USER JWT-----" and lines[2] == "------END NATS USER JWT------"
    assert "-----BEGIN USER NKEY SEED-----" in lines and "------END USER NKEY SEED------" in lines
    token, seed = lines[1], lines[lines.index("-----BEGIN USER NKEY SEED-----") + 1]
    assert seed.startswith("SU")
    header, payload, signature = token.split(".")
    assert orjson.loads(base64.urlsafe_b64decode(header + "==")) == {"typ": "JWT", "alg": "ed25519-nkey"}
    claims = decode_jwt_claims(token)
    user = public_key(nkeys.from_seed(bytearray(seed.encode())))
    assert claims["iss"] == public_key(account) and claims["sub"] == user and claims["name"] == "fi-thl"
    assert len(claims["jti"]) == 52  # base32 of a SHA-512/256 digest, as nats-io/jwt computes it
    assert claims["nats"]["pub"] == {"allow": ["collab.ingress.fi-thl.>", "collab.log.fi-thl"]}  # offers, and pages of the log
    # its own inboxes, not everyone's, and the public log subjects
    assert claims["nats"]["sub"] == {"allow": ["_INBOX.fi-thl.>", *public_live_subjects()]}
    assert claims["nats"]["type"] == "user" and claims["nats"]["version"] == 2
    assert claims["nats"]["payload"] == -1 and claims["nats"]["subs"] == 100  # the server's message size (see above)
    signature_bytes = base64.urlsafe_b64decode(signature + "==")
    assert account.verify(f"{header}.{payload}".encode(), signature_bytes)


def test_an_account_seed_is_read_from_the_setting_or_a_file(tmp_path: Path) -> None:
    seed = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
    (tmp_path / "account.nk").write_bytes(seed + b"\n")
    expected = public_key(nkeys.from_seed(bytearray(seed)))
    assert public_key(read_account_seed(seed.decode())) == expected
    assert public_key(read_account_seed(str(tmp_path / "account.nk"))) == expected
    user_seed = new_seed(nkeys.PREFIX_BYTE_USER).decode()
    with pytest.raises(CredentialsError, match="start with 'SA'") as refused:
        read_account_seed(user_seed)
    assert user_seed not in str(refused.value)  # a secret is never echoed
    with pytest.raises(CredentialsError, match="neither"):
        read_account_seed(str(tmp_path / "missing.nk"))


async def test_a_restarted_bus_keeps_its_keys_and_earlier_credentials_work(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, nats_listen=f"127.0.0.1:{free_port()}")
    institution = unique("m")
    bus = Bus(settings)
    await bus.start(state=False)
    try:
        assert bus.server is not None and bus.server.authority is not None
        auth_dir = bus.server.authority.directory
        seeds = {p.name: p.read_bytes() for p in auth_dir.glob("*.nk")}
        assert sorted(seeds) == sorted([Authority.OPERATOR_SEED, Authority.ACCOUNT_SEED, Authority.SYSTEM_SEED])
        for path in [*auth_dir.iterdir()]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(auth_dir.stat().st_mode) == 0o700
        await join(bus.nc, institution, FIXTURE["kind"], country="TR")
        creds = tmp_path / "member.creds"
        creds.write_text(partner_creds(bus.server.authority.account, institution))
    finally:
        await bus.stop()

    again = Bus(settings)
    await again.start(state=False)
    try:
        assert again.server is not None
        assert {p.name: p.read_bytes() for p in auth_dir.glob("*.nk")} == seeds
        member = await connect_member(again.server.url, creds, institution)
        verdict = await offer(member.nc, institution, project_event(institution))
        assert verdict.accepted, verdict.as_dict()
        await member.nc.close()
    finally:
        await again.stop()


async def test_a_store_from_before_authentication_keeps_its_streams(tmp_path: Path) -> None:
    open_server = EmbeddedNats(tmp_path / "nats", port=0, sync_always=False, auth=False)
    await open_server.astart()
    nc = await nats.connect(open_server.url)
    await nc.jetstream().add_stream(name="OLD", subjects=["old.>"])
    await nc.jetstream().publish("old.1", b"kept")
    await nc.close()
    await open_server.astop()

    server = EmbeddedNats(tmp_path / "nats", port=0, sync_always=False)
    await server.astart()
    try:
        nc = await nats.connect(server.url, **server.connect_options())
        assert (await nc.jetstream().get_msg("OLD", 1)).data == b"kept"
        await nc.close()
    finally:
        await server.astop()


async def test_the_cli_signs_with_the_account_seed_of_an_external_server(
    nats_server: EmbeddedNats, bus: Bus, partner: Client, tmp_path: Path
) -> None:
    """With COLLABBUS_NATS_URL the bus does not own the server: the account's seed is a setting."""
    from tests.ops.conftest import cli_env, collabbus

    institution = unique("ext")
    await join(partner, institution, FIXTURE["kind"], country="TR")
    assert nats_server.authority is not None
    env = {**cli_env(bus), "COLLABBUS_NATS_ACCOUNT_SEED": str(nats_server.authority.account_seed_path)}
    path = tmp_path / "ext.creds"
    code, _, stderr = await collabbus("institutions", "creds", institution, "--output", str(path), env=env)
    assert code == 0, stderr
    member = await connect_member(nats_server.url, path, institution)
    try:
        verdict = await offer(member.nc, institution, project_event(institution))
        assert verdict.accepted, verdict.as_dict()
    finally:
        await member.nc.close()

    env["COLLABBUS_NATS_ACCOUNT_SEED"] = new_seed(nkeys.PREFIX_BYTE_OPERATOR).decode()
    code, stdout, stderr = await collabbus("institutions", "creds", institution, env=env)
    assert code == 1 and stdout == "" and "not an account nkey seed" in stderr


async def test_a_bus_whose_credentials_do_not_allow_jetstream_says_so_at_once(
    nats_server: EmbeddedNats, partner: Client, tmp_path: Path
) -> None:
    """Credentials without JetStream's API (a member's, given as the bus's by mistake): NATS drops
    the requests and says why on the connection; `collabbus up` names it and exits, rather than
    wait for a JetStream that will never answer it (or time out saying "Is the bus running?")."""
    institution = unique("nojs")
    await join(partner, institution, FIXTURE["kind"], country="TR")
    assert nats_server.authority is not None
    creds = tmp_path / "member.creds"
    creds.write_text(partner_creds(nats_server.authority.account, institution))
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path / "bus"), "COLLABBUS_NATS_URL": nats_server.url,
           "COLLABBUS_NATS_CREDS": str(creds), "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}",
           "COLLABBUS_GATE_PROCESSES": "0", "COLUMNS": "300"}
    result = await acollabbus("up", env=env)
    assert result.returncode == 1, result.stderr
    assert "error: NATS refused the bus JetStream's API" in result.stderr, result.stderr
    assert 'publish to "$js.api.info"' in result.stderr.lower() and "must allow publishing to $JS.API.>" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_rate_limited_verdict_says_to_wait_at_least_until_the_token_is_there() -> None:
    """``retry_after`` rounds the wait up to the millisecond: a wait of a few microseconds (a
    bucket all but refilled) is 0.001, never 0 — a client must not be told to retry at once."""
    from bus.ingress import retry_after

    assert retry_after(2.5e-6) == 0.001 and retry_after(0.05) == 0.05 and retry_after(0.0501) == 0.051
    assert retry_after(0.0) == 0.001


async def test_a_member_over_its_rate_is_refused_unread_and_the_others_are_served(server: EmbeddedNats, tmp_path: Path) -> None:
    """A member flooding NATS ingress had the gatekeeper judge every message, until the server cut
    the gatekeeper's connection as a slow consumer — and nobody's offers were answered."""
    settings = Settings(data_dir=tmp_path / "bus", nats_url=server.url, nats_creds=server.bus_creds,
                        ingress_rate_limit=20, ingress_rate_burst=10)
    bus = Bus(settings)
    await bus.start(state=False)
    partner = await nats.connect(server.url, **server.connect_options())
    flooding, other = await new_member(server, partner, tmp_path, "flood"), await new_member(server, partner, tmp_path, "calm")
    try:
        for _ in range(2000):  # fire and forget: no reply to send, nothing read
            await flooding.nc.publish(f"collab.ingress.{flooding.institution}.project.registered", b"{}")
        verdicts = await asyncio.gather(*(offer(flooding.nc, flooding.institution, project_event(flooding.institution))
                                          for _ in range(5)))
        refused = [v for v in verdicts if not v.accepted]
        assert refused and all(v.reason == "unavailable" and [p.type for p in v.errors] == ["rate_limited"] for v in refused)
        assert "is over its rate limit over NATS (20 offers/s, burst 10); retry in" in refused[0].errors[0].msg
        assert all(v.retry_after is not None and 0 < v.retry_after <= 1.0 for v in refused)  # for a client to wait on
        assert (await offer(other.nc, other.institution, project_event(other.institution))).accepted  # its own bucket
        await asyncio.sleep(0.6)  # the flooder's bucket refills
        assert (await offer(flooding.nc, flooding.institution, project_event(flooding.institution))).accepted
    finally:
        await flooding.nc.close()
        await other.nc.close()
        await partner.close()
        await bus.stop()


async def test_a_member_that_leaves_loses_its_credentials_also_when_it_left_while_the_bus_was_down(tmp_path: Path) -> None:
    """It could offer nothing any more (not_member), but could still connect and send."""
    settings = Settings(data_dir=tmp_path, nats_listen=f"127.0.0.1:{free_port()}")
    bus = Bus(settings)
    await bus.start(state=False)
    leaving, missed, staying = unique("leaving"), unique("missed"), unique("staying")
    members: dict[str, Member] = {}
    try:
        assert bus.server is not None and bus.server.authority is not None
        for institution in (leaving, missed, staying):
            await join(bus.nc, institution, FIXTURE["kind"], country="TR")
            creds = tmp_path / f"{institution}.creds"
            creds.write_text(bus.server.authority.member_creds(institution))
            members[institution] = await connect_member(bus.server.url, creds, institution)

        async def leave(institution: str) -> None:
            event = {"specversion": "1.0", "id": unique("left"), "source": f"/institutions/{OPERATOR}",
                     "type": "institution.left", "subject": institution, "data": {"id": institution}}
            assert (await offer(bus.nc, OPERATOR, event)).accepted

        await leave(leaving)
        deadline = asyncio.get_running_loop().time() + 10
        while members[leaving].nc.is_connected:  # the server closed its connection
            assert asyncio.get_running_loop().time() < deadline, "the leaving member stayed connected"
            await asyncio.sleep(0.05)
        bus.membership.on_left = None  # as if the bus had been down when the next one left
        await leave(missed)
        await asyncio.sleep(0.3)
        assert members[missed].nc.is_connected
        await bus.revoke_departed()  # what the bus does on start
        while members[missed].nc.is_connected:
            assert asyncio.get_running_loop().time() < deadline, "the member that left meanwhile stayed connected"
            await asyncio.sleep(0.05)
        for institution in (leaving, missed):
            with pytest.raises(Exception, match="Authorization Violation"):
                await nats.connect(bus.server.url, user_credentials=str(tmp_path / f"{institution}.creds"), allow_reconnect=False,
                                   max_reconnect_attempts=0, connect_timeout=3, inbox_prefix=member_inbox_prefix(institution))
        assert (await offer(members[staying].nc, staying, project_event(staying))).accepted  # the others are untouched
    finally:
        for member in members.values():
            await member.nc.close()
        await bus.stop()


def test_the_credentials_noted_were_issued_when_their_jwt_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `institutions access` lists as a credential's issue time is its JWT's `iat`, read once:
    a clock passing a whole second while the credentials are issued does not make them differ;
    given a time of issue and an expiry, the JWT and the record carry both as given."""
    import bus.credentials
    from bus.credentials import Authority

    authority = Authority.load_or_create(tmp_path / "auth")
    second = int(time.time())
    readings = iter(second + 0.7 + 0.6 * step for step in range(100))  # each reading 0.6 s after the last
    monkeypatch.setattr(bus.credentials, "time", type("Clock", (), {"time": staticmethod(lambda: next(readings))}))
    issued = decode_jwt_claims(authority.member_creds("fi-stepping").splitlines()[1])
    assert [(entry["user"], entry["issued_at"]) for entry in authority.credentials_of("fi-stepping")] == [(issued["sub"], issued["iat"])]
    monkeypatch.undo()

    given = decode_jwt_claims(authority.member_creds("fi-given", issued_at=second - 60, expires=second + 3600).splitlines()[1])
    assert (given["iat"], given["exp"]) == (second - 60, second + 3600)
    [noted] = authority.credentials_of("fi-given")
    assert (noted["issued_at"], noted["expires_at"]) == (second - 60, second + 3600)


def test_the_end_of_a_rotation_keeps_the_newest_valid_credentials(tmp_path: Path) -> None:
    """`revoke --earlier-creds` keeps the newest credentials still valid, not merely the newest
    issued: credentials issued last and already expired (or revoked) do not leave the member with
    nothing; with none valid, nothing is revoked."""
    from bus.credentials import Authority

    authority = Authority.load_or_create(tmp_path / "auth")
    users = []
    for expires in (None, None, int(time.time()) - 10):  # the newest issued has expired already
        users.append(decode_jwt_claims(authority.member_creds("fi-rotating", expires=expires).splitlines()[1])["sub"])
    assert authority.revoke("fi-rotating", keep_newest=True) == (2, 2)
    assert [entry["valid"] for entry in authority.credentials_of("fi-rotating")] == [False, True, False]
    assert [entry["user"] for entry in authority.valid_credentials("fi-rotating")] == [users[1]]
    assert authority.revoke("fi-rotating", keep_newest=True) == (0, 2)  # again: the same one kept

    authority.revoke("fi-rotating")
    assert authority.valid_credentials("fi-rotating") == []
    authority.member_creds("fi-lapsed", expires=int(time.time()) - 10)
    assert authority.revoke("fi-lapsed", keep_newest=True) == (0, 0)  # none valid: none to keep, none revoked
