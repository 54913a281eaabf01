"""The read models' engine for the database URLs a setting may give."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from handlers.db import make_engine, migrate


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_a_database_in_memory_is_made_and_migrated(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    engine = make_engine(url)
    migrate(engine)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM institutions")).scalar() == 0
    assert list(tmp_path.iterdir()) == []  # no file, no directory named after the URL


def test_a_file_database_gets_its_directory_also_with_query_options(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "read-models.db"
    engine = make_engine(f"sqlite:///{path}?timeout=5")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    assert path.exists() and not (tmp_path / "nested" / "read-models.db?timeout=5").exists()
    assert engine.pool.size() == 20  # the gateway's readers share a pool
