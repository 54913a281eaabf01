"""The portal connector's reads of the read models (``PortalSync._reading``) on SQLite: they take
no write lock, so the bus applying events meanwhile is not held back, and nothing holds them."""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

from connectors.portal.connector import BUSINESS_ID_SCHEME, PortalClient, PortalSync
from handlers.db import make_engine, migrate, session_scope
from handlers.institutions import Institution
from tests.portal.conftest import TOKEN


def test_the_connector_reads_the_last_commit_while_a_writer_holds_the_lock(tmp_path: Path) -> None:
    database = tmp_path / "network.db"
    engine = make_engine(f"sqlite:///{database}")
    migrate(engine)
    with session_scope(engine) as session:
        session.add(Institution(id="diak", name={"fi": "Diak"}, kind="university", country="FI",
                                joined_at=datetime.now(timezone.utc),
                                identifiers=[{"scheme": BUSINESS_ID_SCHEME, "value": "2299000-1"}]))
    connector = PortalSync(None, engine, PortalClient("http://127.0.0.1:9", TOKEN), portal="test")
    writer = sqlite3.connect(database, isolation_level=None, timeout=30)
    writer.execute("BEGIN IMMEDIATE")  # as the bus does for each batch it applies
    writer.execute("UPDATE institutions SET identifiers = '[]' WHERE id = 'diak'")
    found: list[dict[str, str]] = []
    reading = threading.Thread(target=lambda: found.append(connector._members()), daemon=True)
    try:
        reading.start()
        reading.join(timeout=20)  # (a read that wanted the write lock would wait out SQLite's 30 s)
        assert not reading.is_alive(), "the connector's read waited for the writer"
        assert found == [{"2299000-1": "diak"}]  # the last commit, not the writer's change under way
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        reading.join(timeout=40)
        engine.dispose()
