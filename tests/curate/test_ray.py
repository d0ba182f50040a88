"""executor=ray: dedup, filter (quality and decontamination) and tokenize as Ray tasks on a local 2-CPU cluster
write the same bytes as the local run; a user error in a task is its own one line; Ray missing is one line."""

import functools
import json
import os
import sys
from pathlib import Path

import pytest

from slmforge.cli import main
from slmforge.curate.dedup import DedupConfig, dedup
from slmforge.curate.documents import Document, read_documents, write_jsonl
from slmforge.curate.executor import executor
from slmforge.curate.filters import FilterConfig, filter_corpus
from slmforge.tokens import shards
from slmforge.tokens.tokenizer import train_tokenizer
from tests.curate.test_dedup import planted  # noqa: F401 (the planted-duplicate corpus fixture)
from tests.curate.test_filters import BROKEN, _prose


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster of 2 CPUs for the module; executor=ray uses it as it is and leaves it open."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'slmforge[ray]'")
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # a new one, even beside a running cluster
    yield ray
    ray.shutdown()


def _files(folder: Path) -> dict:
    """Every output file under ``folder`` by relative path: its bytes, or for JSON its data less timings and the
    config (which names the executor); config.yaml is left out for the same reason."""
    return {str(p.relative_to(folder)): _without_timings(json.loads(p.read_text())) if p.suffix == ".json"
            else p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "config.yaml"}


def _without_timings(data):
    if isinstance(data, dict):
        return {k: _without_timings(v) for k, v in data.items()
                if k not in ("seconds", "signature_seconds", "cluster_seconds", "config")}
    return data


def test_dedup_on_ray_equals_the_local_run(planted, ray_cluster, tmp_path):
    path, _ = planted
    local = DedupConfig(inputs=[str(path)], out_dir=str(tmp_path / "local"), num_workers=1)
    on_ray = DedupConfig(inputs=[str(path)], out_dir=str(tmp_path / "ray"), num_workers=1, executor="ray")
    want = dedup(local, num_shards=3)["clusters"]
    got = dedup(on_ray, num_shards=3)["clusters"]
    assert want["num_removed"] >= 100 and got["num_removed"] == want["num_removed"]
    assert got["num_shards"] == 3 and got["config"]["executor"] == "ray"
    local_files, ray_files = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert "kept/00002-of-00003.jsonl" in ray_files and "removed.jsonl" in ray_files and "removed.npy" in ray_files
    assert ray_files == local_files  # kept shards, removed.jsonl, removed.npy, signatures: the same bytes
    kept = {d.id for d in read_documents(tmp_path / "ray" / "kept")}
    assert len(kept) == 640 - want["num_removed"]
    # The default number of shards under Ray is one per CPU of the cluster: 2 here.
    dedup(DedupConfig(inputs=[str(path)], out_dir=str(tmp_path / "ray2"), num_workers=1, executor="ray"))
    assert sorted(p.name for p in (tmp_path / "ray2" / "kept").iterdir()) == ["00000-of-00002.jsonl",
                                                                              "00001-of-00002.jsonl"]
    assert {d.id for d in read_documents(tmp_path / "ray2" / "kept")} == kept


