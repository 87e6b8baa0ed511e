"""`make bench`: prerec measured against nginx and a bare aiohttp handler, in alternation.

Every figure is a ratio to a reference measured in the same run, on the same machine, a few
seconds apart, so a noisy machine moves both sides together. Each measurement is repeated
(rounds) and reported as median and min-max. `--smoke` runs the same code on small sizes in
seconds (CI runs it so the bench cannot rot) and writes nothing into docs/.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import platform
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prerec import embedded  # noqa: E402
from prerec.storage.s3 import PART_SIZE  # noqa: E402
from tests.seaweed import Weed  # noqa: E402

EVENT = "0f339cb0-7ab4-43fe-852d-75708232f76c"
LIST_EVENT = "9e0c3a2b-4f5d-4c1e-8a7b-6d5e4f3a2b1c"
OGG = "audio/ogg"


@dataclasses.dataclass(frozen=True)
class Plan:
    big: int
    medium: int
    concurrent: int
    concurrent_size: int
    tiny: int
    rounds: int
    wrk_seconds: int
    list_rows: int
    list_requests: int
    subscribers: int
    sse_uploads: int
    burst: int
    idle_seconds: float
    resumes: int
    takeovers: int
    # Before each timed transfer that writes to or reads from disk: the dirty pages of earlier
    # ones are written out (os.sync), then a pause (see settled).
    settle_seconds: float


FULL = Plan(
    big=1 << 30,
    medium=256 << 20,
    concurrent=50,
    concurrent_size=4 << 20,
    tiny=16 << 10,
    rounds=3,
    wrk_seconds=5,
    list_rows=100_000,
    list_requests=1000,
    subscribers=1000,
    sse_uploads=20,
    burst=200,
    idle_seconds=3,
    resumes=200,
    takeovers=30,
    settle_seconds=2,
)
SMOKE = Plan(
    big=32 << 20,
    medium=8 << 20,
    concurrent=8,
    concurrent_size=1 << 20,
    tiny=16 << 10,
    rounds=1,
    wrk_seconds=1,
    list_rows=2_000,
    list_requests=50,
    subscribers=30,
    sse_uploads=3,
    burst=50,
    idle_seconds=1,
    resumes=10,
    takeovers=3,
    settle_seconds=0,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def make_body(path: Path, size: int) -> Path:
    with open(path, "wb") as out:
        out.write(b"OggS")
        left = size - 4
        block = os.urandom(1 << 20)
        while left > 0:
            out.write(block[: min(left, len(block))])
            left -= len(block)
    return path


# Processes


class Fleet:
    """Every process the bench starts; all are stopped on exit."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(self, command: list[str], env: dict[str, str] | None = None, log: str = "log") -> subprocess.Popen[bytes]:
        out = open(self.work / f"{log}.log", "wb")
        process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def show_errors(self) -> None:
        """The end of every log that has an error in it: the logs go with the work folder."""
        for log in sorted(self.work.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()
            if any('"ERROR"' in line or "Traceback" in line for line in lines):
                print(f"--- {log.name}, last lines", *lines[-20:], sep="\n", file=sys.stderr)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def start_prerec(
    fleet: Fleet,
    database_url: str,
    name: str,
    workers: int = 1,
    storage: str | None = None,
    extra: dict[str, str] | None = None,
) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    env = {
        "PREREC_DATABASE_URL": database_url,
        "PREREC_STORAGE_DIR": str(fleet.work / f"{storage or name}-storage"),
        "PREREC_PORT": str(port),
        "PREREC_HOST": "127.0.0.1",
        "PREREC_LOG_LEVEL": "warning",
        "PREREC_WORKERS": str(workers),
        "PREREC_MAX_UPLOAD_BYTES": str(4 << 30),
        **(extra or {}),
    }
    process = fleet.spawn([sys.executable, "-m", "prerec"], env, log=name)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/ping")
    return url, process


NGINX_CONF = """
{user}daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {work}/nginx-body;
    server {{
        listen 127.0.0.1:{port};
        root {work}/nginx-root;
        client_max_body_size 0;
        location = /ping {{ return 204; }}
        location /default/ {{ dav_methods PUT DELETE; create_full_put_path on; }}
        location /buf1m/ {{ dav_methods PUT DELETE; create_full_put_path on; client_body_buffer_size 1m; }}
    }}
}}
"""


def start_nginx(fleet: Fleet) -> str:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    (fleet.work / "nginx-root").mkdir(exist_ok=True)
    conf = fleet.work / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_CONF.format(user=user, work=fleet.work, port=port))
    fleet.spawn([binary, "-c", str(conf)], log="nginx")
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/ping")
    return url


def start_bare(fleet: Fleet) -> str:
    port = free_port()
    fleet.spawn([sys.executable, str(ROOT / "bench" / "bare.py"), str(port)], log="bare")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return url
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# Measurements


async def curl(*args: str) -> float:
    """Run curl; return its total time in seconds (fails on any HTTP error)."""
    process = await asyncio.create_subprocess_exec(
        "curl",
        "--silent",
        "--show-error",
        "--fail",
        "--output",
        "/dev/null",
        "--write-out",
        "%{time_total}",
        *args,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"curl {' '.join(args)} failed with {process.returncode}")
    return float(out)


