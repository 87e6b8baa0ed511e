"""The README's usage page, run as written against a real `python -m prerec`.

The commands name http://localhost:10600 (what `make run` serves); the test points them at a
server of its own on a free port, so it neither passes against nor writes into whatever server
already runs on 10600.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import threading
import time

import pytest

from tests.conftest import ROOT, Replica, free_port, ogg

README_URL = "http://localhost:10600"


def usage_commands(url: str) -> dict[str, str]:
    """The usage page's commands by name, aimed at `url` instead of the documented address."""
    usage = (ROOT / "README.md").read_text().split("## Usage", 1)[1].split("\n## ", 1)[0]
    commands = {}
    for line in usage.splitlines():
        match = re.match(r"- ([^:`]+):.*?`(curl [^`]+)`", line.strip())
        if match:
            command = match.group(2)
            assert README_URL in command, f"{match.group(1)}: {command} does not use {README_URL}"
            commands[match.group(1)] = command.replace(README_URL, url)
    return commands


def run(command: str, cwd, check: bool = True) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """Run a command as a reader would paste it into bash."""
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture
def server(tmp_path, storage_env, replicas):  # type: ignore[no-untyped-def]
    replica = Replica(storage_env, free_port(), tmp_path / "server.log")
    replicas.append(replica)
    replica.wait_ready()
    return replica


def test_usage_page_commands_work_as_written(server, tmp_path) -> None:
    commands = usage_commands(server.url)
    assert set(commands) >= {"List", "Upload", "Download", "Delete", "Ping", "Server-Sent Events", "Resume a download"}
    body = ogg(1_500_000, b"\x07\x08\x09")
    (tmp_path / "prerecording.ogg").write_bytes(body)
    downloads = tmp_path / "downloads"
    downloads.mkdir()

    sse = subprocess.Popen(["bash", "-c", commands["Server-Sent Events"]], stdout=subprocess.PIPE, text=True)
    try:
        assert sse.stdout is not None
        assert sse.stdout.readline().startswith("retry:")  # the stream is open

        assert json.loads(run(commands["List"], tmp_path).stdout)["count"] == 0
        run(commands["Upload"], tmp_path)
        listing = json.loads(run(commands["List"], tmp_path).stdout)
        assert listing["count"] == 1 and listing["prerecordings"][0]["size"] == len(body)

        run(commands["Download"], downloads)
        assert (downloads / "prerecording.ogg").read_bytes() == body

        partial = downloads / "prerecording.ogg"
        partial.write_bytes(body[:600_000])  # a download cut off part way
        run(commands["Resume a download"], downloads)
        assert partial.read_bytes() == body

        run(commands["Create only, never overwrite"], tmp_path)
        again = run(commands["Create only, never overwrite"], tmp_path, check=False)
        assert again.returncode == 22 and "412" in again.stderr  # curl --fail: refused, not overwritten

        run(commands["Upload with an integrity check"], tmp_path)
        starts = [item["start"] for item in json.loads(run(commands["List"], tmp_path).stdout)["prerecordings"]]
        assert starts == ["2024-01-01T00:00:00", "2024-01-02T00:00:00", "2024-01-03T00:00:00"]

        assert "204" in run(commands["Ping"], tmp_path).stdout.splitlines()[0]

        run(commands["Delete"], tmp_path)
        assert json.loads(run(commands["List"], tmp_path).stdout)["count"] == 2

        seen: list[str] = []
        deadline = time.monotonic() + 10
        while "prerecording-deleted" not in "".join(seen) and time.monotonic() < deadline:
            seen.append(sse.stdout.readline())
        events = [json.loads(line[6:]) for line in seen if line.startswith("data: ")]
        assert [event["type"] for event in events] == ["prerecording-created"] * 3 + ["prerecording-deleted"]
    finally:
        sse.kill()
        sse.wait()


def test_openapi_links_work(server) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/openapi") as response:
        assert "text/html" in response.headers["Content-Type"]
    with urllib.request.urlopen(f"{server.url}/openapi/openapi.json") as response:
        assert json.load(response)["openapi"].startswith("3.1")