def test_dedup_stages_on_ray_and_the_cli(planted, ray_cluster, tmp_path, capsys):
    """The job-array stages one after another, each on Ray, through the CLI: the same kept shards."""
    path, _ = planted
    dedup(DedupConfig(inputs=[str(path)], out_dir=str(tmp_path / "local"), num_workers=1), num_shards=2)
    for stage in ("signatures", "clusters", "write"):
        assert main(["dedup", f"inputs={path}", f"out_dir={tmp_path / 'ray'}", "num_workers=1", "executor=ray",
                     "--stage", stage, "--num-shards", "2"]) == 0
    out = capsys.readouterr().out
    assert "dedup signatures 1-of-2" in out and "dedup write 1-of-2" in out
    for name in ("kept/00000-of-00002.jsonl", "kept/00001-of-00002.jsonl", "removed.jsonl"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def test_filter_and_decontamination_on_ray_equal_the_local_run(ray_cluster, tmp_path):
    eval_items = [{"question": _prose(900 + i, 40), "answer": "42"} for i in range(3)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in eval_items))
    docs = [Document(f"ok{i}", _prose(i)) for i in range(30)]
    docs += [Document(f"bad_{rule}", make()) for rule, make in BROKEN.items()]
    docs += [Document(f"leak{i}", _prose(500 + i) + "\n" + eval_items[i]["question"]) for i in range(3)]
    write_jsonl(tmp_path / "in.jsonl", docs)
    common = dict(inputs=[str(tmp_path / "in.jsonl")], eval_paths=[str(tmp_path / "eval.jsonl")])
    want = filter_corpus(FilterConfig(out_dir=str(tmp_path / "local"), **common), num_shards=3)
    got = filter_corpus(FilterConfig(out_dir=str(tmp_path / "ray"), executor="ray", **common), num_shards=3)
    assert want["removed"]["contamination"] == 3 and want["num_kept"] == 30
    assert got["num_kept"] == want["num_kept"] and got["removed"] == want["removed"]
    assert got["eval_items"] == want["eval_items"] and got["num_shards"] == 3
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")  # kept/, removed/, reports/ (less timings)


def test_tokenize_on_ray_writes_the_same_shards(planted, ray_cluster, tmp_path, monkeypatch):
    path, _ = planted
    texts = [d.text for d in read_documents(path)]
    train_tokenizer(texts[:50], 300, tmp_path / "tok.json")
    monkeypatch.setattr(shards, "_BATCH_CHARS", 100_000)  # about 15 batches, so that tasks overlap
    local = shards.tokenize_to_shards(texts, tmp_path / "tok.json", tmp_path / "local", num_workers=1,
                                      shard_tokens=50_000)
    with executor(FilterConfig(executor="ray"), "tokenize") as ex:
        assert ex.remote and ex.num_cpus == 2
        assert os.getpid() not in set(ex.map(lambda _: os.getpid(), range(4)))  # tasks run in Ray's workers
        got = shards.tokenize_to_shards(texts, tmp_path / "tok.json", tmp_path / "ray", shard_tokens=50_000,
                                        map_batches=functools.partial(ex.map, in_cwd=False))
    assert got["num_tokens"] == local["num_tokens"] > 100_000 and len(got["files"]) > 2
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")  # tokens-*.bin, docs-*.npy, meta.json


def test_a_user_error_in_a_task_is_its_own_one_line(ray_cluster, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"broken json\n{"id": 1}\n')
    cfg = DedupConfig(inputs=[str(tmp_path / "bad.jsonl")], out_dir=str(tmp_path / "out"), executor="ray")
    with pytest.raises(ValueError, match="0 documents read") as info:
        dedup(cfg, num_shards=2)
    assert type(info.value) is ValueError and not (tmp_path / "out").exists()  # not a RayTaskError, nothing written
    assert main(["dedup", f"inputs={tmp_path / 'bad.jsonl'}", f"out_dir={tmp_path / 'out'}", "executor=ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("slmforge dedup: error: dedup: 0 documents read") and "Traceback" not in "".join(err)


def test_executor_errors_need_no_cluster(tmp_path, monkeypatch):
    cfg = FilterConfig(inputs=["x.jsonl"], out_dir=str(tmp_path / "out"), executor="ray", decontaminate=False)
    with pytest.raises(ValueError, match="drop --shard-index or set executor=local"):
        filter_corpus(cfg, shard_index=0, num_shards=2)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as where it is not installed
    with pytest.raises(ValueError, match=r"pip install 'slmforge\[ray\]'"):
        filter_corpus(cfg, num_shards=2)
    assert main(["filter", "inputs=x.jsonl", "executor=rya"]) == 2
    assert not (tmp_path / "out").exists()