async def settled(plan: Plan, work: Awaitable[float]) -> float:
    """`work` (a timed transfer, not yet started) on a settled machine: what earlier transfers
    left dirty is on disk, and the disk has had a moment.

    Without it the side measured second paid for the first: the first 1 GiB transfer after a
    pause ran at twice the speed of the next one here (a plain PUT measured before a tus upload:
    346-356 MB/s; after it: 159-168), whichever it was, and the references were always first."""
    await asyncio.to_thread(os.sync)
    await asyncio.sleep(plan.settle_seconds)
    return await work


async def in_turn(round_: int, ours: Callable[[], Awaitable[None]], reference: Callable[[], Awaitable[None]]) -> None:
    """Both sides of a round's comparison, the reference first in even rounds, ours first in
    odd ones: neither side always gets the machine as the other left it."""
    first, second = (reference, ours) if round_ % 2 == 0 else (ours, reference)
    await first()
    await second()


async def put(url: str, body: Path) -> float:
    return await curl(
        "--request",
        "PUT",
        "--header",
        f"Content-Type: {OGG}",
        "--header",
        "Transfer-Encoding: chunked",
        "--upload-file",
        str(body),
        url,
    )


async def get(url: str, *options: str) -> float:
    return await curl(*options, url)


class RssSampler:
    """Peak resident memory of some processes, sampled every 10 ms while a transfer runs."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = 0

    def rss(self) -> int:
        total = 0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                total = max(total, int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024)  # type: ignore[union-attr]
        return total

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.peak = max(self.peak, self.rss())
            await asyncio.sleep(0.01)

    async def during(self, work: Awaitable[float]) -> float:
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(self.run(stop))
        try:
            return await work
        finally:
            stop.set()
            await sampler


def _disk_write(path: Path, size: int) -> float:
    """Write `size` bytes in 1 MiB pieces and fsync: the floor under a durable upload."""
    block = os.urandom(1 << 20)
    began = time.perf_counter()
    with open(path, "wb", buffering=0) as out:
        for _ in range(size // len(block)):
            out.write(block)
        os.fsync(out.fileno())
    elapsed = time.perf_counter() - began
    path.unlink()
    return elapsed


async def concurrent_puts(urls: list[str], body: Path) -> float:
    began = time.perf_counter()
    await asyncio.gather(*(put(url, body) for url in urls))
    return time.perf_counter() - began


async def burst_of_puts(urls: list[str], size: int) -> None:
    """One upload to each URL, all at once, from one client session (a curl process each would
    load the machine more than the server does)."""
    body = b"OggS" + os.urandom(size - 4)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(url: str) -> None:
            async with session.put(url, data=body, headers={"Content-Type": OGG}) as response:
                if response.status not in (201, 204):
                    raise RuntimeError(f"PUT {url}: {response.status}")

        await asyncio.gather(*(one(url) for url in urls))


async def _file_pieces(path: Path, start: int, length: int):  # type: ignore[no-untyped-def]
    """A file's bytes [start, start + length) in 1 MiB pieces, read off the loop."""
    with open(path, "rb") as file:
        file.seek(start)
        left = length
        while left > 0:
            piece = await asyncio.to_thread(file.read, min(left, 1 << 20))
            if not piece:
                return
            left -= len(piece)
            yield piece


async def aio_put(session: aiohttp.ClientSession, url: str, path: Path) -> float:
    """A plain PUT from this process: the reference of the tus rows, sent by the same client."""
    began = time.perf_counter()
    size = path.stat().st_size
    headers = {"Content-Type": OGG, "Content-Length": str(size)}
    async with session.put(url, data=_file_pieces(path, 0, size), headers=headers) as response:
        if response.status not in (201, 204):
            raise RuntimeError(f"PUT {url}: {response.status}")
    return time.perf_counter() - began


TUS = {"Tus-Resumable": "1.0.0"}
RESUME_PIECE = 64 << 10


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def tus_create(session: aiohttp.ClientSession, base: str, start: str, size: int) -> str:
    """A tus upload of `size` bytes for EVENT at `start`; its URL path."""
    metadata = f"event {_b64(EVENT)},start {_b64(start)},filetype {_b64(OGG)}"
    headers = {**TUS, "Upload-Length": str(size), "Upload-Metadata": metadata}
    async with session.post(f"{base}/uploads", headers=headers) as response:
        if response.status != 201:
            raise RuntimeError(f"tus creation: {response.status} {await response.text()}")
        return response.headers["Location"]


async def aio_tus(session: aiohttp.ClientSession, base: str, start: str, path: Path, chunk: int | None) -> float:
    """Create a tus upload and send the file in one PATCH (chunk None) or in PATCHes of `chunk` bytes."""
    size = path.stat().st_size
    began = time.perf_counter()
    location = base + await tus_create(session, base, start, size)
    offset = 0
    while offset < size:
        length = size - offset if chunk is None else min(chunk, size - offset)
        headers = {
            **TUS,
            "Content-Type": "application/offset+octet-stream",
            "Upload-Offset": str(offset),
            "Content-Length": str(length),
        }
        async with session.patch(location, data=_file_pieces(path, offset, length), headers=headers) as response:
            if response.status != 204:
                raise RuntimeError(f"tus PATCH at {offset}: {response.status} {await response.text()}")
            offset = int(response.headers["Upload-Offset"])
    return time.perf_counter() - began