@pytest.fixture
def squatter():  # type: ignore[no-untyped-def]
    """Another server on a port, answering every GET (a /ping too) with 204."""

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_server_that_did_not_start_fails_the_test(squatter, tmp_path, storage_env, replicas) -> None:
    """The port is taken, so the replica cannot listen: the other server's /ping must not pass for its."""
    replica = Replica(storage_env, squatter, tmp_path / "server.log")
    replicas.append(replica)
    with pytest.raises(AssertionError, match="replica exited"):
        replica.wait_ready()


def resumable_session(url: str, number: int = 1) -> str:
    """The README's `number`th curl session for a resumable upload (1: tus, 2: the IETF draft),
    aimed at `url`."""
    section = (ROOT / "README.md").read_text().split("## Resumable uploads", 1)[1].split("\n## ", 1)[0]
    script = section.split("```sh\n")[number].split("```", 1)[0]
    assert README_URL in script
    return script.replace(README_URL, url)


def test_resumable_upload_session_works_as_written(server, tmp_path) -> None:
    import hashlib
    import urllib.request

    body = ogg(2_500_000, b"\x01\x02\x03\x05")
    (tmp_path / "prerecording.ogg").write_bytes(body)
    # `set -e` and a trace: a step that fails stops the session, and the trace says which.
    session = run("set -ex\n" + resumable_session(server.url), tmp_path)
    # The first PATCH stood for a cut: the HEAD resumed at its end, not at 0 nor at the size.
    assert "Upload-Offset: 1000000" in session.stderr, session.stderr[-3000:]
    key = f"{server.url}/prerecordings/0f339cb0-7ab4-43fe-852d-75708232f76c/2024-01-04T00:00"
    with urllib.request.urlopen(key) as response:
        stored = response.read()
        assert response.headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()}"'
    assert stored == body


def test_ietf_draft_session_works_as_written(server, tmp_path) -> None:
    import hashlib
    import urllib.request

    body = ogg(2_500_000, b"\x01\x02\x03\x07")
    (tmp_path / "prerecording.ogg").write_bytes(body)
    session = run("set -ex\n" + resumable_session(server.url, 2), tmp_path)
    # The HEAD resumed at the end of the first part; the completing PATCH answered as a PUT would.
    assert "Upload-Offset: 1000000" in session.stderr, session.stderr[-3000:]
    assert "HTTP/1.1 201 Created" in session.stdout, session.stdout[-3000:]
    assert "Upload-Complete: ?1" in session.stdout, session.stdout[-3000:]
    etag = f'"{hashlib.sha256(body).hexdigest()}"'
    assert f"etag: {etag}" in session.stdout.lower(), session.stdout[-3000:]
    key = f"{server.url}/prerecordings/0f339cb0-7ab4-43fe-852d-75708232f76c/2024-01-04T01:00"
    with urllib.request.urlopen(key) as response:
        assert response.headers["ETag"] == etag
        assert response.read() == body


def test_tus_js_client_snippet_works_as_written(server, tmp_path, tus_js_client) -> None:
    """The README's tus-js-client snippet, run by Node on a file instead of a browser's File."""
    import hashlib
    import shutil
    import urllib.request

    section = (ROOT / "README.md").read_text().split("## Resumable uploads", 1)[1].split("\n## ", 1)[0]
    snippet = section.split("```js\n", 1)[1].split("```", 1)[0]
    assert 'endpoint: "/uploads"' in snippet
    snippet = snippet.replace('endpoint: "/uploads"', f'endpoint: "{server.url}/uploads"')
    body = ogg(3_000_000, b"\x01\x02\x03\x0b")
    (tmp_path / "prerecording.ogg").write_bytes(body)
    script = tus_js_client / "readme.mjs"
    script.write_text('import fs from "node:fs";\nconst file = fs.createReadStream(process.argv[2]);\n' + snippet)
    node = shutil.which("node")
    assert node is not None
    done = subprocess.run(
        [node, str(script), str(tmp_path / "prerecording.ogg")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "on air" in done.stdout, done.stdout + done.stderr
    key = f"{server.url}/prerecordings/0f339cb0-7ab4-43fe-852d-75708232f76c/2024-01-04T00:00"
    with urllib.request.urlopen(key) as response:
        assert response.headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()}"'
        assert response.read() == body
