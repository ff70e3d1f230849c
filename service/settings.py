"""One place for configuration: a pydantic-settings class read through a cached getter.

Environment variables use the prefix BITSERVE_ (BITSERVE_HOME, BITSERVE_PORT, ...); the
database and broker URLs also answer to the conventional names DATABASE_URL,
CELERY_BROKER_URL and REDIS_URL. Paths left unset are placed under `home`, so one directory
holds everything an embedded (single-machine) deployment writes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1 << 30


def _env(name: str, *aliases: str) -> Any:
    # A validation_alias replaces the prefixed env name, so list it explicitly; the field name
    # itself stays accepted for Settings(field=...) in code and tests.
    return AliasChoices(name, f"BITSERVE_{name.upper()}", *aliases)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BITSERVE_", extra="ignore", populate_by_name=True, validate_default=True
    )

    home: Path = Path(".bitserve")
    host: str = "127.0.0.1"
    port: int = 8000

    # Defaults computed from the (already validated) home: data["home"] is absolute.
    database_url: str = Field(
        default_factory=lambda data: f"sqlite:///{data['home'] / 'bitserve.db'}",
        validation_alias=_env("database_url", "DATABASE_URL"),
    )
    broker_url: str = Field(
        default_factory=lambda data: f"sqla+sqlite:///{data['home'] / 'broker.db'}",
        validation_alias=_env("broker_url", "CELERY_BROKER_URL", "REDIS_URL"),
    )
    checkpoint_dir: Path = Field(default_factory=lambda data: data["home"] / "checkpoints")
    artifact_root: Path = Field(default_factory=lambda data: data["home"] / "store")
    # None: migrate on start-up for the embedded SQLite set-up only; a shared PostgreSQL is
    # migrated explicitly (`bitserve migrate`) so several gateways never race on it.
    auto_migrate: bool | None = None

    # API keys (docs/security.md). "off" is refused unless the API listens on loopback only.
    auth: Literal["required", "off"] = "required"
    api_key_pepper: SecretStr | None = None
    # Quotas per tenant (an admin may set others per tenant: PUT /v1/tenants/{id}/quotas).
    tenant_max_active_jobs: int = Field(default=4, gt=0)
    tenant_max_stored_bytes: int = Field(default=100 * GIB, gt=0)
    # Per API key, per gateway process (a token bucket in memory): N replicas allow N times it.
    predict_rate_per_second: float = Field(default=50.0, gt=0)
    predict_burst: int = Field(default=100, gt=0)

    allow_downloads: bool = True
    checkpoint_base_url: str | None = None

    max_upload_bytes: int = Field(default=2 * GIB, gt=0)
    max_archive_entries: int = Field(default=100_000, gt=0)
    max_uncompressed_bytes: int = Field(default=8 * GIB, gt=0)
    max_compression_ratio: float = Field(default=200.0, gt=1)
    max_image_pixels: int = Field(default=64_000_000, gt=0)
    min_images_per_class: int = Field(default=2, ge=1)

    predict_max_batch_size: int = Field(default=32, gt=0)
    predict_max_queue: int = Field(default=256, gt=0)
    # 0: never hold a lone request back (Triton's default); images that arrive while a forward
    # runs are batched into the next one anyway. benchmarks/RESULTS.md measured 2 ms as no
    # better under load and 15% worse at one request in flight.
    predict_max_queue_delay_ms: float = Field(default=0.0, ge=0)
    model_cache_size: int = Field(default=4, gt=0)
    predict_max_images_per_request: int = Field(default=64, gt=0)
    # A predict request body (all its images, multipart or base64 JSON): 413 past it.
    predict_max_request_bytes: int = Field(default=64 * 1024 * 1024, gt=0)

    job_max_attempts: int = Field(default=3, gt=0)
    job_heartbeat_seconds: float = Field(default=5.0, gt=0)
    job_stale_after_seconds: float = Field(default=60.0, gt=0)
    job_progress_interval_seconds: float = Field(default=1.0, ge=0)
    reconcile_interval_seconds: float = Field(default=30.0, gt=0)
    # A queued job whose message was sent this long ago is sent again (the broker may have
    # lost it, e.g. Redis restarted without persistence); duplicates are refused by the claim.
    job_resend_after_seconds: float = Field(default=600.0, gt=0)
    # Above the longest training job: Redis redelivers unacked late-ack tasks after this.
    broker_visibility_timeout: int = Field(default=7 * 24 * 3600, gt=0)

    device: str | None = None
    train_queue: str = "train"
    worker_concurrency: int = Field(default=1, gt=0)

    # Faults (docs/operations.md, "Database loss" and "Stopping and rolling restarts").
    # The longest a request waits to connect to PostgreSQL, and again for a pooled connection,
    # before it is answered 503 database_unavailable.
    db_timeout_seconds: float = Field(default=5.0, gt=0)
    # SIGTERM: requests in flight get this long to finish (new ones are answered 503).
    shutdown_grace_seconds: float = Field(default=30.0, gt=0)

    # Connections (service.connections; docs/security.md "Limits"). Past max_connections open
    # connections, requests are answered 503 too_many_connections (/healthz still answers).
    max_connections: int = Field(default=4096, gt=0)
    # The request line and headers must arrive within this, else 408 and the connection closes.
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    # No wait for the body may last longer; past it the body must average the rate below.
    body_idle_timeout_seconds: float = Field(default=15.0, gt=0)
    body_min_bytes_per_second: float = Field(default=1024.0, gt=0)
    # An idle kept-alive connection is closed after this long.
    keep_alive_seconds: int = Field(default=5, gt=0)
    # Job event streams (service.job_events): one database read per interval for all of them;
    # at most max_streams_per_key open per API key (429 too_many_streams), each ended after
    # stream_max_seconds with a `reconnect` event.
    events_poll_seconds: float = Field(default=0.5, gt=0)
    max_streams_per_key: int = Field(default=20, gt=0)
    stream_max_seconds: float = Field(default=3600.0, gt=0)

    @field_validator("home", "checkpoint_dir", "artifact_root")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def pepper(self) -> bytes | None:
        return self.api_key_pepper.get_secret_value().encode() if self.api_key_pepper else None

    @model_validator(mode="after")
    def _migrate_default(self) -> Settings:
        if self.auto_migrate is None:
            self.auto_migrate = self.database_url.startswith("sqlite")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings from the environment; tests build Settings(...) instead."""
    return Settings()
