"""Settings: one table of environment variables, their defaults and what they mean.

The README's settings table is checked against SETTINGS by a test, so a setting cannot be
added here without being documented there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web


class SettingError(ValueError):
    """A setting's value cannot be used; the message names the variable."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError("must be one of debug, info, warning, error, critical")
    return level


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("json", "text"):
        raise ValueError("must be json or text")
    return value


@dataclass(frozen=True)
class Setting:
    field: str
    env: str
    default: str | None
    parse: Callable[[str], Any]
    help: str


# The Scalar release the /openapi page loads by default; tests/test_openapi.py renders the page
# in Chromium with this same release, so the default is the version that was tried.
SCALAR_VERSION = "1.46.4"

SETTINGS: tuple[Setting, ...] = (
    Setting("host", "PREREC_HOST", "0.0.0.0", str, "Address to listen on."),
    Setting("port", "PREREC_PORT", "10600", _port, "Port to listen on."),
    Setting(
        "database_url",
        "PREREC_DATABASE_URL",
        None,
        str,
        "PostgreSQL URL (`postgresql://user:pass@host/db`); unset starts an embedded PostgreSQL "
        "under `$PREREC_DATA_DIR/postgres`.",
    ),
    Setting(
        "data_dir", "PREREC_DATA_DIR", "./data", Path, "Folder for the embedded database and, by default, the blobs."
    ),
    Setting(
        "storage_dir",
        "PREREC_STORAGE_DIR",
        None,
        Path,
        "Folder holding the audio files (default `$PREREC_DATA_DIR/blobs`); may be shared by replicas.",
    ),
    Setting(
        "max_upload_bytes",
        "PREREC_MAX_UPLOAD_BYTES",
        str(2 * 1024**3),
        _positive_int,
        "Largest accepted upload in bytes (default 2 GiB); larger ones get 413.",
    ),
    Setting(
        "sse_ping_seconds",
        "PREREC_SSE_PING_SECONDS",
        "15",
        _positive_float,
        "Interval of the keep-alive comment on `/sse` streams.",
    ),
    Setting(
        "tmp_max_age_seconds",
        "PREREC_TMP_MAX_AGE_SECONDS",
        "3600",
        _positive_float,
        "Temporary upload files untouched this long are taken as left by a crash and removed; replaced "
        "blobs are kept this long for downloads still reading them.",
    ),
    Setting(
        "db_timeout_seconds",
        "PREREC_DB_TIMEOUT_SECONDS",
        "5",
        _positive_float,
        "Longest wait for the database in a request; past it the answer is 503 with `Retry-After`.",
    ),
    Setting(
        "read_timeout_seconds",
        "PREREC_READ_TIMEOUT_SECONDS",
        "60",
        _positive_float,
        "An upload whose body stalls this long is cut off with 408 and its temporary file removed.",
    ),
    Setting(
        "events_retention_seconds",
        "PREREC_EVENTS_RETENTION_SECONDS",
        "86400",
        _positive_float,
        "How long the event log keeps events for `/sse` resumption (`Last-Event-ID`).",
    ),
    Setting(
        "shutdown_timeout_seconds",
        "PREREC_SHUTDOWN_TIMEOUT_SECONDS",
        "25",
        _positive_float,
        "On SIGTERM, how long uploads in flight may take to finish before the process exits.",
    ),
    Setting(
        "workers",
        "PREREC_WORKERS",
        "1",
        _positive_int,
        "Worker processes per replica, sharing the port (SO_REUSEPORT), each with its own pool and listener.",
    ),
    Setting(
        "write_token",
        "PREREC_WRITE_TOKEN",
        None,
        str,
        "When set, PUT and DELETE need `Authorization: Bearer <token>` (else 401); reads stay open.",
    ),
    Setting("log_format", "PREREC_LOG_FORMAT", "json", _log_format, "`json` (one object per line) or `text`."),
    Setting("log_level", "PREREC_LOG_LEVEL", "info", _log_level, "Logging level: debug, info, warning, error."),
    Setting(
        "scalar_js_url",
        "PREREC_SCALAR_JS_URL",
        f"https://cdn.jsdelivr.net/npm/@scalar/api-reference@{SCALAR_VERSION}/dist/browser/standalone.js",
        str,
        "Where the `/openapi` page loads the Scalar script from (a pinned release, the one the tests render).",
    ),
)


@dataclass(frozen=True)
class Settings:
    """The service's settings; `from_env` fills them from SETTINGS, the one home of the defaults."""

    host: str
    port: int
    database_url: str | None
    data_dir: Path
    storage_dir: Path | None
    max_upload_bytes: int
    sse_ping_seconds: float
    tmp_max_age_seconds: float
    db_timeout_seconds: float
    read_timeout_seconds: float
    events_retention_seconds: float
    shutdown_timeout_seconds: float
    workers: int
    write_token: str | None
    log_format: str
    log_level: str
    scalar_js_url: str

    @property
    def blob_dir(self) -> Path:
        return self.storage_dir if self.storage_dir is not None else self.data_dir / "blobs"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            # An empty variable counts as unset, as shells and compose files often leave them.
            raw = environ.get(setting.env) or setting.default
            if raw is None:
                values[setting.field] = None
                continue
            try:
                values[setting.field] = setting.parse(raw)
            except ValueError as error:
                raise SettingError(f"{setting.env}={raw!r} is not valid: {error}") from None
        return cls(**values)


SETTINGS_KEY = web.AppKey("settings", Settings)
