"""Who may say what on the bus's NATS: decentralized JWT authentication (CONTRACT §2 ``creds ID``).

The gatekeeper takes the sender's institution from the ingress subject
(``collab.ingress.{institution}.…``), so the subject must be something the server itself stops a
partner from choosing. NATS's decentralized auth does that without a round trip to the bus: a
chain of ed25519 keys (nkeys) in which an *operator* signs an *account*, and the account signs
*user* JWTs that carry their publish/subscribe permissions. The server needs only the operator's
and the accounts' JWTs (preloaded into its ``MEMORY`` resolver); a user JWT is checked on
connection against the account's public key. So issuing credentials for a new member is a
signature made here — no server reload, no restart, no list of users in the server's config.

Partners get a standard ``.creds`` file (user JWT + user nkey seed, with the usual armour), the
same format ``nsc`` writes, so any NATS client (Go, JS, Java, Python) uses it unchanged. Their
JWT allows publishing to ``collab.ingress.{their id}.>`` and subscribing to their own inboxes,
``_INBOX.{their id}.>`` (the verdict replies; a client is told to use the prefix
``_INBOX.{their id}``, which every NATS client takes as its custom inbox prefix), and to the
subjects where the log's server republishes the stored events of the types every member may see
(``handlers.confidential.public_live_subjects``: ``collab.live.…``, each with its log sequence),
and asking the bus for pages of the log it may see (``collab.log.{their id}``: ``bus.logpages``),
nothing else: not the log's own subjects (what is published there is what was offered, before the
log took or refused it: a repeat, an id another event holds), not the confidential events' subjects
(reviews stay confidential until a decision, applications are the call's and the applicant's),
not the JetStream API (a pull request's messages go to whatever reply subject it names, the
log's own subjects included), not another member's verdicts. The bus's own user has no
permission list, which in NATS means every right within the account; its connections make their
inboxes under :data:`BUS_INBOX_PREFIX`, which is outside ``_INBOX.``: no member's permissions
reach it. The gate answers an offer only on
the offering institution's own inboxes (or the bus's, by their unguessable names) and never on a
wildcard subject (``bus.ingress.reply_allowed``), so no member can make the bus publish into
another's inboxes or the log.

The JWT encoding follows nats-io/jwt v2: header ``{"typ":"JWT","alg":"ed25519-nkey"}``,
base64url without padding, the signature an nkey signature of ``header.payload``, and ``jti`` the
base32 (no padding) SHA-512/256 of the standard claims serialized with an empty ``jti``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

ACCOUNT_NAME = "COLLABBUS"
SYSTEM_ACCOUNT_NAME = "SYS"
OPERATOR_NAME = "collabbus"
BUS_USER_NAME = "collabbus-bus"

MEMBER_INBOXES = "_INBOX"
"""Members' inboxes are ``_INBOX.{institution}.…`` (see :func:`member_inbox_prefix`)."""
BUS_INBOX_PREFIX = "_COLLABBUS.INBOX"
"""The inbox prefix of the bus's own connections: outside every member's permissions."""

_SEED_LIKE = re.compile(r"S[A-Z2-7]{57}")
_JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_UNLIMITED = -1


class CredentialsError(RuntimeError):
    """Credentials could not be issued (no signing key, a key that is not an account's, …)."""


# --------------------------------------------------------------------------- keys


def new_seed(prefix: int) -> bytes:
    """A fresh nkey seed of the given role (``nkeys.PREFIX_BYTE_OPERATOR``, ``…_ACCOUNT``, ``…_USER``)."""
    return bytes(nkeys.encode_seed(os.urandom(32), prefix))


def public_key(pair: nkeys.KeyPair) -> str:
    return bytes(pair.public_key).decode()


def account_key(seed: str | bytes) -> nkeys.KeyPair:
    """The account key pair of ``seed`` (``SA…``); anything else is refused with a reason."""
    raw = seed.strip().encode() if isinstance(seed, str) else seed.strip()
    if not raw.startswith(b"SA"):
        raise CredentialsError("not an account nkey seed: it should start with 'SA'")
    try:
        return nkeys.from_seed(bytearray(raw))
    except nkeys.NkeysError as exc:
        raise CredentialsError(f"not a valid account nkey seed ({exc.__class__.__name__})") from None


