"""Secrets are never written (issue 15): an API key reaches the teacher's server but no printed output and no file
of the job's folder; it comes from the environment or a file; every config dump masks fields named like secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slmforge.cli import main
from slmforge.cli.model import ServeConfig
from slmforge.config.loading import dump_yaml, mask_secret, masked
from slmforge.synth.jobs import SynthJob
from tests.synth.synth_fault_server import FaultServer

SECRET = "sk-proj-Zq8wE3rT5yU7iO9pA1sD"
OTHER = "sk-live-Mn4bV6cX8zL0kJ2hG5fF"


def _job(tmp_path: Path) -> Path:
    job = dict(name="secret", template="math", out_dir=str(tmp_path / "out"), topics=["a", "b"],
               audiences=["grade 3"], styles=["two steps"],
               teacher=dict(model="mock", concurrency=2, timeout=2.0, backoff_base=0.01, backoff_max=0.05))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _files_with(folder: Path, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def _synth(tmp_path, capsys, *keys: str, env: dict | None = None, monkeypatch=None) -> tuple[int, str, set]:
    """Run the job against an honest fake teacher; (exit code, everything printed, Authorization headers seen)."""
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    with FaultServer(plan=lambda rid, attempt: "ok") as server:
        rc = main(["synth", "--job", str(_job(tmp_path)), f"teacher.base_url={server.base_url}", *keys])
    out, err = capsys.readouterr()
    return rc, out + err, set(server.authorizations)


def test_a_key_given_directly_is_used_but_never_printed_or_saved(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OTHER)
    rc = main(["synth", "--job", str(_job(tmp_path)), "--dry-run", f"teacher.api_key={SECRET}"])
    printed = "".join(capsys.readouterr())
    assert rc == 0 and SECRET not in printed and "api_key: sk-...****" in printed
    assert "teacher.api_key_env=VAR" in printed  # the note pointing to the better ways
    rc, printed, seen = _synth(tmp_path, capsys, f"teacher.api_key={SECRET}")
    assert rc == 0 and seen == {f"Bearer {SECRET}"}  # the direct key beats $OPENAI_API_KEY
    assert SECRET not in printed and _files_with(tmp_path / "out", SECRET) == []
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["teacher"]["api_key"] == "sk-...****"
    assert (tmp_path / "out" / "shards").is_dir()  # the job did write its folder: the key is simply not in it


def test_key_from_a_named_environment_variable(tmp_path, capsys, monkeypatch):
    rc, printed, seen = _synth(tmp_path, capsys, "teacher.api_key_env=MY_TEACHER_KEY",
                               env={"MY_TEACHER_KEY": SECRET, "OPENAI_API_KEY": OTHER}, monkeypatch=monkeypatch)
    assert rc == 0 and seen == {f"Bearer {SECRET}"}
    assert SECRET not in printed and _files_with(tmp_path / "out", SECRET) == []
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["teacher"]
    assert (saved["api_key"], saved["api_key_env"]) == ("", "MY_TEACHER_KEY")


def test_key_from_a_file(tmp_path, capsys, monkeypatch):
    key_file = tmp_path / "teacher.key"
    key_file.write_text(f"{SECRET}\n")
    rc, printed, seen = _synth(tmp_path, capsys, f"teacher.api_key_file={key_file}",
                               env={"OPENAI_API_KEY": OTHER}, monkeypatch=monkeypatch)
    assert rc == 0 and seen == {f"Bearer {SECRET}"}
    assert SECRET not in printed and _files_with(tmp_path / "out", SECRET) == []


def test_openai_api_key_stays_the_default(tmp_path, capsys, monkeypatch):
    rc, printed, seen = _synth(tmp_path, capsys, env={"OPENAI_API_KEY": SECRET}, monkeypatch=monkeypatch)
    assert rc == 0 and seen == {f"Bearer {SECRET}"} and SECRET not in printed
    assert _files_with(tmp_path / "out", SECRET) == []


@pytest.mark.parametrize("key,message", [
    ("teacher.api_key_env=NO_SUCH_VAR_1234", "teacher.api_key_env=NO_SUCH_VAR_1234: $NO_SUCH_VAR_1234 is not set"),
    ("teacher.api_key_file={tmp}/missing.key", "teacher.api_key_file={tmp}/missing.key: cannot read it"),
    ("teacher.api_key_file={tmp}/empty.key", "teacher.api_key_file={tmp}/empty.key: the file is empty"),
    ("teacher.api_key=sk-...****", "teacher.api_key holds a masked key"),
])
def test_a_missing_key_is_one_line_and_leaves_nothing(key, message, tmp_path, capsys):
    (tmp_path / "empty.key").write_text("\n")
    with FaultServer(plan=lambda rid, attempt: "ok") as server:
        rc = main(["synth", "--job", str(_job(tmp_path)), f"teacher.base_url={server.base_url}",
                   key.format(tmp=tmp_path)])
        assert not server.attempts  # no request was sent
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1].startswith(f"slmforge synth: error: {message.format(tmp=tmp_path)}")
    assert not (tmp_path / "out").exists()


def test_config_dumps_mask_fields_named_like_secrets():
    data = {"api_key": SECRET, "api_key_env": "MY_VAR", "api_key_file": "/keys/k", "max_tokens": 5, "tokenizer": "t",
            "teacher": {"openai_api_key": SECRET, "password": "hunter2"}, "list": [{"hf_token": SECRET}],
            "client_secret": "", "flops_per_token": 3.0}
    assert masked(data) == {"api_key": "sk-...****", "api_key_env": "MY_VAR", "api_key_file": "/keys/k",
                            "max_tokens": 5, "tokenizer": "t", "teacher": {"openai_api_key": "sk-...****",
                                                                          "password": "***"},
                            "list": [{"hf_token": "sk-...****"}], "client_secret": "", "flops_per_token": 3.0}
    assert data["api_key"] == SECRET  # a copy: the config itself keeps the key
    assert mask_secret("short") == "***" and mask_secret("") == ""
    job = SynthJob()
    job.teacher.api_key = SECRET
    assert SECRET not in dump_yaml(job) and SECRET not in dump_yaml(ServeConfig(api_key=SECRET))


def test_serve_never_prints_its_api_key(tmp_path, capsys):
    rc = main(["serve", str(tmp_path / "no-run"), f"api_key={SECRET}", "port=99999"])
    out, err = capsys.readouterr()
    assert rc == 2 and "port=99999" in err and SECRET not in out + err
