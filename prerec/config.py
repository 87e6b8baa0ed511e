"""Settings: one table of environment variables, their defaults and what they mean.

The help texts are the documentation: the README's settings table is generated from SETTINGS
(`python -m prerec settings --readme README.md`), and a test fails when it is stale.
"""

from __future__ import annotations

import os
import re
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


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be zero or a positive integer")
    return value


def _presigned_seconds(text: str) -> int:
    value = _non_negative_int(text)
    if value > 604800:  # S3's own bound on a SigV4 presigned URL's life
        raise ValueError("must be at most 604800 (7 days, the longest a presigned URL may live)")
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


# scheme://host[:port] as a browser writes an Origin header: a DNS name or an IP literal (a
# non-ASCII name in its punycode form), no user, path, query or trailing slash.
_ORIGIN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://"
    r"(?P<host>\[[0-9a-f:.]+\]|[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*)"
    r"(?::(?P<port>[0-9]{1,5}))?",
    re.IGNORECASE,
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _cors_origins(text: str) -> frozenset[str]:
    """`*`, or origins separated by commas, each written as browsers send it in `Origin`.

    Browsers lower-case the scheme and host and leave out a default port, so those are
    normalised here: the comparison with the header is then exact.
    """
    items = [item.strip() for item in text.split(",")]
    if items == ["*"]:
        return frozenset(items)
    origins = set()
    for item in items:
        if item == "*":
            raise ValueError("`*` allows every origin, so it cannot be listed with others")
        if not item:
            raise ValueError("has an empty item (two commas in a row, or one at an end)")
        match = _ORIGIN.fullmatch(item)
        if match is None:
            raise ValueError(f"{item!r} is not an origin: write scheme://host[:port], without a path or a trailing '/'")
        scheme, host = match.group("scheme").lower(), match.group("host").lower()
        port = int(match.group("port")) if match.group("port") else None
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"{item!r} has a port outside 1-65535")
        origins.add(f"{scheme}://{host}" if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{scheme}://{host}:{port}")
    return frozenset(origins)


@dataclass(frozen=True)
class BucketUrl:
    bucket: str
    prefix: str  # "" or ending in "/"


# S3's bucket naming rules (the strictest common to AWS, MinIO, Ceph and SeaweedFS).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _bucket_url(text: str) -> BucketUrl:
    scheme, _, rest = text.strip().partition("://")
    if scheme != "s3" or not rest:
        raise ValueError("must be s3://bucket or s3://bucket/prefix")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"{bucket!r} is not a bucket name (3-63 characters: a-z, 0-9, '.', '-')")
    prefix = prefix.strip("/")
    return BucketUrl(bucket, f"{prefix}/" if prefix else "")


def _http_url(text: str) -> str:
    url = text.strip().rstrip("/")
    if not re.fullmatch(r"https?://[^/\s]+(/[^\s]*)?", url):
        raise ValueError("must be an http:// or https:// URL")
    return url


def _addressing_style(text: str) -> str:
    value = text.strip().lower()
    if value not in ("auto", "path", "virtual"):
        raise ValueError("must be auto, path or virtual")
    return value


