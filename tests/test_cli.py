"""`kvstore up` as a newcomer runs it: comes up, serves the page and metrics, stops on Ctrl-C."""
from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from kvstore.cli import main

pytestmark = pytest.mark.cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


def test_up_serves_and_stops_cleanly_on_ctrl_c(tmp_path):
    port = _free_port()
    # Ray's token auth as `kvstore up` sets it (on, with a token of its own): nothing inherited.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["KVSTORE_AUTH_TOKEN"] = "cli-test-token"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "up", "--set", "host_tier_bytes=64MiB", "--set", "slot_bytes=64KiB",
         "--set", f"http_port={port}", "--set", "shm_prefix=kvstore-clitest"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while _get(base + "/healthz")[0] != 200:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "kvstore up did not come up in 90 s"
            time.sleep(0.5)
        assert glob.glob("/dev/shm/kvstore-clitest-*"), "the node's host arena should exist"
        assert _get(base + "/v1/stats")[0] == 401
        code, page = _get(base + "/", "cli-test-token")
        assert code == 200 and "1</b>nodes" in page
        code, metrics = _get(base + "/metrics", "cli-test-token")
        assert code == 200 and "kvstore_tier_capacity_bytes" in metrics
        status = subprocess.run([sys.executable, "-m", "kvstore", "status", "--url", base, "--token",
                                 "cli-test-token"], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "1 nodes" in status.stdout, status.stdout + status.stderr
    finally:
        os.killpg(proc.pid, signal.SIGINT) if proc.poll() is None else None
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "status page" in out and "stopping" in out
    assert "?token=" not in out and "cli-test-token" not in out  # no credential printed, none in a URL
    assert not glob.glob("/dev/shm/kvstore-clitest-*"), "Ctrl-C should remove the host arena"


def test_status_says_clearly_when_nothing_runs(capsys):
    assert main(["status", "--url", f"http://127.0.0.1:{_free_port()}", "--token", "x"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_bad_setting_is_named(capsys):
    assert main(["config", "--set", "host_tier_bytes=lots"]) == 2
    assert "host_tier_bytes='lots'" in capsys.readouterr().err
