"""Backing a network up and restoring it: the log, the read models' database, the server's keys.

A backup directory holds:

- ``streams/<stream>/backup.json`` and ``stream.tar.s2`` for the log (``COLLAB_EVENTS``) and the
  dead letters (``COLLAB_DLQ``), with their consumers: JetStream's own snapshot (``$JS.API.STREAM.
  SNAPSHOT``), kept as the server sends it, in the layout ``nats stream backup`` writes (so ``nats
  stream restore`` reads it too);
- ``collabbus.db``: a SQLite read-model database, copied with SQLite's online backup (consistent
  while the bus writes); or ``collabbus.pgdump``: a PostgreSQL one, dumped by ``pg_dump`` (its
  custom format, one consistent snapshot while the bus writes; restored by ``pg_restore`` in one
  transaction into an empty database). It holds what the log does not: webhook endpoints, HTTP
  tokens, the portal connector's cursor and publications;
- ``nats-auth/``: the embedded server's keys and the credentials it issued, so that members'
  credentials stay valid after a restore (secrets: the directory is the owner's only);
- ``collabbus-backup.json``: what is there, when, and from which bus, with every file's size and
  SHA-256 (a restore checks them all before it writes anything).

The database is copied before the log is snapshotted, so the log holds everything the copy
applied: after a restore the bus carries on from the database's position and applies the rest
(each event once, as after any restart).

Neither leaves half a result behind: a backup that fails removes what it wrote, and a restore that
fails removes the streams, the database and the keys it put in place, so that it can be run again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bus.streams import DLQ_STREAM, EVENTS_STREAM

STREAMS = (EVENTS_STREAM, DLQ_STREAM)
MANIFEST = "collabbus-backup.json"
LAST_BACKUP = "last-backup.json"
"""In the data dir: when its network was last backed up, and where to (``collabbus status``, ``/metrics``)."""
DATABASE = "collabbus.db"
PG_DUMP = "collabbus.pgdump"
AUTH = "nats-auth"
CHUNK_SIZE = 128 * 1024
"""Bytes per message of a snapshot."""
RESTORE_CHUNK_SIZE = 64 * 1024
"""Bytes per message of a restore (as the ``nats`` CLI sends them)."""
STALL_SECONDS = 30.0
"""A snapshot that brings nothing for this long has failed."""
API = "$JS.API"
FORMAT = 1
"""The backup directory's layout version (``format`` in the manifest)."""


class BackupError(RuntimeError):
    """A backup or restore that cannot go on; the message says why, for people."""


