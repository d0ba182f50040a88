"""CI is loud about missing shared data: .ci/run stops when ../shared/data is absent (CI=true) and sets
SLMFORGE_REQUIRE_DATA=1, under which a test that reads shared data fails instead of skipping."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_TEST = "tests/curate/test_documents.py::test_reads_real_gsm8k"  # reads <data>/gsm8k/test.jsonl


@pytest.fixture
def fake_make(tmp_path):
    """A `make` first on PATH that records its arguments and SLMFORGE_REQUIRE_DATA instead of running the suite."""
    bin_dir, log = tmp_path / "bin", tmp_path / "make.log"
    bin_dir.mkdir()
    (bin_dir / "make").write_text(f'#!/bin/sh\necho "$* require=${{SLMFORGE_REQUIRE_DATA:-unset}}" > {log}\n')
    (bin_dir / "make").chmod(0o755)
    return bin_dir, log


def _ci_run(fake_make, **env):
    bin_dir, _ = fake_make
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "SLMFORGE_DATA_DIR", "SLMFORGE_REQUIRE_DATA")}
    return subprocess.run([str(REPO / ".ci" / "run")], env={**base, "PATH": f"{bin_dir}:{base['PATH']}", **env},
                          capture_output=True, text=True, timeout=60)


def test_ci_run_stops_when_the_shared_data_is_missing(tmp_path, fake_make):
    missing = tmp_path / "no-such-data"
    out = _ci_run(fake_make, CI="true", SLMFORGE_DATA_DIR=str(missing))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and f"shared data folder {missing} is missing" in out.stderr
    assert not fake_make[1].exists()  # the suite did not run (and skip)
    (tmp_path / "empty").mkdir()
    assert _ci_run(fake_make, CI="true", SLMFORGE_DATA_DIR=str(tmp_path / "empty")).returncode == 1


def test_ci_run_requires_the_data_in_ci_only(tmp_path, fake_make):
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    (data / "gsm8k" / "test.jsonl").write_text("{}\n")
    assert _ci_run(fake_make, CI="true", SLMFORGE_DATA_DIR=str(data)).returncode == 0
    assert fake_make[1].read_text() == "test require=1\n"
    assert _ci_run(fake_make, SLMFORGE_DATA_DIR=str(tmp_path / "none")).returncode == 0  # a developer: make test
    assert fake_make[1].read_text() == "test require=unset\n"


@pytest.mark.parametrize("require", ["", "1"])
def test_a_data_test_skips_or_fails_without_its_data(tmp_path, require):
    env = {**os.environ, "SLMFORGE_DATA_DIR": str(tmp_path / "none"), "SLMFORGE_REQUIRE_DATA": require}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", DATA_TEST],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if require:
        assert out.returncode == 1 and "ERROR at setup of test_reads_real_gsm8k" in out.stdout
        assert f"shared data missing: {tmp_path / 'none' / 'gsm8k' / 'test.jsonl'}" in out.stdout
    else:
        assert out.returncode == 0 and "SKIPPED [1]" in out.stdout and "shared data not present" in out.stdout
