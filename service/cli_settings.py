"""`bitserve`'s settings at start-up: read them, or say in one line which variable or path is
wrong and what it expects (no traceback)."""

from __future__ import annotations

import os

from bitcore.atomic import make_private_dir
from service.settings import Settings, get_settings


class StartupError(Exception):
    """Settings or BITSERVE_HOME cannot be used: one line naming the variable or path."""


def load_settings() -> Settings:
    """The settings, or StartupError naming the variable that is wrong and what it expects
    (pydantic's follow-on errors, e.g. defaults that could not be computed, left out)."""
    from pydantic import ValidationError

    try:
        return get_settings()
    except ValidationError as exc:
        real = [e for e in exc.errors() if e["type"] != "default_factory_not_called"]
        described = []
        for error in real or exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            shown = repr(error.get("input")) if "input" in error else "its value"
            message = str(error["msg"])
            described.append(
                f"{env_name(field)}={shown} is not valid: {message[:1].lower()}{message[1:]}"
            )
        raise StartupError("; ".join(described)) from None


def env_name(field: str) -> str:
    """The environment variable a Settings field is read from."""
    alias = (
        Settings.model_fields[field].validation_alias if field in Settings.model_fields else None
    )
    choices = getattr(alias, "choices", None)
    if choices:  # AliasChoices(name, BITSERVE_NAME, *other names): the prefixed one
        return str(choices[1])
    return f"BITSERVE_{field.upper()}" if field else "a BITSERVE_ setting"


def check_home(settings: Settings) -> None:
    """BITSERVE_HOME must be (or become) a writable directory: refused here in one line rather
    than as SQLite's "unable to open database file" after a page of traceback."""
    home = settings.home
    try:
        make_private_dir(home)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise StartupError(
            f"BITSERVE_HOME={home} cannot be used ({reason.lower()}); set BITSERVE_HOME to a "
            "writable directory"
        ) from None
    if not home.is_dir() or not os.access(home, os.W_OK | os.X_OK):
        raise StartupError(
            f"BITSERVE_HOME={home} is not a writable directory; set BITSERVE_HOME to one"
        )
