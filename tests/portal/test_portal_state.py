"""The connector's own state outlives a rebuild; how an entry maps onto a project."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import httpx

from connectors.portal import store
from connectors.portal.connector import (
    _retry_after,
    changes_between,
    event_id,
    project_facts,
    project_id_of,
)
from handlers.db import make_engine, migrate, session_scope
from handlers.routes import network
from handlers.service import NetworkService


def test_the_cursor_and_entry_hashes_survive_a_rebuild(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    migrate(engine)
    with session_scope(engine) as session:
        store.save_cursor(session, store.PortalCursor(portal="p", high_water="2026-01-01T00:00:00.000000Z", saved_at=datetime.now(UTC)))
        session.add(store.PortalEntry(portal="p", entry_id="e1", project_id="innokyla-e1", owner="m", content_hash="0" * 64,
                                      revision=1, data={}, synced_at=datetime.now(UTC)))
    NetworkService(engine, network()).reset()  # what `collabbus rebuild` does to the read models
    with session_scope(engine) as session:
        assert store.load_cursor(session, "p").high_water == "2026-01-01T00:00:00.000000Z"
        assert list(store.known_entries(session, "p", ["e1"])) == ["e1"]
    engine.dispose()


ENTRY = {
    "id": "abc123", "type": "practice", "url": "https://innokyla.example/practice/abc123",
    "title": {"fi": "Kotona asumisen tuki", "ar": "دعم العيش في المنزل"}, "summary": {"sv": "Stöd"},
    "organisation": {"name": "X ry", "business_id": "1234567-8"}, "region": "Uusimaa", "municipality": None,
    "funder": "STEA", "parent_id": None, "tags": ["x"], "status": "archived",
}


def test_an_entry_becomes_a_project_with_its_texts_intact() -> None:
    facts = project_facts(ENTRY, "member-1")
    assert facts == {
        "project_id": "innokyla-abc123", "title": ENTRY["title"], "summary": {"sv": "Stöd"}, "owner": "member-1",
        "status": "completed", "location": {"country": "FI", "region": "Uusimaa"},
        "external_refs": [{"system": "innokyla", "id": "abc123", "url": ENTRY["url"]}],
    }
    assert changes_between(facts, project_facts({**ENTRY, "summary": None, "status": "published"}, "member-1")) == {
        "status": "active", "summary": None,
    }
    assert project_id_of("a/b c") != project_id_of("a_b_c") and project_id_of("a/b c").startswith("innokyla-a_b_c-")
    assert event_id("abc123", 2, "f" * 64) == "innokyla.abc123.2.ffffffffffffffff"


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert _retry_after(httpx.Response(429, headers={"Retry-After": "3"})) == 3.0
    assert _retry_after(httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert _retry_after(httpx.Response(503)) is None