def _s3_client(weed: Weed):  # type: ignore[no-untyped-def]
    """An aiobotocore client as prerec makes one (checksums off, path addressing)."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"},
    )
    return get_session().create_client(
        "s3",
        endpoint_url=weed.url,
        region_name="us-east-1",
        aws_access_key_id=weed.access_key,
        aws_secret_access_key=weed.secret_key,
        config=config,
    )


async def s3_multipart_put(client, bucket: str, key: str, path: Path) -> float:  # type: ignore[no-untyped-def]
    """aiobotocore's own multipart upload of a file, shaped as prerec's: parts of PART_SIZE,
    one in flight while the next is read (StagedObject's two buffers per upload)."""
    began = time.perf_counter()
    upload = await client.create_multipart_upload(Bucket=bucket, Key=key, ContentType=OGG)
    upload_id = upload["UploadId"]
    parts: list[dict[str, object]] = []
    sending: asyncio.Task[dict[str, object]] | None = None

    async def send(number: int, body: bytes) -> dict[str, object]:
        answer = await client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": answer["ETag"]}

    with open(path, "rb") as file:
        number = 0
        while body := await asyncio.to_thread(file.read, PART_SIZE):
            if sending is not None:
                parts.append(await sending)
            number += 1
            sending = asyncio.ensure_future(send(number, body))
    if sending is not None:
        parts.append(await sending)
    await client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    return time.perf_counter() - began


async def s3_streamed_get(client, bucket: str, key: str) -> float:  # type: ignore[no-untyped-def]
    """aiobotocore's own streamed GET of an object, read and discarded as it arrives."""
    began = time.perf_counter()
    answer = await client.get_object(Bucket=bucket, Key=key)
    async with answer["Body"] as body:
        async for _ in body.iter_chunks(1 << 20):
            pass
    return time.perf_counter() - began


async def s3_rows(fleet: Fleet, plan: Plan, database_url: str, bodies: dict[str, Path]) -> list[Row]:
    """prerec on SeaweedFS against aiobotocore talking to the same SeaweedFS directly, in
    alternation: the S3 backend's own cost, not the store's."""
    (fleet.work / "weed").mkdir()
    weed = Weed(fleet.work / "weed")
    try:
        weed.start()
    finally:
        if weed.process is not None:
            fleet.processes.append(weed.process)
    bucket = weed.new_bucket()
    extra = {
        **weed.env,
        "PREREC_STORAGE_URL": f"s3://{bucket}/prerec",
        "PREREC_S3_ENDPOINT_URL": weed.url,
        "PREREC_S3_ADDRESSING_STYLE": "path",
    }
    url, process = start_prerec(fleet, database_url, "prerec-s3", extra=extra)
    # The same bucket and database, GETs answered with a redirect to the store (curl follows it).
    presigned_url, _ = start_prerec(
        fleet, database_url, "prerec-s3-presigned", extra={**extra, "PREREC_S3_PRESIGNED_GET_SECONDS": "300"}
    )
    key = f"{url}/prerecordings/{EVENT}"
    mb = 1 / 2**20
    size, medium = plan.big >> 20, plan.medium >> 20
    big = plan.big * mb
    put_row = Row(f"S3: PUT {size} MiB onto SeaweedFS", "MB/s", [], "aiobotocore multipart, same parts")
    get_row = Row(f"S3: GET {size} MiB from SeaweedFS", "MB/s", [], "aiobotocore streamed get_object")
    presigned_row = Row(
        f"S3: GET {size} MiB, 307 to a presigned URL (PREREC_S3_PRESIGNED_GET_SECONDS)",
        "MB/s",
        [],
        "aiobotocore streamed get_object",
    )
    rss_row = Row(f"S3: peak RSS during a {size} MiB PUT", "MB", [])
    flat_row = Row(f"S3: peak RSS, {size} MiB PUT vs {medium} MiB PUT", "MB", [], f"{medium} MiB PUT")
    async with _s3_client(weed) as client:
        for round_ in range(plan.rounds):
            start = f"2025-01-{round_ + 1:02d}T00:00"

            async def reference_put() -> None:
                upload = s3_multipart_put(client, bucket, "raw/big.ogg", bodies["big"])
                put_row.reference.append(big / await settled(plan, upload))

            async def our_put(start: str = start) -> None:
                sampler = RssSampler([process.pid])
                secs = await settled(plan, sampler.during(put(f"{key}/{start}", bodies["big"])))
                put_row.ours.append(big / secs)
                rss_row.ours.append(sampler.peak / 1e6)
                flat_row.ours.append(sampler.peak / 1e6)

            async def reference_get() -> None:
                get_row.reference.append(big / await settled(plan, s3_streamed_get(client, bucket, "raw/big.ogg")))
                presigned_row.reference.append(get_row.reference[-1])

            async def our_gets(start: str = start) -> None:
                get_row.ours.append(big / await settled(plan, get(f"{key}/{start}")))
                presigned = get(f"{presigned_url}/prerecordings/{EVENT}/{start}", "--location")
                presigned_row.ours.append(big / await settled(plan, presigned))

            await in_turn(round_, our_put, reference_put)
            sampler = RssSampler([process.pid])
            await sampler.during(put(f"{key}/2025-02-{round_ + 1:02d}T00:00", bodies["medium"]))
            flat_row.reference.append(sampler.peak / 1e6)
            await in_turn(round_, our_gets, reference_get)
    judge_ratio(put_row, at_least=0.8)
    judge_ratio(get_row, at_least=0.8)
    rss_row.goal, rss_row.passed = "< 150 MB", max(rss_row.ours) < 150
    # Flat: a body four times larger may not cost more than a few part buffers' noise.
    judge_ratio(flat_row, at_most=1.15)
    process.terminate()
    process.wait(30)
    # The GET goal is the streamed row; the redirect is an operator's option, shown.
    return [put_row, get_row, presigned_row, rss_row, flat_row]


async def wrk(url: str, seconds: int) -> float:
    args = ["wrk", "--threads", "2", "--connections", "64", "--duration", f"{seconds}s"]
    process = await asyncio.create_subprocess_exec(*args, url, stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    text = out.decode()
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non_2xx:
        raise RuntimeError(f"wrk {url}: {non_2xx.group(1)} failed requests")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]


async def ab(url: str, seconds: int, head: bool = False) -> float:
    """Request rate by ApacheBench, 64 keep-alive connections. Used for HEAD, which wrk cannot
    do (its parser then waits for a body that never comes); the HEAD figure is compared with
    /ping measured by ab too, so both sides of that ratio come from one tool."""
    args = ["ab", "-q", "-k", "-c", "64", "-t", str(seconds), "-n", "10000000", *(["-i"] if head else [])]
    process = await asyncio.create_subprocess_exec(*args, url, stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    text = out.decode()
    if failed := re.search(r"Non-2xx responses:\s+(\d+)", text):
        raise RuntimeError(f"ab {url}: {failed.group(1)} failed requests")
    return float(re.search(r"Requests per second:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def list_latencies(url: str, database_url: str, plan: Plan) -> list[float]:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """
            INSERT INTO prerecordings (event, start, type, size, sha256, blob, modified)
            SELECT $1::uuid, timestamp '2020-01-01' + n * interval '1 hour', 'audio/ogg', 1000,
                   sha256(n::text::bytea), 'bench/' || n, now()
            FROM generate_series(1, $2) AS n
            ON CONFLICT DO NOTHING
            """,
            LIST_EVENT,
            plan.list_rows,
        )
        # What autovacuum would have done by now: statistics, and the visibility map that
        # lets the count be an index-only scan.
        await conn.execute("VACUUM ANALYZE prerecordings")
    finally:
        await conn.close()
    latencies = []
    async with aiohttp.ClientSession() as session:
        for _ in range(plan.list_requests):
            hour = random.randrange(plan.list_rows)
            after = "2020-01-01T00:00:00"
            after = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(1577836800 + hour * 3600))
            began = time.perf_counter()
            async with session.get(f"{url}/prerecordings/{LIST_EVENT}", params={"after": after, "limit": "10"}) as r:
                await r.read()
                assert r.status == 200
            latencies.append(time.perf_counter() - began)
    return latencies


async def sse_fanout(urls: list[str], plan: Plan, body: bytes) -> list[float]:
    """Upload through the first replica; time until each subscriber, on any replica, has it."""
    arrivals: dict[str, list[float]] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        ready = 0

        async def subscribe(url: str) -> None:
            nonlocal ready
            async with session.get(f"{url}/sse", params={"types": "prerecording-created"}) as stream:
                await stream.content.readline()  # retry:
                ready += 1
                async for line in stream.content:
                    if line.startswith(b"data: "):
                        # Timestamp first, parse after: the client's own JSON work is not the
                        # server's latency.
                        now = time.perf_counter()
                        start = json.loads(line[6:])["data"]["prerecording"]["start"]
                        arrivals.setdefault(start, []).append(now)

        tasks = [asyncio.ensure_future(subscribe(urls[i % len(urls)])) for i in range(plan.subscribers)]
        deadline = time.monotonic() + 60
        while ready < plan.subscribers:
            if failed := [task for task in tasks if task.done()]:
                raise RuntimeError(f"a subscriber failed: {failed[0].exception()!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {ready} of {plan.subscribers} subscribers connected")
            await asyncio.sleep(0.05)
        latencies = []
        for n in range(plan.sse_uploads):
            start = f"2030-01-01T00:{n // 60:02d}:{n % 60:02d}"
            async with session.put(
                f"{urls[0]}/prerecordings/{EVENT}/{start}", data=body, headers={"Content-Type": OGG}
            ) as r:
                assert r.status == 201, r.status
            answered = time.perf_counter()
            deadline = answered + 10
            while len(arrivals.get(start, [])) < plan.subscribers and time.perf_counter() < deadline:
                await asyncio.sleep(0.001)
            got = arrivals.get(start, [])
            if len(got) < plan.subscribers:
                raise RuntimeError(f"only {len(got)} of {plan.subscribers} subscribers got the event")
            latencies += [max(0.0, t - answered) for t in got]
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return latencies


async def open_patch(base: str, location: str, offset: int, length: int, first: bytes) -> asyncio.StreamWriter:
    """A PATCH announcing `length` bytes of which only `first` are sent: a client whose link
    then drops (close the writer) or dies unnoticed (leave it open)."""
    host, port = base.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"PATCH {location} HTTP/1.1\r\nHost: {host}\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    writer.write(head.encode() + first)
    await writer.drain()
    return writer


async def resume_elsewhere(session: aiohttp.ClientSession, base: str, location: str, piece: bytes) -> int:
    """What a client does on another replica: HEAD for the offset, then PATCH the next bytes;
    returns the offset reached (the PATCH answered, its bytes durable)."""
    async with session.head(base + location, headers=TUS) as response:
        if response.status != 200:
            raise RuntimeError(f"tus HEAD: {response.status}")
        offset = int(response.headers["Upload-Offset"])
    headers = {**TUS, "Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)}
    async with session.patch(base + location, data=piece, headers=headers) as response:
        if response.status != 204:
            raise RuntimeError(f"tus PATCH on another replica: {response.status} {await response.text()}")
        return int(response.headers["Upload-Offset"])


async def _until_lease(conn: asyncpg.Connection, location: str, held: bool) -> None:
    """Wait until the PATCH on the first replica has taken the upload's lease (generation 1),
    and holds it still (`held`) or has let it go."""
    upload_id = location.rsplit("/", 1)[1]
    deadline = time.monotonic() + 10
    while True:
        row = await conn.fetchrow("SELECT generation, lease_owner FROM uploads WHERE id = $1::uuid", upload_id)
        if row["generation"] > 0 and (row["lease_owner"] is not None) == held:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the lease of {location} is not {'held' if held else 'free'}")
        await asyncio.sleep(0.005)


async def resumes(urls: list[str], database_url: str, count: int, dead: bool) -> list[float]:
    """Two replicas sharing a database and a storage folder. A PATCH to the first sends a part
    of its body; then its link drops (the replica notices and lets go) or, with `dead`, dies
    unnoticed (the replica still holds the lease, and must be asked to let go). Timed: the
    client on the second replica, from its HEAD until its next PATCH is answered."""
    first, second = urls
    piece = os.urandom(RESUME_PIECE)
    head = b"OggS" + piece[4:]
    latencies = []
    conn = await asyncpg.connect(database_url)
    try:
        async with aiohttp.ClientSession() as session:
            for n in range(count):
                start = f"2031-{'02' if dead else '01'}-01T{n // 3600:02d}:{n // 60 % 60:02d}:{n % 60:02d}"
                location = await tus_create(session, first, start, 4 * RESUME_PIECE)
                writer = await open_patch(first, location, 0, 3 * RESUME_PIECE, head)
                if dead:
                    await _until_lease(conn, location, held=True)
                else:
                    writer.close()
                    await _until_lease(conn, location, held=False)
                began = time.perf_counter()
                reached = await resume_elsewhere(session, second, location, piece)
                latencies.append(time.perf_counter() - began)
                if reached <= RESUME_PIECE // 2:
                    raise RuntimeError(f"the resumed upload {location} reached only {reached}")
                if dead:
                    writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
                async with session.delete(second + location, headers=TUS) as response:
                    if response.status != 204:
                        raise RuntimeError(f"tus DELETE: {response.status}")
    finally:
        await conn.close()
    return latencies


def latency_rows(name: str, latencies: list[float], goal: float, goal_text: str) -> list[Row]:
    p50, p99 = percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000
    return [
        Row(f"{name}, p50", "ms", [p50]),
        Row(f"{name}, p99", "ms", [p99], goal=goal_text, passed=p99 < goal * 1000),
    ]


# Report


@dataclasses.dataclass
class Row:
    name: str
    unit: str
    ours: list[float]
    reference_name: str = ""
    reference: list[float] = dataclasses.field(default_factory=list)
    goal: str = ""
    passed: bool | None = None

    @property
    def ratio(self) -> float | None:
        if not self.reference:
            return None
        return statistics.median(self.ours) / statistics.median(self.reference)


def spread(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
    if not values:
        return ""
    med = statistics.median(values) * scale
    lo, hi = min(values) * scale, max(values) * scale
    fmt = f"{{:,.{digits}f}}"
    if len(values) == 1 or lo == hi:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(lo)}–{fmt.format(hi)})"


def judge_ratio(row: Row, at_least: float | None = None, at_most: float | None = None) -> None:
    ratio = row.ratio
    assert ratio is not None
    if at_least is not None:
        row.goal = f"≥ {at_least:g}×"
        row.passed = ratio >= at_least
    if at_most is not None:
        row.goal = f"≤ {at_most:g}×"
        row.passed = ratio <= at_most


def machine() -> list[str]:
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    import aiohttp as aiohttp_module

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"- CPU: {os.cpu_count()} cores ({platform.machine()}), memory {mem:.0f} GiB, Linux {platform.release()}",
        f"- Python {platform.python_version()}, aiohttp {aiohttp_module.__version__}, {nginx}",
        f"- Storage: {ROOT / 'data'} ({'same disk for prerec and nginx'})",
    ]


def write_report(rows: list[Row], plan: Plan, out: Path, elapsed: float, workers: list[int]) -> None:
    lines = [
        "# Benchmarks",
        "",
        "Produced by `make bench` (bench/bench.py) on "
        + time.strftime("%Y-%m-%d", time.gmtime())
        + f", in {elapsed / 60:.1f} minutes. Each figure is the median of {plan.rounds} rounds"
        " (min–max in brackets), measured in alternation with its reference in the same run"
        " (the reference first in even rounds, prerec first in odd ones); each timed upload and download"
        f" starts after an os.sync and a {plan.settle_seconds:g} s pause.",
        "",
        *machine(),
        "",
        "| measure | prerec | reference | ratio | goal | |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = f"{row.ratio:.2f}×" if row.ratio is not None else ""
        verdict = "" if row.passed is None else ("PASS" if row.passed else "MISS")
        reference = f"{row.reference_name}: {spread(row.reference, digits=1)}" if row.reference else ""
        lines.append(
            f"| {row.name} | {spread(row.ours, digits=1)} {row.unit} | {reference} | {ratio} | {row.goal} | {verdict} |"
        )
    lines += [
        "",
        "![ratios to the references](benchmarks.png)",
        "",
        "## How to rerun",
        "",
        "```sh",
        "make bench          # the full run, rewrites docs/benchmarks.md and docs/benchmarks.png",
        "make bench-smoke    # the same code on small sizes, in seconds (CI runs it)",
        "```",
        "",
        "References: nginx with `dav_methods PUT DELETE` (default `client_body_buffer_size`, and `1m`),",
        "sendfile on, no fsync; a bare aiohttp handler that reads and discards the body (bench/bare.py).",
        f"prerec hashes every upload (SHA-256) and fsyncs it before answering. Workers: {workers}.",
        "The S3 rows: prerec with PREREC_STORAGE_URL on a SeaweedFS (`weed mini`, loopback) against",
        "aiobotocore talking to that same SeaweedFS from the bench's process.",
        "",
    ]
    out.write_text("\n".join(lines))


def chart(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [(row.name, row.ratio, row.passed) for row in rows if row.ratio is not None]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(ratios) + 1.2))
    names = [name for name, _, _ in ratios][::-1]
    values = [value for _, value, _ in ratios][::-1]
    colors = ["#2e7d32" if passed else "#c62828" if passed is False else "#607d8b" for _, _, passed in ratios][::-1]
    ax.barh(names, values, color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("prerec / reference (median; green: goal met, red: missed)")
    ax.set_title("prerec against its references, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main(plan: Plan, out_dir: Path | None, workers_list: list[int]) -> int:
    began = time.monotonic()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=ROOT / "data"))
    fleet = Fleet(work)
    rows: list[Row] = []
    try:
        server = embedded.start(work)
        database_url = server.get_uri()
        from prerec.__main__ import migrate

        await asyncio.to_thread(migrate, database_url)

        bodies = {
            "big": make_body(work / "big.ogg", plan.big),
            "medium": make_body(work / "medium.ogg", plan.medium),
            "concurrent": make_body(work / "concurrent.ogg", plan.concurrent_size),
            "tiny": make_body(work / "tiny.ogg", plan.tiny),
        }
        nginx = start_nginx(fleet)
        bare = start_bare(fleet)
        for workers in workers_list:
            rows += await measure(fleet, plan, database_url, bodies, nginx, bare, workers)
        rows += await s3_rows(fleet, plan, database_url, bodies)
        sse_urls = [start_prerec(fleet, database_url, f"sse{i}")[0] for i in range(3)]
        fanout = await sse_fanout(sse_urls, plan, bodies["tiny"].read_bytes())
        p50, p99 = percentile(fanout, 50) * 1000, percentile(fanout, 99) * 1000
        rows.append(
            Row(f"SSE fan-out to {plan.subscribers} subscribers over 3 replicas, p50", "ms", [p50], passed=None)
        )
        rows.append(
            Row(
                f"SSE fan-out to {plan.subscribers} subscribers over 3 replicas, p99",
                "ms",
                [p99],
                goal="< 50 ms",
                passed=p99 < 50,
            )
        )
        # Two replicas on one database and one storage folder, as a fleet behind a balancer.
        pair = [start_prerec(fleet, database_url, f"resume{i}", storage="resume")[0] for i in range(2)]
        rows += latency_rows(
            f"tus resume on another replica after a dropped link, HEAD + next PATCH ({plan.resumes} uploads)",
            await resumes(pair, database_url, plan.resumes, dead=False),
            0.1,
            "< 100 ms",
        )
        rows += latency_rows(
            f"tus lease takeover from a dead connection, HEAD + next PATCH ({plan.takeovers} uploads)",
            await resumes(pair, database_url, plan.takeovers, dead=True),
            2.0,
            "< 2 s",
        )
    except BaseException:
        fleet.show_errors()
        raise
    finally:
        fleet.stop()
        with contextlib.suppress(Exception):
            server.cleanup()  # type: ignore[possibly-undefined]
        shutil.rmtree(work, ignore_errors=True)

    elapsed = time.monotonic() - began
    for row in rows:
        verdict = "" if row.passed is None else ("PASS" if row.passed else "MISS")
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        print(f"{verdict:4} {row.name}: {spread(row.ours, digits=1)} {row.unit} {ratio} {row.goal}")
    print(f"bench finished in {elapsed:.0f} s")
    if out_dir is not None:
        write_report(rows, plan, out_dir / "benchmarks.md", elapsed, workers_list)
        chart(rows, out_dir / "benchmarks.png")
        print(f"wrote {out_dir / 'benchmarks.md'} and {out_dir / 'benchmarks.png'}")
    return 0


async def measure(
    fleet: Fleet, plan: Plan, database_url: str, bodies: dict[str, Path], nginx: str, bare: str, workers: int
) -> list[Row]:
    tag = f"{workers} worker" + ("s" if workers > 1 else "")
    url, process = start_prerec(fleet, database_url, f"prerec-w{workers}", workers)
    pids = [process.pid] + [int(p) for p in _children(process.pid)]
    key = f"{url}/prerecordings/{EVENT}"
    mb = 1 / 2**20
    put_big = Row(f"PUT {plan.big >> 20} MiB chunked [{tag}]", "MB/s", [], "nginx DAV, default buffers")
    put_big_1m = Row(f"PUT {plan.big >> 20} MiB vs nginx with 1m buffers [{tag}]", "MB/s", [], "nginx DAV, 1m buffers")
    put_big_bare = Row(f"PUT {plan.big >> 20} MiB vs bare aiohttp discard [{tag}]", "MB/s", [], "bare aiohttp")
    put_big_disk = Row(
        f"PUT {plan.big >> 20} MiB vs the disk itself (write + fsync) [{tag}]", "MB/s", [], "disk write + fsync"
    )
    put_medium = Row(f"PUT {plan.medium >> 20} MiB chunked [{tag}]", "MB/s", [], "nginx DAV, default buffers")
    get_big = Row(f"GET {plan.big >> 20} MiB [{tag}]", "MB/s", [], "nginx sendfile")
    many = Row(
        f"{plan.concurrent} concurrent {plan.concurrent_size >> 20} MiB PUTs, wall time [{tag}]",
        "s",
        [],
        "nginx DAV",
    )
    rss = Row(f"peak RSS (largest process) during {plan.big >> 20} MiB PUT and GET [{tag}]", "MB", [])
    sampler = RssSampler(pids)
    big = plan.big * mb

    async def our_puts() -> None:
        secs = await settled(plan, sampler.during(put(f"{key}/2024-01-01T00:00", bodies["big"])))
        for row in (put_big, put_big_1m, put_big_bare, put_big_disk):
            row.ours.append(big / secs)
        put_medium.ours.append(plan.medium * mb / await settled(plan, put(f"{key}/2024-01-02T00:00", bodies["medium"])))

    async def reference_puts() -> None:
        put_big.reference.append(big / await settled(plan, put(f"{nginx}/default/big.ogg", bodies["big"])))
        put_big_1m.reference.append(big / await settled(plan, put(f"{nginx}/buf1m/big.ogg", bodies["big"])))
        put_big_bare.reference.append(big / await settled(plan, put(f"{bare}/discard", bodies["big"])))
        disk_write = asyncio.to_thread(_disk_write, fleet.work / "disk-probe", plan.big)
        put_big_disk.reference.append(big / await settled(plan, disk_write))
        medium = put(f"{nginx}/default/medium.ogg", bodies["medium"])
        put_medium.reference.append(plan.medium * mb / await settled(plan, medium))

    async def our_get() -> None:
        get_big.ours.append(big / await settled(plan, sampler.during(get(f"{key}/2024-01-01T00:00"))))

    async def reference_get() -> None:
        get_big.reference.append(big / await settled(plan, get(f"{nginx}/default/big.ogg")))

    for round_ in range(plan.rounds):
        await in_turn(round_, our_puts, reference_puts)
        await in_turn(round_, our_get, reference_get)
        # New keys every round: creates, as nginx's side creates new files.
        ours = [f"{key}/2024-02-{round_ + 1:02d}T00:{i // 60:02d}:{i % 60:02d}" for i in range(plan.concurrent)]
        theirs = [f"{nginx}/default/many/{round_}-{i}.ogg" for i in range(plan.concurrent)]

        async def our_many(urls: list[str] = ours) -> None:
            many.ours.append(await settled(plan, concurrent_puts(urls, bodies["concurrent"])))

        async def reference_many(urls: list[str] = theirs) -> None:
            many.reference.append(await settled(plan, concurrent_puts(urls, bodies["concurrent"])))

        await in_turn(round_, our_many, reference_many)
    rss.ours.append(sampler.peak / 1e6)
    # Resumable uploads (tus) against a plain PUT of the same file, both from this process's
    # aiohttp client, alternated: the protocol's own cost, not a client's.
    tus_one = Row(f"tus {plan.big >> 20} MiB in one PATCH [{tag}]", "MB/s", [], "plain PUT, same client")
    tus_chunks = Row(f"tus {plan.big >> 20} MiB in 5 MiB PATCHes [{tag}]", "MB/s", [], "plain PUT, same client")
    tus_rss = Row(f"peak RSS (largest process) during {plan.big >> 20} MiB tus uploads [{tag}]", "MB", [])
    tus_flat = Row(
        f"peak RSS, {plan.big >> 20} MiB tus uploads vs a {plan.medium >> 20} MiB one [{tag}]",
        "MB",
        [],
        f"{plan.medium >> 20} MiB tus upload",
    )
    tus_sampler = RssSampler(pids)
    medium_sampler = RssSampler(pids)
    async with aiohttp.ClientSession() as session:
        for round_ in range(plan.rounds):
            start = f"2024-05-{round_ + 1:02d}T00:00"

            async def plain_put(start: str = start) -> None:
                reference = big / await settled(plan, aio_put(session, f"{key}/{start}", bodies["big"]))
                tus_one.reference.append(reference)
                tus_chunks.reference.append(reference)

            async def tus_uploads(start: str = start) -> None:
                for row, chunk in ((tus_one, None), (tus_chunks, 5 << 20)):
                    upload = tus_sampler.during(aio_tus(session, url, start, bodies["big"], chunk))
                    row.ours.append(big / await settled(plan, upload))

            await in_turn(round_, tus_uploads, plain_put)
            medium_start = f"2024-06-{round_ + 1:02d}T00:00"
            await medium_sampler.during(aio_tus(session, url, medium_start, bodies["medium"], None))
    tus_rss.ours.append(tus_sampler.peak / 1e6)
    # Flat in size: four times the bytes may not cost more than a few buffers' noise.
    tus_flat.ours.append(tus_sampler.peak / 1e6)
    tus_flat.reference.append(medium_sampler.peak / 1e6)
    judge_ratio(tus_flat, at_most=1.15)
    judge_ratio(tus_one, at_least=0.9)
    judge_ratio(tus_chunks, at_least=0.7)
    tus_rss.goal, tus_rss.passed = "< 80 MB", tus_rss.ours[0] < 80
    # What a server keeps once a burst is over: memory freed but never handed back would stay.
    await burst_of_puts([f"{key}/2024-04-01T00:{i // 60:02d}:{i % 60:02d}" for i in range(plan.burst)], 1 << 20)
    await asyncio.sleep(plan.idle_seconds)
    idle_rss = sampler.rss() / 1e6
    idle = Row(
        f"idle RSS (largest process) after a burst of {plan.burst} concurrent 1 MiB PUTs [{tag}]",
        "MB",
        [idle_rss],
        goal="< 100 MB",
        passed=idle_rss < 100,
    )
    judge_ratio(put_big, at_least=1.0)
    judge_ratio(put_big_bare, at_least=0.75)
    judge_ratio(get_big, at_least=1.0)
    judge_ratio(many, at_most=1.3)
    rss.goal, rss.passed = "< 80 MB", rss.ours[0] < 80

    # Request rates, 64 connections.
    await put(f"{key}/2024-03-01T00:00", bodies["tiny"])
    shutil.copy(bodies["tiny"], fleet.work / "nginx-root" / "tiny.ogg")
    ping = Row(f"/ping rate [{tag}]", "req/s", [], "nginx return 204")
    head = Row(f"HEAD of a prerecording rate (ab) [{tag}]", "req/s", [], "prerec /ping (ab)")
    tiny = Row(f"GET of a {plan.tiny >> 10} KiB prerecording rate [{tag}]", "req/s", [], "prerec /ping")
    tiny_nginx = Row(
        f"GET of a {plan.tiny >> 10} KiB prerecording vs nginx static [{tag}]", "req/s", [], "nginx static"
    )
    for _ in range(plan.rounds):
        ping_rate = await wrk(f"{url}/ping", plan.wrk_seconds)
        ping.ours.append(ping_rate)
        ping.reference.append(await wrk(f"{nginx}/ping", plan.wrk_seconds))
        head.ours.append(await ab(f"{key}/2024-03-01T00:00", plan.wrk_seconds, head=True))
        head.reference.append(await ab(f"{url}/ping", plan.wrk_seconds))
        tiny_rate = await wrk(f"{key}/2024-03-01T00:00", plan.wrk_seconds)
        tiny.ours.append(tiny_rate)
        tiny.reference.append(ping_rate)
        tiny_nginx.ours.append(tiny_rate)
        tiny_nginx.reference.append(await wrk(f"{nginx}/tiny.ogg", plan.wrk_seconds))
    judge_ratio(head, at_least=0.5)
    judge_ratio(tiny, at_least=0.3)

    rows = [
        put_big,
        put_big_1m,
        put_big_bare,
        put_big_disk,
        put_medium,
        get_big,
        many,
        rss,
        tus_one,
        tus_chunks,
        tus_rss,
        tus_flat,
        idle,
        ping,
        head,
        tiny,
        tiny_nginx,
    ]
    if workers == 1:
        latencies = await list_latencies(url, database_url, plan)
        rows.append(Row(f"list among {plan.list_rows:,} rows, p50", "ms", [percentile(latencies, 50) * 1000]))
        p99 = percentile(latencies, 99) * 1000
        rows.append(Row(f"list among {plan.list_rows:,} rows, p99", "ms", [p99], goal="< 10 ms", passed=p99 < 10))
    process.terminate()
    process.wait(30)
    return rows


def _children(pid: int) -> Iterator[str]:
    with contextlib.suppress(OSError):
        yield from Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="small sizes, one round, nothing written to docs/")
    parser.add_argument("--workers", default="1,2", help="PREREC_WORKERS values to measure (default 1,2)")
    args = parser.parse_args()
    (ROOT / "data").mkdir(exist_ok=True)
    chosen = SMOKE if args.smoke else FULL
    target = None if args.smoke else ROOT / "docs"
    sys.exit(asyncio.run(main(chosen, target, [int(n) for n in args.workers.split(",")])))
