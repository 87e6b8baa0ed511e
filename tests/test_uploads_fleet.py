"""Resumable uploads in the field (issue 10's acceptance): clients nobody here wrote, tuspy and
tus-js-client, send a 200 MB show through the repository's nginx configuration to three
replicas while the link is cut three times at random points: the replica reading the PATCH is
killed with -9 (and started again), and a proxy drops the connection mid-body. The show must
arrive whole, announced exactly once, with no temporary byte left anywhere.

Each run prints its seed (set PREREC_FLEET_SEED to replay one) and how long each takeover took:
from the cut to the client's HEAD being answered, and to its next PATCH holding the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from tusclient.client import TusClient

from prerec.config import Settings
from tests.conftest import EVENT, NGINX, Replica, blob_files, read_message, tmp_files, upload_files
from tests.cutproxy import Cut, CuttingProxy, Mark

SIZE = 200 * 1024 * 1024
START = "2026-12-01T20:00"
KEY = f"/prerecordings/{EVENT}/{START}"
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs nginx-light)")
SPACING = 16 * 1024 * 1024


def _socket_buffers_max() -> int:
    """The most a loopback TCP connection can hold in flight: the kernel's largest receive
    buffer plus its largest send buffer (autotuning grows them up to these under load)."""
    try:
        return sum(int(Path(f"/proc/sys/net/ipv4/tcp_{which}").read_text().split()[2]) for which in ("rmem", "wmem"))
    except (OSError, IndexError, ValueError):
        return 8 * 1024 * 1024


# At most this much of what a client sent sits in buffers between it and the server when its
# link drops (an RST discards them): two connections' socket buffers (proxy to nginx, nginx to
# the replica). Usually a few KiB; 13 MB seen under load, with 36 MiB per connection allowed.
IN_FLIGHT = 2 * _socket_buffers_max()
METADATA = {"event": EVENT, "start": START, "filetype": "audio/ogg"}

# tus-js-client as Uppy runs it: defaults throughout (chunkSize unset: the whole file in one
# PATCH; retryDelays [0, 1000, 3000, 5000]), only where to and what.
UPLOAD_MJS = """
import fs from "node:fs";
import * as tus from "tus-js-client";

