"""The synthesizer against ``slmforge serve`` on loopback: the real command in a subprocess, batching requests
from 8 concurrent clients. An untrained tiny model writes gibberish, so most answers are rejected; what is
checked is the bookkeeping: every planned id ends up exactly once, in a shard or in rejects.jsonl."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx

from slmforge.config import merge
from slmforge.synth.jobs import SynthJob, synthesize
from tests.conftest import make_run


@contextmanager
def slmforge_serve(run_dir, *args):
    """``slmforge serve RUN`` on a free loopback port; yields its base URL and stops it with Ctrl-C."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "slmforge", "serve", str(run_dir), f"port={port}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "slmforge serve did not come up in 60 s"
                time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0  # a clean shutdown


def test_job_against_slmforge_server_every_id_once(tmp_path):
    run_dir = make_run(tmp_path / "run", "synth")
    template = tmp_path / "lax.yaml"
    template.write_text("seed: grid\nparser: section\nuser: 'Write about {topic} for {audience} as {style}.'\n"
                        "min_words: 0\n")
    out = tmp_path / "out"
    with slmforge_serve(run_dir, "model_name=tiny", "max_batch=8") as url:
        job = merge(SynthJob(), dict(
            name="serve", template=str(template), out_dir=str(out), topics=[f"topic {i}" for i in range(25)],
            audiences=["children", "adults"], styles=["a story", "a list"], samples_per_item=2,
            teacher=dict(base_url=url + "/v1", model="tiny", concurrency=8, max_tokens=6, timeout=60)))
        summary = synthesize(job, progress=False)
        again = synthesize(job, progress=False)
    written = [json.loads(x)["id"] for x in (out / "shards" / "00000.jsonl").read_text().splitlines()]
    rejects = out / "rejects.jsonl"
    rejected_lines = rejects.read_text().splitlines() if rejects.exists() else []
    rejected = [json.loads(x)["id"] for x in rejected_lines]
    assert summary["planned"] == summary["requested"] == 200 and summary["failed"] == 0 and summary["complete"]
    assert len(written) + len(rejected) == len(set(written) | set(rejected)) == 200
    # The server took every request: rejects come from the answers' content, none from an HTTP error.
    assert not any(json.loads(x)["reason"].startswith("http") for x in rejected_lines)
    assert summary["usage"]["completion_tokens"] <= 6 * 200 and summary["usage"]["prompt_tokens"] > 200
    assert again["requested"] == 0 and again["skipped_existing"] == 200