@dataclass(frozen=True)
class Setting:
    field: str
    env: str
    default: str | None
    parse: Callable[[str], Any]
    help: str
    # The default as documented, where the raw value alone does not say it (None: unset).
    shown_default: str | None = None


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
        "`postgresql://user:pass@host/db`; unset starts an embedded PostgreSQL under `$PREREC_DATA_DIR/postgres`.",
        "unset → embedded PostgreSQL",
    ),
    Setting(
        "data_dir", "PREREC_DATA_DIR", "./data", Path, "Folder for the embedded database and, by default, the blobs."
    ),
    Setting(
        "storage_dir",
        "PREREC_STORAGE_DIR",
        None,
        Path,
        "Folder holding the audio files; may be shared by replicas.",
        "`$PREREC_DATA_DIR/blobs`",
    ),
    Setting(
        "max_upload_bytes",
        "PREREC_MAX_UPLOAD_BYTES",
        str(2 * 1024**3),
        _positive_int,
        "Largest accepted upload in bytes; larger ones get 413.",
        "`2147483648` (2 GiB)",
    ),
    Setting(
        "sse_ping_seconds",
        "PREREC_SSE_PING_SECONDS",
        "15",
        _positive_float,
        "Interval of the keep-alive comment on `/sse`.",
    ),
    Setting(
        "tmp_max_age_seconds",
        "PREREC_TMP_MAX_AGE_SECONDS",
        "3600",
        _positive_float,
        "Temporary upload files untouched this long are taken as left by a crash and removed (an upload "
        "in progress touches its file every tenth of this, at most every minute); replaced blobs are kept "
        "this long for downloads still reading them (on NFS an unlink would cut them), and blobs no row points "
        "at are retired once this old.",
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
        "An upload whose body stalls this long (or, averaged over this long, arrives slower than "
        "`PREREC_MIN_UPLOAD_RATE_BYTES`) is cut off with 408 and its temporary file removed.",
    ),
    Setting(
        "events_retention_seconds",
        "PREREC_EVENTS_RETENTION_SECONDS",
        "86400",
        _positive_float,
        "How long the event log keeps events for `/sse` resumption; a `Last-Event-ID` older than that "
        "replays what is kept.",
        "`86400` (one day)",
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
        "Worker processes per replica, sharing the port (SO_REUSEPORT), each with its own pool and listener; "
        "a worker still running `PREREC_SHUTDOWN_TIMEOUT_SECONDS` + 6 × `PREREC_DB_TIMEOUT_SECONDS` + 4 s "
        "after SIGTERM is killed, and the replica then exits 1.",
    ),
    Setting(
        "write_token",
        "PREREC_WRITE_TOKEN",
        None,
        str,
        "When set, PUT and DELETE need `Authorization: Bearer <token>` (else `401`); reads stay open.",
        "unset (writes open)",
    ),
    Setting(
        "log_format",
        "PREREC_LOG_FORMAT",
        "json",
        _log_format,
        "`json`: one JSON object per line; `text`: plain lines for a terminal.",
    ),
    Setting(
        "log_level",
        "PREREC_LOG_LEVEL",
        "info",
        _log_level,
        "Least severity logged: `debug`, `info`, `warning` or `error`.",
    ),
    Setting(
        "scalar_js_url",
        "PREREC_SCALAR_JS_URL",
        f"https://cdn.jsdelivr.net/npm/@scalar/api-reference@{SCALAR_VERSION}/dist/browser/standalone.js",
        str,
        "Where the `/openapi` page loads the Scalar script from (a pinned release, the one the tests render).",
    ),
    Setting(
        "cors_origins",
        "PREREC_CORS_ORIGINS",
        None,
        _cors_origins,
        "Origins (`https://ui.example.org`, comma-separated, or `*` for any) whose pages may call the API "
        "from a browser (CORS, without credentials); a malformed one stops the start. Unset: no CORS headers.",
    ),
    Setting(
        "min_upload_rate_bytes",
        "PREREC_MIN_UPLOAD_RATE_BYTES",
        "1024",
        _non_negative_int,
        "An upload bringing fewer bytes a second than this, averaged over the last "
        "`PREREC_READ_TIMEOUT_SECONDS`, is cut off with 408 and its temporary file removed; a studio "
        "link brings a thousand times more. `0`: only a full stall is cut.",
    ),
    Setting(
        "header_timeout_seconds",
        "PREREC_HEADER_TIMEOUT_SECONDS",
        "60",
        _positive_float,
        "A connection that has not sent a complete request head this long after it opened (or after the "
        "head's first byte) is closed, as nginx's `client_header_timeout`.",
    ),
    Setting(
        "keepalive_timeout_seconds",
        "PREREC_KEEPALIVE_TIMEOUT_SECONDS",
        "75",
        _positive_float,
        "An idle keep-alive connection is closed after this long; keep it above a load balancer's idle timeout.",
    ),
    Setting(
        "max_connections",
        "PREREC_MAX_CONNECTIONS",
        None,
        _positive_int,
        "Most connections open at once per process; past it a new connection closes the one idle the longest "
        "(or is answered 503 when none is idle). Unset: (open file limit - 64) / 2, at most 10000; the soft "
        "open file limit is raised to the hard one at start.",
    ),
    Setting(
        "upload_expiry_seconds",
        "PREREC_UPLOAD_EXPIRY_SECONDS",
        "86400",
        _positive_float,
        "A resumable upload that makes no progress this long expires: its bytes are removed and its URL "
        "answers 410 (404 once this long has passed again). An ended upload's final answer is kept as long.",
    ),
    Setting(
        "storage_url",
        "PREREC_STORAGE_URL",
        None,
        _bucket_url,
        "`s3://bucket/prefix`: keep the audio in an S3-compatible object store (AWS, MinIO, Ceph, SeaweedFS, "
        "Garage) instead of a folder, so replicas on many machines need no shared filesystem. Credentials come "
        "from the standard AWS variables and files (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, "
        "`AWS_PROFILE`, ...). A bucket that is missing or refuses them stops the start.",
        "unset → the folder `PREREC_STORAGE_DIR`",
    ),
    Setting(
        "s3_endpoint_url",
        "PREREC_S3_ENDPOINT_URL",
        None,
        _http_url,
        "The object store's S3 endpoint (`http://minio:9000`); unset: AWS.",
        "unset → AWS",
    ),
    Setting(
        "s3_region",
        "PREREC_S3_REGION",
        None,
        str,
        "The bucket's region (signing needs it); unset: `AWS_REGION` or the AWS config file, else `us-east-1`.",
        "unset → the AWS chain",
    ),
    Setting(
        "s3_addressing_style",
        "PREREC_S3_ADDRESSING_STYLE",
        "auto",
        _addressing_style,
        "`path` (`endpoint/bucket/key`, what MinIO, Ceph and SeaweedFS expect without wildcard DNS), "
        "`virtual` (`bucket.endpoint/key`) or `auto` (botocore's choice).",
    ),
    Setting(
        "s3_timeout_seconds",
        "PREREC_S3_TIMEOUT_SECONDS",
        "10",
        _positive_float,
        "Longest wait for one call to the object store (one part of an upload, one piece of a download, one "
        "listing page); past it the answer is 503 with `Retry-After` (a download already under way is cut).",
    ),
    Setting(
        "s3_presigned_get_seconds",
        "PREREC_S3_PRESIGNED_GET_SECONDS",
        "0",
        _presigned_seconds,
        "With the S3 store: above 0, a GET is answered with a 307 redirect to a presigned URL of the blob, "
        "valid this many seconds, so the store sends the bytes (the conditional and range checks still run "
        "first; HEAD is unchanged). 0 streams the bytes through prerec. The clients must reach the store.",
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
    cors_origins: frozenset[str] | None
    min_upload_rate_bytes: int
    header_timeout_seconds: float
    keepalive_timeout_seconds: float
    max_connections: int | None
    upload_expiry_seconds: float
    storage_url: BucketUrl | None
    s3_endpoint_url: str | None
    s3_region: str | None
    s3_addressing_style: str
    s3_timeout_seconds: float
    s3_presigned_get_seconds: int

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


# The README's settings table, rendered from SETTINGS.

_TABLE_HEAD = ("| variable | default | meaning |", "|---|---|---|")


def _row(setting: Setting) -> str:
    default = setting.shown_default or (f"`{setting.default}`" if setting.default else "unset")
    meaning = setting.help.replace("|", "\\|")  # a bar would end the cell
    return f"| `{setting.env}` | {default} | {meaning} |"


def settings_table() -> str:
    return "\n".join([*_TABLE_HEAD, *map(_row, SETTINGS)]) + "\n"


def with_settings_table(markdown: str) -> str:
    """`markdown` with its settings table (the one under _TABLE_HEAD) rendered afresh."""
    lines = markdown.splitlines(keepends=True)
    try:
        start = next(index for index, line in enumerate(lines) if line.rstrip("\n") == _TABLE_HEAD[0])
    except StopIteration:
        raise ValueError(f"no settings table (a line {_TABLE_HEAD[0]!r}) to replace") from None
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "".join([*lines[:start], settings_table(), *lines[end:]])
