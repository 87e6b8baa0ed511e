"""The README's usage page, run as written against a real `python -m prerec` on port 10600."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time

import pytest

from tests.conftest import ROOT, Replica, ogg

README_PORT = 10600


def usage_commands() -> dict[str, str]:
    usage = (ROOT / "README.md").read_text().split("## Usage", 1)[1].split("\n## ", 1)[0]
    commands = {}
    for line in usage.splitlines():
        match = re.match(r"- ([\w -]+):.*?`(curl [^`]+)`", line.strip())
        if match:
            commands[match.group(1)] = match.group(2)
    return commands


def run(command: str, cwd) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(shlex.split(command), cwd=cwd, capture_output=True, text=True, timeout=30, check=True)


@pytest.fixture
def server(tmp_path, storage_env, replicas):  # type: ignore[no-untyped-def]
    replica = Replica(storage_env, README_PORT, tmp_path / "server.log")
    replicas.append(replica)
    replica.wait_ready()
    return replica


def test_usage_page_commands_work_as_written(server, tmp_path) -> None:
    commands = usage_commands()
    assert set(commands) >= {"List", "Upload", "Download", "Delete", "Ping", "Server-Sent Events"}
    body = ogg(1_500_000, b"\x07\x08\x09")
    (tmp_path / "prerecording.ogg").write_bytes(body)
    downloads = tmp_path / "downloads"
    downloads.mkdir()

    sse = subprocess.Popen(shlex.split(commands["Server-Sent Events"]), stdout=subprocess.PIPE, text=True)
    try:
        assert sse.stdout is not None
        assert sse.stdout.readline().startswith("retry:")  # the stream is open

        assert json.loads(run(commands["List"], tmp_path).stdout)["count"] == 0
        run(commands["Upload"], tmp_path)
        listing = json.loads(run(commands["List"], tmp_path).stdout)
        assert listing["count"] == 1 and listing["prerecordings"][0]["size"] == len(body)

        run(commands["Download"], downloads)
        assert (downloads / "prerecording.ogg").read_bytes() == body

        assert "204" in run(commands["Ping"], tmp_path).stdout.splitlines()[0]

        run(commands["Delete"], tmp_path)
        assert json.loads(run(commands["List"], tmp_path).stdout)["count"] == 0

        seen: list[str] = []
        deadline = time.monotonic() + 10
        while "prerecording-deleted" not in "".join(seen) and time.monotonic() < deadline:
            seen.append(sse.stdout.readline())
        events = [json.loads(line[6:]) for line in seen if line.startswith("data: ")]
        assert [event["type"] for event in events] == ["prerecording-created", "prerecording-deleted"]
    finally:
        sse.kill()
        sse.wait()


def test_openapi_links_work(server) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/openapi") as response:
        assert "text/html" in response.headers["Content-Type"]
    with urllib.request.urlopen(f"{server.url}/openapi/openapi.json") as response:
        assert json.load(response)["openapi"].startswith("3.1")