@dataclass
class StreamCopy:
    """One stream in a backup: its messages and sequences when it was taken, and the archive's size."""

    name: str
    messages: int = 0
    first_seq: int = 0
    last_seq: int = 0
    consumers: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Manifest:
    """``collabbus-backup.json``."""

    created_at: str
    network: str
    streams: list[StreamCopy] = field(default_factory=list)
    database: dict[str, Any] = field(default_factory=dict)
    auth: bool = False
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Every other file of the backup, by path under it: its ``bytes`` and ``sha256``."""

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "created_at": self.created_at, "network": self.network,
                "streams": [s.as_dict() for s in self.streams], "database": self.database, "auth": self.auth,
                "files": self.files}


Progress = Callable[[str, int], None]
"""Called with what is being copied and the bytes copied of it so far."""


def sqlite_file(db_url: str) -> Path | None:
    """The file of a SQLite database URL (None: another database, or one in memory)."""
    from sqlalchemy.engine import make_url

    url = make_url(db_url)
    if not url.drivername.startswith("sqlite") or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def postgres_url(db_url: str) -> Any:
    """The SQLAlchemy URL of a PostgreSQL database URL (None: another database)."""
    from sqlalchemy.engine import make_url

    url = make_url(db_url)
    return url if url.drivername.split("+", 1)[0] == "postgresql" else None


def pg_tool(name: str) -> str:
    """Where PostgreSQL's ``name`` (``pg_dump``, ``pg_restore``) is: on the PATH, else in the
    newest ``/usr/lib/postgresql/*/bin`` (Debian's layout)."""
    found = shutil.which(name)
    if found:
        return found
    installed = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda path: path.parts[-3].zfill(4))
    if installed:
        return str(installed[-1])
    raise BackupError(f"{name} is not installed (PostgreSQL's client programs, e.g. the postgresql-client package): "
                      "it is what backs up and restores read models in PostgreSQL")


def _pg_run(tool: str, url: Any, arguments: list[str]) -> None:
    """Run ``pg_dump``/``pg_restore`` on the database ``url`` (its password in the environment,
    not on the command line, where other users' ``ps`` would show it)."""
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10"}
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    target = url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    done = subprocess.run([pg_tool(tool), *arguments, "--dbname", target], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        said = [line for line in done.stderr.splitlines() if line.strip()]
        raise BackupError(f"{tool} failed (exit {done.returncode}): {said[-1] if said else 'no message'}")


def dump_postgres(db_url: str, target: Path) -> int:
    """``pg_dump`` of the database into ``target`` (custom format); its size."""
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        _pg_run("pg_dump", postgres_url(db_url), ["--format=custom", "--no-owner", "--no-privileges", "--file", str(partial)])
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target.stat().st_size


def copy_sqlite(source: Path, target: Path) -> int:
    """An online copy of ``source`` (consistent while another process writes it); its size."""
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    with closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)) as reader, \
            closing(sqlite3.connect(partial)) as writer:
        reader.backup(writer, pages=4096)
    partial.replace(target)
    return target.stat().st_size


async def snapshot(nc: Any, stream: str, directory: Path, progress: Progress | None = None, *,
                   check: bool = False) -> StreamCopy:
    """JetStream's snapshot of ``stream`` (with its consumers) into ``directory``; ``check``: the
    server first verifies every stored message's checksum (and refuses a damaged stream)."""
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / "stream.tar.s2"
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    received = 0
    inbox = nc.new_inbox()

    with open(archive, "wb") as out:
        async def chunk(msg: Any) -> None:
            nonlocal received
            if done.done():
                return
            if not msg.data:  # the end: a status 204, or the server's reason it stopped
                status = (msg.headers or {}).get("Status")
                if status and status != "204":
                    description = (msg.headers or {}).get("Description", "")
                    done.set_exception(BackupError(f"the server stopped the snapshot of {stream}: {status} {description}".strip()))
                else:
                    done.set_result(None)
                return
            if msg.reply:  # flow control: the server sends more once this is answered
                await nc.publish(msg.reply, b"")
            out.write(msg.data)
            received += len(msg.data)
            if progress is not None:
                progress(stream, received)

        sub = await nc.subscribe(inbox, cb=chunk, pending_msgs_limit=-1, pending_bytes_limit=-1)
        try:
            request = {"deliver_subject": inbox, "no_consumers": False, "chunk_size": CHUNK_SIZE, "jsck": check}
            answer = await _api(nc, f"{API}.STREAM.SNAPSHOT.{stream}", request)
            while not done.done():  # as long as chunks keep coming
                before = received
                try:
                    await asyncio.wait_for(asyncio.shield(done), timeout=STALL_SECONDS)
                except TimeoutError:
                    if received == before:
                        raise BackupError(f"the snapshot of {stream} stalled: nothing came for {STALL_SECONDS:.0f} s") from None
            done.result()
        finally:
            await sub.unsubscribe()
    (directory / "backup.json").write_text(
        json.dumps({"config": answer["config"], "state": answer["state"]}, indent=2) + "\n", encoding="utf-8")
    state = answer["state"]
    return StreamCopy(stream, state.get("messages", 0), state.get("first_seq", 0), state.get("last_seq", 0),
                      state.get("consumer_count", 0), archive.stat().st_size)


async def restore(nc: Any, directory: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Create the stream saved in ``directory`` from its snapshot; the stream's state afterwards."""
    meta = json.loads((directory / "backup.json").read_text(encoding="utf-8"))
    name = meta["config"]["name"]
    answer = await _api(nc, f"{API}.STREAM.RESTORE.{name}", {"config": meta["config"], "state": meta["state"]})
    deliver = answer["deliver_subject"]
    sent = 0
    with open(directory / "stream.tar.s2", "rb") as archive:
        while piece := archive.read(RESTORE_CHUNK_SIZE):
            _check(name, (await nc.request(deliver, piece, timeout=30)).data)
            sent += len(piece)
            if progress is not None:
                progress(name, sent)
    final = _check(name, (await nc.request(deliver, b"", timeout=600)).data)  # the server unpacks it now
    return dict(final.get("state") or {})


async def restore_all(nc: Any, source: Path, manifest: dict[str, Any], db_url: str,
                      progress: Progress | None = None) -> tuple[dict[str, dict[str, Any]], Path | str | None]:
    """Restore every stream of the backup, then its database (SQLite's file, or PostgreSQL's dump);
    the streams' states and where the database went. The server must not have the streams yet: on failure, those begun are
    removed again (a :class:`BackupError` says whether that worked)."""
    states: dict[str, dict[str, Any]] = {}
    begun: list[str] = []
    try:
        for stream in manifest["streams"]:
            begun.append(stream["name"])
            states[stream["name"]] = await restore(nc, source / "streams" / stream["name"], progress)
        database = await asyncio.to_thread(place_database, source, db_url)
    except BaseException as exc:
        left = await remove_streams(nc, begun)
        if isinstance(exc, BackupError):
            undone = (f"; {', '.join(left)} could not be removed again: delete it before restoring again "
                      "(nats stream rm)" if left else "; what it restored was removed again")
            raise BackupError(f"{exc}{undone}") from None
        raise
    return states, database


async def remove_streams(nc: Any, names: list[str]) -> list[str]:
    """Delete ``names`` from the server (as far as they are there); those it could not delete."""
    left = []
    for name in names:
        try:
            answer = json.loads((await nc.request(f"{API}.STREAM.DELETE.{name}", b"", timeout=10)).data or b"{}")
        except Exception:
            left.append(name)
            continue
        error = answer.get("error")
        if error and error.get("err_code") != 10059:  # (10059: no such stream)
            left.append(name)
    return left


async def _api(nc: Any, subject: str, request: dict[str, Any]) -> dict[str, Any]:
    stream = subject.rsplit(".", 1)[-1]
    return _check(stream, (await nc.request(subject, json.dumps(request).encode(), timeout=10)).data)


def _check(stream: str, data: bytes) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(data) if data else {}
    error = answer.get("error")
    if error:
        raise BackupError(f"{stream}: {error.get('description', error)} (JetStream error {error.get('err_code', error.get('code'))})")
    return answer


async def back_up(nc: Any, target: Path, *, network: str, db_url: str, auth_dir: Path | None,
                  progress: Progress | None = None, check: bool = False) -> Manifest:
    """Write a backup of the network into ``target`` (new or empty); ``check``: see :func:`snapshot`.
    A backup that fails (or is interrupted) removes what it wrote."""
    if target.exists() and any(target.iterdir()):
        raise BackupError(f"{target} is not empty: a backup goes into a new directory")
    present = await existing_streams(nc)
    if EVENTS_STREAM not in present:
        raise BackupError(f"this NATS has no log ({EVENTS_STREAM}): is it the network's?")
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o700)  # it holds the keys and the tokens' hashes
    try:
        return await _back_up(nc, target, present, network=network, db_url=db_url, auth_dir=auth_dir,
                              progress=progress, check=check)
    except BaseException as exc:
        _empty(target, remove=created)
        if isinstance(exc, BackupError):
            raise BackupError(f"{exc}; what the backup had written into {target} was removed") from None
        raise


async def _back_up(nc: Any, target: Path, present: list[str], *, network: str, db_url: str, auth_dir: Path | None,
                   progress: Progress | None, check: bool) -> Manifest:
    manifest = Manifest(created_at=datetime.now(UTC).isoformat(timespec="seconds"), network=network)
    database = sqlite_file(db_url)
    copying: tuple[str, str, Callable[[], int]] | None = None  # (kind, file, how)
    if database is not None and database.exists():
        copying = ("sqlite", DATABASE, lambda: copy_sqlite(database, target / DATABASE))
    elif postgres_url(db_url) is not None:
        copying = ("postgresql", PG_DUMP, lambda: dump_postgres(db_url, target / PG_DUMP))
    if copying is not None:
        kind, name, copy = copying
        if progress is not None:
            progress(name, 0)
        size = await asyncio.to_thread(copy)
        manifest.database = {"kind": kind, "file": name, "bytes": size}
        if progress is not None:
            progress(name, size)
    elif database is None:
        manifest.database = {"kind": db_url.split(":", 1)[0].split("+", 1)[0], "file": None}
    for stream in (s for s in STREAMS if s in present):
        manifest.streams.append(await snapshot(nc, stream, target / "streams" / stream, progress, check=check))
    if auth_dir is not None and auth_dir.is_dir():
        shutil.copytree(auth_dir, target / AUTH)
        manifest.auth = True
    manifest.files = await asyncio.to_thread(_sums, target)
    partial = target / (MANIFEST + ".partial")  # the manifest last, and whole: it says the backup is complete
    partial.write_text(json.dumps(manifest.as_dict(), indent=2) + "\n", encoding="utf-8")
    partial.replace(target / MANIFEST)
    return manifest


def _empty(directory: Path, *, remove: bool) -> None:
    """Remove what is in ``directory``, and ``directory`` itself when ``remove``."""
    if remove:
        shutil.rmtree(directory, ignore_errors=True)
        return
    for path in directory.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _digest(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _sums(target: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``target`` (the manifest's ``files``)."""
    return {path.relative_to(target).as_posix(): {"bytes": path.stat().st_size, "sha256": _digest(path)}
            for path in sorted(target.rglob("*")) if path.is_file() and path.name != MANIFEST}


def verify(source: Path, manifest: dict[str, Any], progress: Progress | None = None) -> bool:
    """Check every file the manifest lists against its size and SHA-256; False when the manifest
    lists none (a backup made before it did). Raises :class:`BackupError` at the first file that
    is missing or differs."""
    files: dict[str, dict[str, Any]] | None = manifest.get("files")
    if not files:
        return False
    total = sum(int(entry["bytes"]) for entry in files.values())
    checked = 0
    for name, entry in files.items():
        path = source / name
        if not path.is_file():
            raise BackupError(f"the backup is incomplete: {path} is missing")
        size = path.stat().st_size
        if size != entry["bytes"] or _digest(path) != entry["sha256"]:
            raise BackupError(f"the backup is damaged: {path} is not the file that was backed up "
                              f"({size:,} bytes, {entry['bytes']:,} when written; its SHA-256 differs)"
                              if size == entry["bytes"] else
                              f"the backup is damaged: {path} has {size:,} bytes, {entry['bytes']:,} when written")
        checked += size
        if progress is not None:
            progress("checking", checked)
    if progress is not None:
        progress("checking", total)
    return True


def note_done(data_dir: Path, target: Path, manifest: Manifest) -> None:
    """Remember in the data dir that its network was backed up into ``target``."""
    record = {"at": manifest.created_at, "into": str(target.resolve()),
              "last_seq": {stream.name: stream.last_seq for stream in manifest.streams},
              "database": manifest.database.get("kind")}
    partial = data_dir / (LAST_BACKUP + ".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    partial.replace(data_dir / LAST_BACKUP)


def last_backup(data_dir: Path) -> dict[str, Any] | None:
    """What :func:`note_done` last wrote in ``data_dir`` (None: no backup was made from it)."""
    try:
        record: dict[str, Any] = json.loads((data_dir / LAST_BACKUP).read_text(encoding="utf-8"))
        datetime.fromisoformat(record["at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def read_manifest(source: Path) -> dict[str, Any]:
    """The manifest of the backup in ``source``, checked to be one this bus can restore."""
    path = source / MANIFEST
    if not path.is_file():
        raise BackupError(f"{source} holds no collabbus backup (no {MANIFEST})")
    manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{path} is of format {manifest.get('format')!r}; this bus restores format {FORMAT}")
    return manifest


def place_auth(source: Path, auth_dir: Path) -> bool:
    """Put the backup's server keys where the embedded server looks for them (before it starts).
    False when the backup has none; refuses a data dir with keys of its own."""
    if not (source / AUTH).is_dir():
        return False
    if auth_dir.exists() and any(auth_dir.iterdir()):
        raise BackupError(f"{auth_dir} holds a server's keys already: restore into a new data dir")
    auth_dir.parent.mkdir(parents=True, exist_ok=True)
    if auth_dir.exists():
        auth_dir.rmdir()
    shutil.copytree(source / AUTH, auth_dir)
    auth_dir.chmod(0o700)
    return True


def check_database_target(source: Path, db_url: str) -> Path | None:
    """Where the backup's SQLite database goes (None when the backup has none, or a PostgreSQL
    dump); refuses a database URL that is not of the backup's kind, a SQLite file that exists, and
    a PostgreSQL database that holds tables."""
    if (source / PG_DUMP).is_file():
        _check_empty_postgres(db_url)
        return None
    if not (source / DATABASE).is_file():
        return None
    target = sqlite_file(db_url)
    if target is None:
        raise BackupError(f"the backup's read models are a SQLite file, and the database here is not one ({db_url.split(':', 1)[0]})")
    if target.exists():
        raise BackupError(f"{target} exists: restore into a new data dir (or move it away first)")
    return target


def _check_empty_postgres(db_url: str) -> None:
    import sqlalchemy as sa

    url = postgres_url(db_url)
    if url is None:
        raise BackupError(f"the backup's read models are a PostgreSQL dump, and the database here is not PostgreSQL "
                          f"({db_url.split(':', 1)[0]}): set COLLABBUS_DATABASE_URL to an empty PostgreSQL database")
    pg_tool("pg_restore")  # (said before anything is written)
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            tables = sa.inspect(connection).get_table_names()
    except sa.exc.OperationalError as exc:
        raise BackupError(f"the database {url.render_as_string(hide_password=True)} cannot be reached: "
                          f"{str(exc.orig).strip().splitlines()[0] if exc.orig else exc}") from None
    finally:
        engine.dispose()
    if tables:
        raise BackupError(f"the database {url.render_as_string(hide_password=True)} holds tables already "
                          f"({len(tables)}): restore into an empty database (createdb)")


def place_database(source: Path, db_url: str) -> Path | str | None:
    """Put the backup's database where ``db_url`` says: its SQLite file (its path), or its
    PostgreSQL dump restored in one transaction (the URL, without its password); None when the
    backup has none."""
    if (source / PG_DUMP).is_file():
        check_database_target(source, db_url)
        url = postgres_url(db_url)
        _pg_run("pg_restore", url, ["--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction", str(source / PG_DUMP)])
        return str(url.render_as_string(hide_password=True))
    target = check_database_target(source, db_url)
    if target is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        shutil.copyfile(source / DATABASE, partial)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


async def existing_streams(nc: Any) -> list[str]:
    """The network's streams the server has already."""
    from nats.js.errors import NotFoundError

    js = nc.jetstream()
    found = []
    for stream in STREAMS:
        try:
            await js.stream_info(stream)
        except NotFoundError:
            continue
        found.append(stream)
    return found