def read_account_seed(value: str) -> nkeys.KeyPair:
    """``COLLABBUS_NATS_ACCOUNT_SEED``: the seed itself, or the path of a file that holds it.

    A seed is never repeated in an error message: it is a secret.
    """
    text = value.strip()
    if _SEED_LIKE.fullmatch(text):
        return account_key(text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise CredentialsError(f"the account seed is neither an nkey seed (SA…) nor a readable file: {path}")
    return account_key(path.read_bytes())


# --------------------------------------------------------------------------- JWTs


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def encode_jwt(signer: nkeys.KeyPair, subject: str, name: str, nats: dict[str, Any], *, issued_at: int | None = None,
               expires: int | None = None) -> str:
    """A NATS JWT for ``subject`` signed by ``signer``, as nats-io/jwt v2 encodes one (issued now,
    unless ``issued_at`` says when; valid until ``expires``, s since the epoch, when given: the
    server refuses it after that and closes the connections made with it)."""
    standard = {**({"exp": expires} if expires is not None else {}),
                "iat": int(time.time()) if issued_at is None else issued_at, "iss": public_key(signer), "name": name, "sub": subject}
    # nats-io/jwt hashes the standard claims (Go's field order, jti still empty) for a repeatable id.
    jti = base64.b32encode(hashlib.new("sha512_256", _json(standard)).digest()).rstrip(b"=").decode()
    claims = {"jti": jti, **standard, "nats": nats}
    signing_input = f"{_b64(_json(_JWT_HEADER))}.{_b64(_json(claims))}"
    return f"{signing_input}.{_b64(signer.sign(signing_input.encode()))}"


def decode_jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT (not verified: for reading back what was issued)."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def operator_jwt(operator: nkeys.KeyPair, system_account: str, *, issued_at: int | None = None) -> str:
    """The self-signed operator JWT, naming the system account the server uses for its own traffic."""
    return encode_jwt(operator, public_key(operator), OPERATOR_NAME,
                      {"system_account": system_account, "type": "operator", "version": 2}, issued_at=issued_at)


def account_jwt(
    operator: nkeys.KeyPair, account: str, name: str, *, jetstream: bool, revocations: dict[str, int] | None = None
) -> str:
    """An account JWT signed by the operator, without limits (and with JetStream unlimited when
    asked); ``revocations``: user public key → the time before which its credentials are refused."""
    limits: dict[str, Any] = {
        "subs": _UNLIMITED, "data": _UNLIMITED, "payload": _UNLIMITED,
        "imports": _UNLIMITED, "exports": _UNLIMITED, "wildcards": True, "conn": _UNLIMITED, "leaf": _UNLIMITED,
    }
    if jetstream:  # both storages 0 (absent) means JetStream is off for the account
        limits.update({"mem_storage": _UNLIMITED, "disk_storage": _UNLIMITED, "streams": _UNLIMITED, "consumer": _UNLIMITED})
    nats: dict[str, Any] = {"limits": limits, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2}
    if revocations:
        nats["revocations"] = dict(sorted(revocations.items()))
    return encode_jwt(operator, account, name, nats)


def user_jwt(account: nkeys.KeyPair, user: str, name: str, permissions: dict[str, Any] | None, *, expires: int | None = None,
             issued_at: int | None = None) -> str:
    """A user JWT signed by the account; ``permissions`` None means every right within the account."""
    nats: dict[str, Any] = {"subs": _UNLIMITED, "data": _UNLIMITED, "payload": _UNLIMITED, "type": "user", "version": 2}
    if permissions:
        nats.update(permissions)
    return encode_jwt(account, user, name, nats, expires=expires, issued_at=issued_at)


def member_inbox_prefix(institution: str) -> str:
    """The inbox prefix a member's client connects with (nats-py ``inbox_prefix``, Go
    ``nats.CustomInboxPrefix``, …): its credentials let it subscribe to these inboxes only."""
    return f"{MEMBER_INBOXES}.{institution}"


def member_ingress(institution: str) -> str:
    """The subjects a member offers events on: its credentials let it publish there only."""
    return f"collab.ingress.{institution}.>"


def partner_permissions(institution: str) -> dict[str, Any]:
    """What a member's connection may do: offer events as itself, receive its verdicts, follow
    the events every member may see as the log stores them (``collab.live``), and ask for pages of
    the log it may see (``collab.log.{institution}``: what it missed while away)."""
    from bus.logpages import member_log_requests
    from handlers.confidential import public_live_subjects

    return {
        "pub": {"allow": [member_ingress(institution), member_log_requests(institution)]},
        "sub": {"allow": [f"{member_inbox_prefix(institution)}.>", *public_live_subjects()]},
    }


def format_creds(token: str, seed: bytes) -> str:
    """A ``.creds`` file in the standard NATS layout (as ``nsc`` and nats-io/jwt's FormatUserConfig write it)."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{token}\n"
        "------END NATS USER JWT------\n"
        "\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n"
        "\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed.decode()}\n"
        "------END USER NKEY SEED------\n"
        "\n"
        "*************************************************************\n"
    )


def issue_creds(account: nkeys.KeyPair, name: str, permissions: dict[str, Any] | None, *, expires: int | None = None,
                issued_at: int | None = None) -> str:
    """New credentials (a fresh user key) signed by ``account``, as the text of a ``.creds`` file
    (valid until ``expires``, s since the epoch, when given; issued now unless ``issued_at`` says when)."""
    seed = new_seed(nkeys.PREFIX_BYTE_USER)
    user = public_key(nkeys.from_seed(bytearray(seed)))
    return format_creds(user_jwt(account, user, name, permissions, expires=expires, issued_at=issued_at), seed)


MEMBER_SUBSCRIPTIONS = 100
"""Subscriptions a member's connection may hold (one or two for its inbox, a dozen to follow
every public log subject)."""


def partner_creds(account: nkeys.KeyPair, institution: str, *, expires: int | None = None, issued_at: int | None = None) -> str:
    """A member's ``.creds``: it may offer events on its own ingress subjects and read its verdicts.

    Its message size is the server's: a member's oversize offer is refused by the gate, unread
    (CONTRACT §4: malformed input gets a rejection, never a dropped connection — a smaller limit
    in the credentials would make the server drop it); a flood of them is what the ingress rate
    limit is for."""
    limits = {"subs": MEMBER_SUBSCRIPTIONS}
    return issue_creds(account, institution, {**partner_permissions(institution), **limits}, expires=expires, issued_at=issued_at)


# --------------------------------------------------------------------------- files


def write_secret(path: Path, content: bytes | str, *, replace: bool = True) -> bool:
    """Write a secret readable by its owner only (0600), atomically.

    With ``replace=False`` an existing file wins (returns False): two processes creating the keys
    of a fresh data dir at once end up with one set, never a half-written file.
    """
    data = content.encode() if isinstance(content, str) else content
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# --------------------------------------------------------------------------- the embedded server's trust chain


@dataclass(frozen=True)
class Authority:
    """The embedded server's keys: operator → the bus's account (bus and partners) and the system account.

    Created once under ``directory`` (``<data dir>/nats/auth``) and kept: credentials issued
    before a restart stay valid, since they are checked against the same account key.
    """

    directory: Path
    operator: nkeys.KeyPair
    account: nkeys.KeyPair
    system: nkeys.KeyPair

    DIRECTORY = "auth"
    """Its place in the embedded server's store dir."""
    OPERATOR_SEED = "operator.nk"
    ACCOUNT_SEED = "account.nk"
    SYSTEM_SEED = "system-account.nk"
    BUS_CREDS = "bus.creds"
    ISSUED = "issued.jsonl"
    """One line per member credentials issued: the institution and the user's public key."""
    REVOKED = "revoked.json"
    """User public key → when its credentials were revoked (the account JWT carries it)."""

    @classmethod
    def load_or_create(cls, directory: Path) -> "Authority":
        """The keys under ``directory``, created (with the bus's credentials) where missing."""
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        pairs = []
        for name, prefix in ((cls.OPERATOR_SEED, nkeys.PREFIX_BYTE_OPERATOR), (cls.ACCOUNT_SEED, nkeys.PREFIX_BYTE_ACCOUNT),
                             (cls.SYSTEM_SEED, nkeys.PREFIX_BYTE_ACCOUNT)):
            path = directory / name
            if not path.exists():
                write_secret(path, new_seed(prefix) + b"\n", replace=False)
            pairs.append(nkeys.from_seed(bytearray(path.read_bytes().strip())))
        authority = cls(directory, *pairs)
        if not authority.bus_creds.exists():
            write_secret(authority.bus_creds, issue_creds(authority.account, BUS_USER_NAME, None), replace=False)
        return authority

    @property
    def account_seed_path(self) -> Path:
        """The account's seed: what signs members' credentials (``COLLABBUS_NATS_ACCOUNT_SEED`` elsewhere)."""
        return self.directory / self.ACCOUNT_SEED

    @property
    def bus_creds(self) -> Path:
        """The bus's own credentials: every right within the account."""
        return self.directory / self.BUS_CREDS

    def server_config(self) -> list[str]:
        """The nats-server configuration lines that enforce this trust chain."""
        system = public_key(self.system)
        account = public_key(self.account)
        # The operator's JWT is the same at every writing (a server refuses to reload a changed
        # operator); the account's changes with its revocations, which a reload applies.
        created = int((self.directory / self.OPERATOR_SEED).stat().st_mtime)
        return [
            f'operator: "{operator_jwt(self.operator, system, issued_at=created)}"',
            f'system_account: "{system}"',
            "resolver: MEMORY",
            "resolver_preload: {",
            f'  {account}: "{account_jwt(self.operator, account, ACCOUNT_NAME, jetstream=True, revocations=self.revocations())}"',
            f'  {system}: "{account_jwt(self.operator, system, SYSTEM_ACCOUNT_NAME, jetstream=False)}"',
            "}",
        ]

    def member_creds(self, institution: str, *, expires: int | None = None, issued_at: int | None = None) -> str:
        """New credentials for a member (:func:`partner_creds`; valid until ``expires`` when given),
        noted so that they can be revoked."""
        text = partner_creds(self.account, institution, expires=expires, issued_at=issued_at)
        claims = decode_jwt_claims(text.splitlines()[1])
        noted = {"institution": institution, "user": claims["sub"], "issued_at": claims["iat"], **({"expires_at": expires} if expires else {})}
        line = json.dumps(noted) + "\n"
        path = self.directory / self.ISSUED
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.write(line)
        return text

    def _issued(self) -> list[dict[str, Any]]:
        """What :meth:`member_creds` noted: one ``{institution, user, issued_at}`` per credentials."""
        path = self.directory / self.ISSUED
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def issued_to(self, institution: str) -> list[str]:
        """The user keys of the credentials issued to ``institution``, oldest first."""
        return [entry["user"] for entry in self._issued() if entry.get("institution") == institution]

    def credentials_of(self, institution: str | None = None) -> list[dict[str, Any]]:
        """The credentials issued to ``institution`` (None: to anyone), oldest first:
        ``{institution, user, issued_at, expires_at, revoked_at, valid}`` (times in s since the
        epoch; ``expires_at`` None for credentials valid until revoked, ``revoked_at`` None for
        those not revoked; ``valid``: neither revoked nor expired now)."""
        revoked, now = self.revocations(), time.time()
        found = []
        for entry in self._issued():
            if institution is not None and entry.get("institution") != institution:
                continue
            expires, ended = entry.get("expires_at"), revoked.get(entry["user"])
            found.append({"institution": entry["institution"], "user": entry["user"], "issued_at": entry.get("issued_at"),
                          "expires_at": expires, "revoked_at": ended, "valid": ended is None and (expires is None or expires > now)})
        return found

    def valid_credentials(self, institution: str | None = None) -> list[dict[str, Any]]:
        """Those of :meth:`credentials_of` valid now."""
        return [entry for entry in self.credentials_of(institution) if entry["valid"]]

    def holders(self) -> set[str]:
        """The institutions holding credentials issued here that are not all revoked."""
        revoked = self.revocations()
        return {entry["institution"] for entry in self._issued() if entry.get("user") not in revoked}

    def revocations(self) -> dict[str, int]:
        path = self.directory / self.REVOKED
        return {str(k): int(v) for k, v in json.loads(path.read_text()).items()} if path.exists() else {}

    def revoke(self, institution: str, *, keep_newest: bool = False) -> tuple[int, int]:
        """Revoke every credentials issued to ``institution`` (:meth:`member_creds`) — or, with
        ``keep_newest``, all but the newest valid ones (the end of a rotation without a gap: with
        none valid, nothing is revoked); returns how many were revoked now and how many there were
        to revoke. The server refuses them once its configuration is reloaded (its connections with
        them are closed then)."""
        revoked = self.revocations()
        now = int(time.time())
        issued = self.issued_to(institution)
        if keep_newest:
            valid = self.valid_credentials(institution)
            kept = valid[-1]["user"] if valid else None
            theirs = {user for user in issued if user != kept} if kept is not None else set()
        else:
            theirs = set(issued)
        fresh = theirs - set(revoked)
        if fresh:
            write_secret(self.directory / self.REVOKED, json.dumps({**revoked, **{user: now for user in fresh}}, indent=1))
        return len(fresh), len(theirs)

    def adopt_open_store(self, store_dir: Path) -> None:
        """Move a JetStream store written before authentication into the account (once).

        ``store_dir`` is the configured JetStream ``store_dir``; the server keeps each account's
        streams under ``jetstream/<account>`` inside it, and without auth that account is the
        global ``$G``. A data dir from an earlier version keeps its log this way.
        """
        old, new = store_dir / "jetstream" / "$G", store_dir / "jetstream" / public_key(self.account)
        if old.is_dir() and not new.exists():
            shutil.move(str(old), str(new))
