"""`pip install .` (not editable): the installed package migrates a new database and serves."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

from tests.conftest import ROOT, free_port, ogg, tables

SOURCES = ("pyproject.toml", "README.md", "alembic.ini", "prerec", "migrations")


def build_wheel(into: Path, scratch: Path) -> Path:
    # From a copy: an in-tree build leaves build/ and *.egg-info in the checkout. The symlinks
    # in prerec/ are copied as symlinks, as a clone has them.
    source = scratch / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    # No build isolation: the backend is the test environment's setuptools (in the test extra),
    # so the build needs no network.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", into, source],
        check=True,
        timeout=120,
    )
    [wheel] = into.glob("prerec-*.whl")
    return wheel


def fresh_venv_with(wheel: Path, where: Path) -> Path:
    """A new virtualenv with the wheel installed; its dependencies are borrowed, not installed.

    Installing aiohttp, asyncpg, SQLAlchemy, PostgreSQL's binaries... again would take minutes
    and the network; instead a .pth line appends the test environment's site-packages to the
    new one's path. It comes after the venv's own site-packages, so `prerec` is the installed
    wheel; and .pth files in an appended folder are not run, so the test environment's
    editable `prerec` cannot leak in. The wheel goes in first, by the venv's own pip, while
    that pip sees only the new venv (it must not touch the shared one's editable install).
    """
    subprocess.run([sys.executable, "-m", "venv", where], check=True, timeout=120)
    python = where / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True, timeout=120)
    site_packages = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site_packages, "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_an_installed_wheel_migrates_and_serves(blank_database_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    wheels = tmp_path / "wheels"
    wheel = build_wheel(wheels, tmp_path)
    python = fresh_venv_with(wheel, tmp_path / "venv")
    # Nowhere near the checkout: `python -m` puts the working folder first on the path.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    url = blank_database_url
    port = free_port()
    env = {
        **{name: value for name, value in os.environ.items() if name != "PYTHONPATH"},
        "PREREC_DATABASE_URL": url,
        "PREREC_DATA_DIR": str(tmp_path / "data"),
        "PREREC_HOST": "127.0.0.1",
        "PREREC_PORT": str(port),
        "PREREC_LOG_FORMAT": "text",
    }

    where = subprocess.run(
        [python, "-c", "import prerec; print(prerec.__file__)"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "venv"), where.stdout + where.stderr

    migrated = subprocess.run(
        [python, "-m", "prerec", "migrate"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60
    )
    assert migrated.returncode == 0, migrated.stderr
    assert {"prerecordings", "events", "alembic_version"} <= asyncio.run(tables(url))

    log = tmp_path / "serve.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(
            [python, "-m", "prerec"], cwd=elsewhere, env=env, stdout=output, stderr=subprocess.STDOUT
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                assert server.poll() is None, log.read_text()
                try:
                    with urllib.request.urlopen(f"{base}/ping", timeout=1) as ping:
                        assert ping.status == 204
                    break
                except OSError:
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.1)
            with urllib.request.urlopen(f"{base}/ready", timeout=5) as ready:
                assert ready.status == 200
            key = f"{base}/prerecordings/0f339cb0-7ab4-43fe-852d-75708232f76c/2024-01-01T00:00"
            body = ogg(10_000)
            put = urllib.request.Request(key, data=body, method="PUT", headers={"Content-Type": "audio/ogg"})
            with urllib.request.urlopen(put, timeout=10) as created:
                assert created.status == 201
            with urllib.request.urlopen(key, timeout=10) as stored:
                assert stored.read() == body
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                code = server.wait(30)
            finally:
                server.kill()
                server.wait()
    assert code == 0, log.read_text()
