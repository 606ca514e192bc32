"""The README's first command runs in the suite, so it cannot silently break."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from PIL import Image

from testkit.fleet import run_cli


def test_darkroom_demo_renders_a_batch_and_stops_everything(tmp_path: Path) -> None:
    done = run_cli("demo", "--data-dir", str(tmp_path / "data"), "--steps", "3", "--size", "64", cwd=tmp_path,
                   timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    sheet = re.search(r"contact sheet: file://(\S+)", done.stdout)
    assert sheet, done.stdout
    with Image.open(sheet.group(1)) as img:
        assert img.width >= 64 * 3
    batch = Path(sheet.group(1)).parent
    assert len(list(batch.glob("[0-9]*.png"))) >= 8
    assert (batch / "manifest.json").exists()
    # Everything it started is gone: the Redis port no longer answers.
    port = int(re.search(r"Redis on redis://[^@]*?127\.0\.0\.1:(\d+)", done.stdout).group(1))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert "stopped the worker and Redis" in done.stdout


def test_ctrl_c_during_the_demo_stops_the_worker_and_redis(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from testkit.fleet import REPO

    demo = subprocess.Popen([sys.executable, "-m", "darkroom", "demo", "--data-dir", str(tmp_path / "data"),
                             "--steps", "3", "--size", "64"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seen = []
    assert demo.stdout is not None
    for line in demo.stdout:
        seen.append(line)
        if line.startswith("[3/5] worker pid"):
            break
    worker_pid = int(re.search(r"worker pid (\d+)", seen[-1]).group(1))
    port = int(re.search(r"127\.0\.0\.1:(\d+)", "".join(seen)).group(1))
    demo.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
    rest, _ = demo.communicate(timeout=120)
    assert demo.returncode == 130, "".join(seen) + rest
    assert "stopped the worker and Redis" in rest and "Traceback" not in rest
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    try:
        os.kill(worker_pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "the worker outlived the demo"
