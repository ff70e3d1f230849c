"""One place for configuration: a pydantic-settings class read through a cached getter.

Environment variables use the prefix BITSERVE_ (BITSERVE_HOME, BITSERVE_PORT, ...); the
database and broker URLs also answer to the conventional names DATABASE_URL,
CELERY_BROKER_URL and REDIS_URL. Paths left unset are placed under `home`, so one directory
holds everything an embedded (single-machine) deployment writes.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bitcore.checkpoint_digests import normalise_pins

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
    # Secrets from files (Docker / Kubernetes secrets, docker-compose.yml): the password is put
    # into the URL above when the settings load, so it never sits in the environment or in the
    # compose file. The file's trailing newline is dropped.
    database_password_file: Path | None = None
    broker_password_file: Path | None = None
    api_key_pepper_file: Path | None = None
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
    # Checkpoint integrity (docs/security.md, "Checkpoints"): known SHA-256 digests by catalog
    # name (JSON in the environment), plain-http mirrors refused unless allowed, a download cap
    # above the largest official file (BiT-M-R152x4, 4.1 GiB).
    checkpoint_sha256: dict[str, str] = Field(default_factory=dict)
    allow_insecure_mirror: bool = False
    checkpoint_max_bytes: int = Field(default=6 * GIB, gt=0)

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
    # How old a gateway's view of a deployment may get: a change made through another replica
    # is served here within this (plus the new models' load time here). One indexed read per
    # deployment per interval.
    deployment_refresh_seconds: float = Field(default=2.0, ge=0)
    # How often a gateway adds its deployment figures (service.deployment_stats) to the rows.
    deployment_stats_flush_seconds: float = Field(default=5.0, gt=0)
    # Where the forward runs (bitcore.runtimes): PyTorch eager, or ONNX Runtime or OpenVINO on
    # the exported graph, checked against eager at load. Default from benchmarks/RESULTS.md,
    # "Inference runtimes (issue 13)": ONNX Runtime beats eager; OpenVINO measured level with it
    # on BiT-M-R50x1 (0.98x-1.17x over five runs, 1.00x-1.01x in the longest) and slower on
    # small models, on 2 AVX2 cores, so it is selectable but not the default.
    predict_runtime: Literal["torch", "onnxruntime", "openvino"] = "onnxruntime"
    # Serve a model's int8 graph where its job asked for int8 and the guard passed
    # (bitcore.quantize); False serves every model in float32. Never with runtime "torch".
    predict_int8: bool = True
    # Decode JPEGs at 1/2-1/8 scale (>= 2 x crop) before the resize: faster for large photos,
    # slightly different scores. Off: benchmarks/RESULTS.md, "Image decoding (issue 13)".
    predict_jpeg_draft: bool = False
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
    # Files per shard of a batch prediction (worker.batch_predict): each shard is written and
    # published on its own, so a worker that dies loses at most one shard's work.
    batch_shard_size: int = Field(default=64, gt=0)
    # Above the longest training job: Redis redelivers unacked late-ack tasks after this.
    broker_visibility_timeout: int = Field(default=7 * 24 * 3600, gt=0)
    # Job cost limits (docs/security.md, "Limits"): a job whose estimate (bitcore.costs) is
    # past one is refused before it is queued (422 job_too_expensive).
    # One micro-batch's training memory: the largest common accelerator (80 GB); set it to
    # the workers' own device memory.
    job_max_memory_bytes: int = Field(default=80 * GIB, gt=0)
    # The dataset's decode-once cache at the job's precrop: 100k images (the archive entry
    # limit) at the rule's largest precrop (512 px) are 73 GiB.
    job_max_cache_bytes: int = Field(default=100 * GIB, gt=0)
    # steps x batch_size: 5x the rule's largest schedule (20k steps x 512 = 10.24M images).
    job_max_images: int = Field(default=50_000_000, gt=0)
    # Wall clock from a job's first start: the worker stops it past this (time_limit_exceeded).
    # 3 days: the rule's largest schedule on a large model at about 100 images/s is ~28 h;
    # below broker_visibility_timeout, so no running job is ever redelivered as a lost one.
    job_max_seconds: float = Field(default=3 * 24 * 3600, gt=0)

    device: str | None = None
    # The CPUs thread pools are sized for (bitcore.cpus): unset, min(affinity, cgroup quota).
    # bitcore reads the same BITSERVE_CPUS itself (workers, ONNX Runtime, data loading); this
    # field validates it at start-up.
    cpus: int | None = Field(default=None, ge=1)
    train_queue: str = "train"
    # Dataset ingestion (service.ingest_runs, worker.ingest): `bitserve worker` consumes both
    # queues unless --queues says otherwise.
    ingest_queue: str = "ingest"
    # Buckets (or bucket/prefix) a dataset may be registered from with {"source": "s3://..."}
    # (service.dataset_sources); empty: none, uploads only. JSON list in the environment.
    dataset_source_buckets: list[str] = Field(default_factory=list)
    worker_concurrency: int = Field(default=1, gt=0)

    # Faults (docs/operations.md, "Database loss" and "Stopping and rolling restarts").
    # The longest a request waits to connect to PostgreSQL, and again for a pooled connection,
    # before it is answered 503 database_unavailable.
    db_timeout_seconds: float = Field(default=5.0, gt=0)
    # SIGTERM: requests in flight get this long to finish (new ones are answered 503).
    shutdown_grace_seconds: float = Field(default=30.0, gt=0)

    # Uploads and bodies (issue 11; docs/security.md "Limits").
    # A whole archive (zip or tar.gz) that expands past this is held to max_compression_ratio.
    archive_ratio_min_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    # An upload is refused (507) unless the store keeps this much free beyond its body.
    upload_free_disk_margin_bytes: int = Field(default=1 * GIB, ge=0)
    # Uploads received or unpacked at once, per gateway process: 503 + Retry-After past it.
    max_concurrent_uploads: int = Field(default=4, gt=0)
    # Every body but an upload's or a predict's (those have their own caps): 413 past it.
    max_json_body_bytes: int = Field(default=1024 * 1024, gt=0)
    # Predict requests admitted at once per process, and their declared body bytes together
    # (a body without Content-Length counts as predict_max_request_bytes): 503 past either,
    # before a byte of the body is read.
    predict_max_concurrent_requests: int = Field(default=32, gt=0)
    predict_max_inflight_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    # Below max_image_pixels: a predict image is decoded on the request path.
    predict_max_image_pixels: int = Field(default=16_000_000, gt=0)

    # Browsers (service.web_security, docs/security.md). Host names the API answers to besides
    # the loopback names and `host` ("*": any); origins (scheme://host[:port]) whose pages may
    # send state-changing requests besides the API's own. Comma-separated in the environment.
    allowed_hosts: Annotated[list[str], NoDecode] = []
    allowed_origins: Annotated[list[str], NoDecode] = []
    # Log lines (service.log_format): one JSON object per line, or text for a terminal. Unset:
    # json for `bitserve api` and `bitserve worker`, text for `bitserve up`.
    log_format: Literal["json", "text"] | None = None

    @field_validator("allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # "a.example,b.example" in the environment; a JSON list is accepted too.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

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

    # Object storage (issue 12; service.object_store, docs/operations.md "Object storage").
    # Unset or file:///path: the local artifact root is the store. s3://bucket/prefix: the
    # bucket holds datasets and models, and artifact_root is this node's cache of it; boto3
    # reads AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION.
    storage_url: str | None = None
    # With an s3:// store: the local cache's cap (least recently used folders go first; one
    # used within the last 10 minutes stays). Unset: no cap. Ignored for the local store.
    cache_max_bytes: int | None = Field(default=None, gt=0)
    # The sweep of orphaned objects (service.sweep): every worker's reconciler runs it this often
    # (0: never; `bitserve storage sweep` runs it by hand). Off by default: it deletes whatever
    # the database it is pointed at has no row for, so a worker given the wrong database next to
    # the right bucket must not empty the bucket unless an operator turned this on.
    sweep_interval_seconds: float = Field(default=0.0, ge=0)
    # Only folders (and uploads) untouched this long are swept: longer than any publish or
    # ingestion takes, since a folder being published has no row yet.
    sweep_min_age_seconds: float = Field(default=3600.0, gt=0)

    @field_validator("storage_url")
    @classmethod
    def _storage_scheme(cls, value: str | None) -> str | None:
        if value and not value.startswith(("file://", "s3://")):
            raise ValueError(f"storage_url {value!r}: use s3://bucket/prefix or file:///path")
        if value and value.startswith("s3://") and not urlsplit(value).netloc:
            raise ValueError(f"storage_url {value!r} names no bucket")
        return value or None

    @model_validator(mode="after")
    def _file_storage_root(self) -> Settings:
        # file:///path is the artifact root itself (unless artifact_root was given too).
        if self.storage_url and self.storage_url.startswith("file://"):
            path = Path(urlsplit(self.storage_url).path).expanduser().resolve()
            if "artifact_root" in self.model_fields_set and path != self.artifact_root:
                raise ValueError(
                    f"storage_url {self.storage_url!r} and artifact_root {self.artifact_root} "
                    "name different directories: set one of them"
                )
            self.artifact_root = path
        return self

    @field_validator("home", "checkpoint_dir", "artifact_root")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("checkpoint_sha256")
    @classmethod
    def _hex_digests(cls, value: dict[str, str]) -> dict[str, str]:
        return normalise_pins(value)

    @property
    def pepper(self) -> bytes | None:
        return self.api_key_pepper.get_secret_value().encode() if self.api_key_pepper else None

    @model_validator(mode="after")
    def _secrets_from_files(self) -> Settings:
        if self.database_password_file is not None:
            secret = _read_secret(self.database_password_file)
            self.database_url = _with_password(self.database_url, secret)
        if self.broker_password_file is not None:
            secret = _read_secret(self.broker_password_file)
            self.broker_url = _with_password(self.broker_url, secret)
        if self.api_key_pepper_file is not None:
            self.api_key_pepper = SecretStr(_read_secret(self.api_key_pepper_file))
        return self

    @model_validator(mode="after")
    def _https_mirror(self) -> Settings:
        # Refused at start-up rather than at the first job's download.
        url = self.checkpoint_base_url or ""
        if url.lower().startswith("http://") and not self.allow_insecure_mirror:
            raise ValueError(
                f"checkpoint_base_url {url!r} is plain http: use https, or set "
                "BITSERVE_ALLOW_INSECURE_MIRROR=1 to allow an unencrypted mirror you trust"
            )
        return self

    @model_validator(mode="after")
    def _migrate_default(self) -> Settings:
        if self.auto_migrate is None:
            self.auto_migrate = self.database_url.startswith("sqlite")
        return self


def _read_secret(path: Path) -> str:
    secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    if not secret:
        raise ValueError(f"the secret file {path} is empty")
    return secret


def _with_password(url: str, password: str) -> str:
    """`url` with `password` (percent-encoded) in place of any password it had:
    postgresql+psycopg://bitserve@postgres/db -> postgresql+psycopg://bitserve:PW@postgres/db."""
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    if not hostport:
        raise ValueError(f"{parts.scheme}:// URL has no host to authenticate to")
    user = userinfo.partition(":")[0]
    netloc = f"{user}:{quote(password, safe='')}@{hostport}"
    return urlunsplit(parts._replace(netloc=netloc))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings from the environment; tests build Settings(...) instead."""
    return Settings()