const [endpoint, path, metadata] = process.argv.slice(2);
const upload = new tus.Upload(fs.createReadStream(path), {
  endpoint,
  metadata: JSON.parse(metadata),
  onError(error) { console.error(String(error)); process.exit(1); },
  onSuccess() { console.log(JSON.stringify({ url: upload.url })); },
});
upload.start();
"""


def show(path: Path) -> str:
    """A 200 MB Ogg-headed file of random bytes at `path`; its SHA-256 (hex)."""
    digest = hashlib.sha256()
    with path.open("wb") as file:
        block = b"OggS" + os.urandom(8 * 1024 * 1024 - 4)
        for _ in range(SIZE // len(block)):
            digest.update(block)
            file.write(block)
            block = os.urandom(len(block))
    return digest.hexdigest()


@dataclass(frozen=True)
class Sample:
    time: float
    generation: int
    owner: str | None
    durable: int


class Field:
    """The fleet the test runs: nginx, three replicas (one killed and restarted on its port
    when the plan says), the database, and what the test watched while the upload ran."""

    def __init__(
        self, balancer: str, replicas: list[Replica], env: dict[str, str], tmp_path: Path, records_progress: bool
    ) -> None:
        """`records_progress`: a PATCH records what it received as it goes (not so with
        Upload-Checksum: all or nothing)."""
        self.records_progress = records_progress
        self.balancer = balancer
        self.replicas = replicas
        self.env = env
        self.tmp_path = tmp_path
        self.database_url = env["PREREC_DATABASE_URL"]
        self.samples: list[Sample] = []
        self.created: list[dict] = []
        self.restarts: list[asyncio.Future[None]] = []
        self.kills: list[tuple[float, int]] = []
        self.subscriptions = 0

    async def row(self, conn: asyncpg.Connection) -> asyncpg.Record | None:
        return await conn.fetchrow("SELECT generation, lease_owner, durable, state FROM uploads")

    async def watch_lease(self) -> None:
        """Sample the upload's row every 10 ms: who holds the lease, under which generation."""
        conn = await asyncpg.connect(self.database_url)
        try:
            while True:
                row = await self.row(conn)
                if row is not None:
                    self.samples.append(Sample(time.monotonic(), row["generation"], row["lease_owner"], row["durable"]))
                await asyncio.sleep(0.01)
        finally:
            await conn.close()

    async def watch_events(self, opened: asyncio.Event) -> None:
        """An /sse subscriber through nginx, as a browser's EventSource is: when its replica
        dies it reconnects with the last id it saw (0, everything, while it saw none: the test
        database's event log starts empty), so it misses nothing and sees nothing twice."""
        last_id: int | None = None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                headers = {} if not opened.is_set() else {"Last-Event-ID": str(last_id or 0)}
                self.subscriptions += 1
                with contextlib.suppress(aiohttp.ClientError, ConnectionError):
                    async with session.get(f"{self.balancer}/sse?types=prerecording-created", headers=headers) as sse:
                        while (message := await read_message(sse)) is not None:
                            if "retry" in message:
                                opened.set()
                            if "data" in message:
                                last_id = int(message["id"])
                                self.created.append(json.loads(message["data"]))
                await asyncio.sleep(0.05)

    async def kill_holder(self, offset: int) -> bool:
        """kill -9 the replica whose PATCH (sent from `offset`) holds the upload's lease, once
        it has made progress; start it again on its port. False if no such holder showed."""
        conn = await asyncpg.connect(self.database_url)
        try:
            # The holder of this PATCH: a holder whose upload is at this PATCH's offset or past
            # it. Killed once it recorded progress (a whole-body PATCH does every second, once
            # its parts are in the store: longer than 1.5 s on a loaded CI machine), so the
            # resume must start from what it promised; a checksummed PATCH records nothing
            # before its end, so its holder is killed once it has held the lease a while.
            deadline = time.monotonic() + 15
            since: dict[tuple[int, str], float] = {}
            while True:
                if time.monotonic() > deadline:
                    return False
                row = await self.row(conn)
                if row is not None and row["lease_owner"] is not None and row["durable"] >= offset:
                    holder = (row["generation"], row["lease_owner"])
                    held = time.monotonic() - since.setdefault(holder, time.monotonic())
                    if row["durable"] > offset or not self.records_progress and held > 1.5:
                        break
                await asyncio.sleep(0.01)
        finally:
            await conn.close()
        pid = int(row["lease_owner"].split("/")[1])  # "<host>/<os pid>/<boot id>"
        [index] = [i for i, replica in enumerate(self.replicas) if replica.process.pid == pid]
        os.kill(pid, signal.SIGKILL)
        self.kills.append((time.monotonic(), row["durable"]))
        dead = self.replicas[index]
        dead.kill()
        again = Replica(self.env, dead.port, self.tmp_path / f"replica{index}-after-kill{len(self.kills)}.log")
        self.replicas[index] = again
        self.restarts.append(asyncio.ensure_future(asyncio.to_thread(again.wait_ready)))
        return True

    def plan(self, seed: int) -> list[Cut]:
        """Three cuts at random points of the file (between 5 and 95 % of it), in a random
        order of kinds: one kill -9 of the PATCH's replica, two dropped links."""
        rng = random.Random(seed)
        # Apart by more than the kernel and nginx buffer, so each cut PATCH brings the server
        # bytes of its own to keep.
        while True:
            points = sorted(rng.randrange(SIZE // 20, SIZE * 19 // 20) for _ in range(3))
            if min(b - a for a, b in itertools.pairwise(points)) >= SPACING:
                break
        kinds = ["drop", "drop", "kill -9"]
        rng.shuffle(kinds)
        return [
            Cut(at=point, name=kind, action=self.kill_holder if kind == "kill -9" else None)
            for point, kind in zip(points, kinds, strict=True)
        ]

    @staticmethod
    def resumed_from(log: list[Mark], cut: Mark) -> int | None:
        """The offset the client was told after a cut (its HEAD's answer)."""
        heads = (m for m in log if m.time > cut.time and m.what == "answer" and m.method == "HEAD")
        return next((m.offset for m in heads if m.status == 200), None)

    def takeovers(self, log: list[Mark], cuts: list[Mark]) -> list[str]:
        """For each cut: how long until the client's HEAD was answered, and until its next
        PATCH held the lease (the first sample after that PATCH arrived with a holder under a
        newer generation than before it; samples every 10 ms)."""
        lines = []
        for cut in cuts:
            after = [mark for mark in log if mark.time > cut.time]
            head = next((m for m in after if m.what == "answer" and m.method == "HEAD"), None)
            patch = next((m for m in after if m.what == "request" and m.method == "PATCH"), None)
            accepted = None
            if patch is not None:
                before = [s for s in self.samples if s.time <= patch.time]
                generation = before[-1].generation if before else -1
                accepted = next(
                    (s for s in self.samples if s.time > patch.time and s.owner and s.generation > generation), None
                )

            def since(mark: Mark | Sample | None, cut: Mark = cut) -> str:
                return "-" if mark is None else f"{mark.time - cut.time:.3f} s"

            asked = next((m for m in after if m.what == "request" and m.method == "HEAD"), None)
            reached = (cut.offset or 0) + cut.forwarded
            resumed = self.resumed_from(log, cut)
            lines.append(
                f"{cut.what} at byte {reached} (PATCH from {cut.offset}), resumed from {resumed} "
                f"({reached - (resumed or 0)} bytes sent again): HEAD sent after {since(asked)}, answered "
                f"{head.status if head else '-'} (offset {head.offset if head else '-'}) after {since(head)}; "
                f"next PATCH sent after {since(patch)}, holding the lease after {since(accepted)}"
            )
        return lines

    async def check(self, digest: str, seed: int) -> None:
        """The show arrived whole, announced once, and nothing temporary is left."""
        await asyncio.gather(*self.restarts)
        async with aiohttp.ClientSession() as session, session.get(self.balancer + KEY) as response:
            assert response.status == 200
            got = hashlib.sha256()
            async for block in response.content.iter_chunked(1024 * 1024):
                got.update(block)
        assert got.hexdigest() == digest, f"seed {seed}"
        await asyncio.sleep(2)  # time for a second announcement, which must not come
        assert [event["type"] for event in self.created] == ["prerecording-created"], self.created
        assert self.created[0]["data"]["prerecording"]["size"] == SIZE
        conn = await asyncpg.connect(self.database_url)
        try:
            assert await conn.fetchval("SELECT state FROM uploads") == "finished"
            assert await conn.fetchval("SELECT count(*) FROM upload_pieces") == 0
            assert await conn.fetchval("SELECT count(*) FROM upload_tails") == 0
        finally:
            await conn.close()
        stored = Settings.from_env(self.env)
        assert tmp_files(stored) == []
        assert upload_files(stored) == []
        assert len(blob_files(stored)) == 1


async def upload_through_cuts(  # type: ignore[no-untyped-def]
    fleet,
    replicas,
    storage_env,
    tmp_path: Path,
    send: Callable[[str, Path], Awaitable[None]],
    counts_cut_bytes: bool = True,
) -> None:
    """`counts_cut_bytes`: False for PATCHes with Upload-Checksum, of which a cut one keeps
    nothing (it could not be verified)."""
    balancer, _ = fleet
    field = Field(balancer, replicas, storage_env, tmp_path, records_progress=counts_cut_bytes)
    seed = int(os.environ.get("PREREC_FLEET_SEED", random.randrange(2**32)))
    print(f"seed {seed} (PREREC_FLEET_SEED={seed} replays this run)")
    began = time.monotonic()
    path = tmp_path / "show.ogg"
    digest = await asyncio.to_thread(show, path)
    opened = asyncio.Event()
    watchers = [asyncio.ensure_future(field.watch_events(opened)), asyncio.ensure_future(field.watch_lease())]
    try:
        await asyncio.wait_for(opened.wait(), 10)
        nginx = ("127.0.0.1", int(balancer.rsplit(":", 1)[1]))
        async with CuttingProxy(nginx, field.plan(seed)) as proxy:
            sent = time.monotonic()
            await send(f"http://127.0.0.1:{proxy.port}/uploads", path)
            took = time.monotonic() - sent
        assert [cut.what for cut in proxy.cuts].count("drop") == 2, (seed, proxy.cuts)
        assert [cut.what for cut in proxy.cuts].count("kill -9") == 1, (seed, proxy.cuts)
        offsets = [offset for offset in proxy.patch_offsets if offset >= 0]
        assert offsets == sorted(offsets), (seed, offsets)  # never sent from further back
        if counts_cut_bytes:
            for cut in proxy.cuts:
                resumed = field.resumed_from(proxy.log, cut) or 0
                # A killed replica's PATCH kept what it had recorded (every second): the client
                # resumed past where that PATCH began.
                assert resumed > (cut.offset or 0), (seed, cut, proxy.log)
                if cut.what == "drop":
                    # A dropped one kept every byte that reached the server: what is sent again
                    # is at most what sat in the buffers between (nginx's, the kernel's).
                    assert (cut.offset or 0) + cut.forwarded - resumed <= IN_FLIGHT, (seed, cut, proxy.log)
        await field.check(digest, seed)
    finally:
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    for line in field.takeovers(proxy.log, proxy.cuts):
        print(line)
    answers = [f"{mark.method} {mark.status}" for mark in proxy.log if mark.what == "answer" and mark.status != 204]
    print(f"answers other than 204: {answers}; /sse subscriptions (1 + reconnects): {field.subscriptions}")
    print(f"upload {took:.1f} s with {len(proxy.patch_offsets)} PATCHes, whole test {time.monotonic() - began:.1f} s")


def tuspy(**options: object) -> Callable[[str, Path], Awaitable[None]]:
    async def send(endpoint: str, path: Path) -> None:
        uploader = TusClient(endpoint).uploader(file_path=str(path), metadata=METADATA, **options)
        # The blocking client in a thread: this loop runs the proxy, the kill and the watchers.
        await asyncio.to_thread(uploader.upload)

    return send


@pytest.mark.parametrize(
    "options",
    [
        {"retries": 20, "retry_delay": 0.5},
        {"retries": 20, "retry_delay": 0.5, "upload_checksum": True, "chunk_size": 8 * 1024 * 1024},
    ],
    ids=["whole-file", "checksummed-8MiB-chunks"],
)
async def test_tuspy_through_kill_and_drops(fleet, replicas, storage_env, tmp_path: Path, options) -> None:  # type: ignore[no-untyped-def]
    checksummed = bool(options.get("upload_checksum"))
    await upload_through_cuts(fleet, replicas, storage_env, tmp_path, tuspy(**options), not checksummed)


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
async def test_tuspy_through_kill_and_drops_on_s3(fleet, replicas, storage_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The whole-file run on a bucket: parts numbered under the lease, tails in the database."""
    await upload_through_cuts(fleet, replicas, storage_env, tmp_path, tuspy(retries=20, retry_delay=0.5))


async def test_tus_js_client_defaults_through_kill_and_drops(  # type: ignore[no-untyped-def]
    fleet, replicas, storage_env, tmp_path: Path, tus_js_client: Path
) -> None:
    (tmp_path / "node_modules").symlink_to(tus_js_client / "node_modules")
    (tmp_path / "upload.mjs").write_text(UPLOAD_MJS)

    async def send(endpoint: str, path: Path) -> None:
        node = await asyncio.create_subprocess_exec(
            shutil.which("node") or "node", "upload.mjs", endpoint, str(path), json.dumps(METADATA), cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(node.communicate(), 300)
        assert node.returncode == 0, err.decode()
        assert "/uploads/" in json.loads(out)["url"]

    await upload_through_cuts(fleet, replicas, storage_env, tmp_path, send)
