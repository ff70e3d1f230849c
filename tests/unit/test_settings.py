"""Settings: environment variables, the conventional aliases, defaults placed under home."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import GIB, Settings, get_settings

ENV_NAMES = (
    "BITSERVE_HOME",
    "BITSERVE_PORT",
    "BITSERVE_DATABASE_URL",
    "DATABASE_URL",
    "BITSERVE_BROKER_URL",
    "CELERY_BROKER_URL",
    "REDIS_URL",
    "BITSERVE_CHECKPOINT_DIR",
    "BITSERVE_ARTIFACT_ROOT",
    "BITSERVE_MAX_UPLOAD_BYTES",
    "BITSERVE_DEVICE",
    "BITSERVE_AUTO_MIGRATE",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()


def test_defaults_live_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITSERVE_HOME", str(tmp_path / "h"))
    s = Settings()
    home = (tmp_path / "h").resolve()
    assert s.home == home
    assert s.database_url == f"sqlite:///{home}/bitserve.db"
    assert s.broker_url == f"sqla+sqlite:///{home}/broker.db"
    assert s.checkpoint_dir == home / "checkpoints"
    assert s.artifact_root == home / "store"
    assert s.auto_migrate is True  # embedded SQLite migrates itself
    assert (s.host, s.port, s.device, s.train_queue) == ("127.0.0.1", 8000, None, "train")
    assert s.max_upload_bytes == 2 * GIB and s.max_uncompressed_bytes == 8 * GIB
    assert (s.max_archive_entries, s.max_compression_ratio, s.min_images_per_class) == (
        100_000,
        200.0,
        2,
    )
    assert s.broker_visibility_timeout == 7 * 24 * 3600


def test_relative_home_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.home == tmp_path.resolve() / ".bitserve"
    assert s.database_url == f"sqlite:///{tmp_path.resolve()}/.bitserve/bitserve.db"


def test_prefixed_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITSERVE_PORT", "9123")
    monkeypatch.setenv("BITSERVE_DATABASE_URL", "postgresql://u@db/bitserve")
    monkeypatch.setenv("BITSERVE_BROKER_URL", "redis://broker:6379/1")
    monkeypatch.setenv("BITSERVE_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("BITSERVE_MAX_UPLOAD_BYTES", "1000")
    monkeypatch.setenv("BITSERVE_DEVICE", "cpu")
    s = Settings()
    assert s.port == 9123
    assert s.database_url == "postgresql://u@db/bitserve"
    assert s.broker_url == "redis://broker:6379/1"
    assert s.checkpoint_dir == (tmp_path / "ckpt").resolve()
    assert s.max_upload_bytes == 1000 and s.device == "cpu"
    assert s.auto_migrate is False  # a shared PostgreSQL is migrated explicitly


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        ("DATABASE_URL", "database_url", "postgresql://a@b/c"),
        ("CELERY_BROKER_URL", "broker_url", "redis://r:6379/2"),
        ("REDIS_URL", "broker_url", "redis://r:6379/3"),
    ],
)
def test_conventional_aliases(
    monkeypatch: pytest.MonkeyPatch, name: str, field: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    assert getattr(Settings(), field) == value


def test_explicit_values_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://env@db/x")
    s = Settings(database_url="sqlite:///explicit.db", auto_migrate=False)
    assert s.database_url == "sqlite:///explicit.db" and s.auto_migrate is False


def test_get_settings_is_cached_and_reads_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITSERVE_HOME", str(tmp_path))
    first = get_settings()
    assert first is get_settings()
    assert first.home == tmp_path.resolve()
    get_settings.cache_clear()


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_upload_bytes", 0), ("max_compression_ratio", 1), ("port", "eighty")],
)
def test_bad_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        Settings(**{field: value})  # type: ignore[arg-type]


def test_checkpoint_integrity_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11: pinned digests from the environment, http mirrors only when allowed, a cap."""
    from bitcore import catalog

    digest = "AB" * 32
    monkeypatch.setenv("BITSERVE_CHECKPOINT_SHA256", f'{{"BiT-M-R50x1": "{digest}"}}')
    settings = Settings(home=tmp_path)
    assert settings.checkpoint_sha256 == {"BiT-M-R50x1": digest.lower()}
    assert settings.checkpoint_max_bytes == catalog.DEFAULT_MAX_BYTES
    assert settings.allow_insecure_mirror is False
    monkeypatch.setenv("BITSERVE_CHECKPOINT_SHA256", '{"BiT-M-R50x1": "not-a-digest"}')
    with pytest.raises(ValueError, match="the digest of BiT-M-R50x1 is not 64 hex digits"):
        Settings(home=tmp_path)
    monkeypatch.delenv("BITSERVE_CHECKPOINT_SHA256")
    with pytest.raises(ValueError, match="is plain http: use https, or set BITSERVE_ALLOW_INSEC"):
        Settings(home=tmp_path, checkpoint_base_url="http://mirror.internal/bit")
    monkeypatch.setenv("BITSERVE_ALLOW_INSECURE_MIRROR", "true")
    allowed = Settings(home=tmp_path, checkpoint_base_url="http://mirror.internal/bit")
    assert allowed.allow_insecure_mirror is True


@pytest.mark.parametrize("value", ["torch", "onnxruntime", "openvino"])
def test_predict_runtime_accepts_every_runtime(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from bitcore.runtimes import RUNTIMES

    monkeypatch.setenv("BITSERVE_PREDICT_RUNTIME", value)
    assert Settings().predict_runtime == value
    assert value in RUNTIMES  # the setting's choices are the runtimes bitcore knows


def test_predict_runtime_setting_lists_exactly_the_runtimes_and_refuses_others() -> None:
    from typing import get_args

    from bitcore.runtimes import RUNTIMES

    annotation = Settings.model_fields["predict_runtime"].annotation
    assert set(get_args(annotation)) == set(RUNTIMES)
    with pytest.raises(ValidationError, match="'torch', 'onnxruntime' or 'openvino'"):
        Settings(predict_runtime="tensorrt")  # type: ignore[arg-type]
