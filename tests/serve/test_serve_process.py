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


def test_run_app_decodes_on_the_calling_thread_and_a_signal_ends_it_gracefully(tmp_path):
    """``run_app`` (what ``slmforge serve`` runs): the model decodes on the thread that called it, not on a thread
    of its own; SIGINT lets the stream in flight finish, then it returns."""
    import signal
    import threading

    from slmforge.checkpoint import load_for_inference
    from slmforge.serve.server import build_app, run_app

    model, tok, _ = load_for_inference(make_run(tmp_path, "main"), "cpu")
    threads, forward = set(), model.forward

    def recording(*args, **kwargs):
        threads.add(threading.current_thread().name)
        time.sleep(0.01)  # slow enough that the signal comes mid-stream
        return forward(*args, **kwargs)

    model.forward = recording
    port, lines = _free_port(), []

    def client() -> None:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        body = {"model": "main", "prompt": "Tom has", "max_tokens": 30, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not lines:
                    os.kill(os.getpid(), signal.SIGINT)  # mid-stream
                lines.append(line)

    thread = threading.Thread(target=client)
    thread.start()
    run_app(build_app(model, tok, "main", start_worker=False), port=port, log_level="warning")
    thread.join(30)
    assert threads == {threading.current_thread().name}
    assert [line for line in lines if line][-1] == "data: [DONE]"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path):
    run_dir = make_run(tmp_path, "busy")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "slmforge", "serve", str(run_dir), f"port={port}"],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"could not serve on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
