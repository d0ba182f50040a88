"""``slmforge serve`` as a real process on a tiny run folder: the API key from ``--api-key`` and from
$SLMFORGE_API_KEY; without it 401, with it 200."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import make_run

KEY = "sk-process-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run_dir, args: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "slmforge", "serve", str(run_dir), f"port={port}", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}"


def _wait_up(proc: subprocess.Popen, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"slmforge serve exited with {proc.returncode}: {proc.stdout.read()}"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    pytest.fail(f"slmforge serve did not answer /health within {timeout} s")


def test_serve_process_requires_the_api_key(tmp_path):
    run_dir = make_run(tmp_path, "proc")
    env = {k: v for k, v in os.environ.items() if k != "SLMFORGE_API_KEY"}
    # Both servers start at once: one keyed by the flag, one by the environment.
    servers = [_start(run_dir, ["--api-key", KEY], env), _start(run_dir, [], {**env, "SLMFORGE_API_KEY": KEY})]
    try:
        for proc, url in servers:
            _wait_up(proc, url)
            body = {"model": "proc", "prompt": "Tom has", "max_tokens": 2}
            for key, status in ((None, 401), ("sk-wrong", 401), (KEY, 200)):
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                assert httpx.get(url + "/v1/models", headers=headers, timeout=10).status_code == status
                r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)
                assert r.status_code == status, r.text
            assert r.json()["usage"]["completion_tokens"] >= 1
            assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0][
                "id"] == "proc"
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=10)
