"""Collector settings, read from the environment (prefix ``GRADSENTRY_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_database_url() -> str:
    """The embedded default: an SQLite file in the per-user data directory."""
    data_dir = Path(platformdirs.user_data_dir("gradsentry"))
    return f"sqlite:///{data_dir / 'gradsentry.db'}"


class Settings(BaseSettings):
    """Everything the collector can be told; tests pass their own instance."""

    model_config = SettingsConfigDict(env_prefix="GRADSENTRY_", extra="ignore")

    database_url: str = Field(default_factory=default_database_url)
    # Access control (README "Access control"). auto: API tokens are required unless the
    # collector is bound to a loopback address; `gradsentry serve` resolves it from --host.
    auth: Literal["auto", "required", "off"] = "auto"
    # Requests per token per fixed window, shared by every collector process on the database
    # (429 with Retry-After above it); 0 turns the limit off. Open mode has no rate limit.
    rate_limit_requests: int = Field(default=20_000, ge=0)
    rate_limit_window_s: int = Field(default=10, ge=1, le=3600)
    # Limits on one request; each is answered with a 4xx naming the limit.
    max_body_bytes: int = 64 * 1024 * 1024  # any request; ingest: also after gzip decompression
    max_steps_per_batch: int = 10_000
    max_layers_per_run: int = 100_000
    max_scalars_per_step: int = 1_000  # extra named scalars of one step (and of its window)
    # Reads.
    default_max_points: int = 1000
    max_max_points: int = 100_000
    # /metrics: per-run gauges only for runs that sent a step within this window (bounded).
    metrics_active_window_s: float = 900.0
    metrics_max_runs: int = 500
    # Alerts (README "Alerts"). Detection runs on ingest; delivery in a background thread.
    alerts_enabled: bool = True
    alert_rules_file: Path | None = None  # YAML: rules, per-project rules, receivers
    alert_poll_interval_s: float = 0.1  # outbox polling of the delivery worker
    alert_retry_base_s: float = 0.5  # backoff: base * 2**attempts, capped
    alert_retry_max_s: float = 60.0
    alert_give_up_s: float = 86_400.0  # a notification older than this stops retrying
    alert_repeat_interval_s: float = 14_400.0  # re-notify a firing, unacknowledged alert
    alert_scheduler_interval_s: float = 5.0  # stalled-run and repeat checks
    alert_forensics_steps: int = 20  # steps before and after an alert in its forensics
    alert_external_url: str = "http://127.0.0.1:8000"  # links in notifications

    @field_validator("database_url")
    @classmethod
    def _known_backend(cls, url: str) -> str:
        if not url.startswith(("sqlite", "postgresql")):
            raise ValueError(f"unsupported database URL {url!r}: use sqlite:/// or postgresql://")
        if url.startswith("postgresql://"):
            # psycopg 3 is the driver we ship; plain postgresql:// would ask for psycopg2.
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        return url

    @field_validator("alert_rules_file")
    @classmethod
    def _rules_file_loads(cls, path: Path | None) -> Path | None:
        if path is not None:
            from server.alerts.config import load_config

            load_config(path)  # fail fast on a missing or malformed file
        return path
