"""Alembic environment and versions: the only way the schema changes."""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).parent
