"""Alembic: empty → head → base on both databases, and the models match head."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from server.db import make_engine
from server.migrate import downgrade, upgrade
from server.models import Base
from server.settings import Settings
from tests.conftest import fresh_pg_database

TABLES = {"projects", "runs", "steps", "layer_values", "scalars", "layer_rollups",
          "series_rollups", "alert_states", "alerts", "alert_silences", "alert_rules",
          "alert_receivers", "alert_notifications", "api_tokens", "rate_counters"}


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield Settings(database_url=f"sqlite:///{tmp_path / 'm.db'}").database_url
        return
    with fresh_pg_database("gradsentry_mig") as url:
        yield Settings(database_url=url).database_url


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_to_head_then_downgrade_to_base(empty_database: str) -> None:
    assert _tables(empty_database) == set()
    upgrade(empty_database)
    assert _tables(empty_database) == TABLES | {"alembic_version"}

    engine = make_engine(empty_database)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations disagree: {diff}"

    downgrade(empty_database, "base")
    assert _tables(empty_database) <= {"alembic_version"}
    upgrade(empty_database)  # and back up again, cleanly
    assert _tables(empty_database) >= TABLES


def test_migrate_command_up_and_down(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    up = subprocess.run([sys.executable, "-m", "server.cli", "migrate", "--database-url", url],
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    assert _tables(url) >= TABLES
    down = subprocess.run([sys.executable, "-m", "server.cli", "migrate", "base", "--downgrade",
                           "--database-url", url], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert _tables(url) <= {"alembic_version"}
