"""A run folder knows what made it: ``slmforge run`` on an existing folder refuses a changed key that a built stage
depends on (naming it), ``--force`` rebuilds from the first affected stage, harmless changes pass, and the report
counts the pipeline time of every invocation."""

import json

import pytest

from slmforge import pipeline
from slmforge.cli import main
from slmforge.config import dump_yaml, load_config
from slmforge.curate.documents import read_documents
from slmforge.runs import RunDir


def tiny(tmp_path, *extra: str) -> list[str]:
    """``key=value`` items of a run that takes a few seconds: 1 layer, d_model 32, 4 steps."""
    return [f"out_dir={tmp_path}", "name=fp", "model.vocab_size=300", "model.d_model=32", "model.num_layers=1",
            "model.max_seq_len=32", "data.num_train_docs=120", "data.num_val_docs=20", "data.num_test_docs=20",
            "data.seq_len=32", "data.num_workers=1", "train.batch_size=4", "train.max_steps=4",
            "train.warmup_steps=1", "train.eval_every=4", "train.ckpt_every=4", "train.eval_batches=1",
            "sample_tokens=4", *extra]


@pytest.fixture
def built(tmp_path):
    assert main(["run", *tiny(tmp_path)]) == 0
    return RunDir.at(tmp_path / "fp")


def test_changed_data_key_is_refused_before_anything_is_written(built, tmp_path, capsys):
    config, train_docs = built.config.read_bytes(), built.split_data("train").read_bytes()
    capsys.readouterr()
    assert main(["run", *tiny(tmp_path, "data.num_train_docs=160")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("slmforge run: error: ")
    assert "data.num_train_docs (120 -> 160)" in err and "'data'" in err
    assert "name=" in err and "--force" in err and "Traceback" not in err
    assert built.config.read_bytes() == config and built.split_data("train").read_bytes() == train_docs


def test_force_rebuilds_from_the_first_affected_stage(built, tmp_path, capsys):
    old_tokenizer = built.tokenizer.read_bytes()
    assert main(["run", *tiny(tmp_path, "data.num_train_docs=160"), "--force"]) == 0
    assert "--force: data.num_train_docs changed" in capsys.readouterr().out
    assert sum(1 for _ in read_documents(built.split_data("train"))) == 160
    assert load_config(built.config).data.num_train_docs == 160
    assert built.tokenizer.read_bytes() != old_tokenizer  # trained again, on the new corpus
    steps = [r["step"] for r in map(json.loads, built.metrics.read_text().splitlines()) if "val_loss" in r]
    assert steps == [4]  # the old run's metrics were deleted with its checkpoints, not appended to
    report = json.loads(built.report_json.read_text())
    assert report["invocations"] == 1  # rebuilt from the first stage: the earlier time no longer counts


def test_raising_max_steps_continues_and_the_report_counts_every_invocation(built, tmp_path):
    first = json.loads(built.report_json.read_text())
    assert first["invocations"] == 1 and first["train"]["steps"] == 4
    assert main(["run", *tiny(tmp_path, "train.max_steps=6", "sample_prompts=[\"Once\"]")]) == 0
    report = json.loads(built.report_json.read_text())
    assert report["train"]["steps"] == 6 and report["samples"][0]["prompt"] == "Once"
    seconds = json.loads(built.pipeline_time.read_text())["invocation_seconds"]
    assert len(seconds) == 2 and seconds[0] == pytest.approx(first["seconds_total"], abs=0.5)
    assert report["invocations"] == 2
    assert report["seconds_total"] == pytest.approx(seconds[0] + report["seconds_this_invocation"])
    assert report["seconds_total"] > report["seconds_this_invocation"]
    assert " s over 2 invocations of `slmforge run` |" in built.report_md.read_text()


def _folder(tmp_path, *outputs: str):
    """A run folder holding config.yaml and empty stand-ins for the given outputs (no training needed)."""
    cfg = load_config(None, tiny(tmp_path))
    run = RunDir.of(cfg)
    run.root.mkdir(parents=True)
    run.config.write_text(dump_yaml(cfg))
    for name in outputs:
        path = getattr(run, name)
        path.mkdir() if name in ("data", "checkpoints", "shards") else path.write_text("{}")
    return run


def _check(tmp_path, *overrides: str, force: bool = False) -> None:
    pipeline.check_config_change(load_config(None, tiny(tmp_path, *overrides)), force)


def test_only_changes_to_built_stages_block(tmp_path):
    run = _folder(tmp_path, "data")
    _check(tmp_path, "model.d_model=64", "train.lr_peak=0.01")  # nothing trained yet: free to change
    _check(tmp_path, "data.text_split=line", "data.val_fraction=0.5")  # a procedural corpus reads no files
    _check(tmp_path, "curate.dedup_threshold=0.5")  # dedup is off
    _check(tmp_path, "train.eval_every=2", "train.ckpt_every=2", "data.num_workers=2", "sample_tokens=9")
    with pytest.raises(ValueError, match=r"data.families \(\[.*\] -> \[\"sorting\"\]\), which invalidates the stage "
                                         r"'data' and what follows it \(data\)"):
        _check(tmp_path, "data.families=[sorting]")
    run.tokenizer.write_text("{}")
    with pytest.raises(ValueError, match=r"curate.dedup \(False -> True\), which invalidates the stage 'dedup' "
                                         r"and what follows it \(tokenizer\)"):
        _check(tmp_path, "curate.dedup=true")
    with pytest.raises(ValueError, match=r"model.vocab_size \(300 -> 400\).*'tokenizer'"):
        _check(tmp_path, "model.vocab_size=400")
    run.checkpoints.mkdir()
    with pytest.raises(ValueError, match=r"changed train.lr_peak \(0.003 -> 0.01\), which invalidates the stage "
                                         r"'train' and what follows it \(train\)"):
        _check(tmp_path, "train.lr_peak=0.01", "train.max_steps=100")
    _check(tmp_path, "train.max_steps=100", "model.fast_kernels=false")


def test_force_deletes_only_from_the_affected_stage_on(tmp_path):
    run = _folder(tmp_path, "data", "shards", "tokenizer", "checkpoints", "train_result", "report_json")
    _check(tmp_path, "train.lr_peak=0.01", force=True)
    assert run.data.exists() and run.tokenizer.exists() and run.shards.exists()
    assert not run.checkpoints.exists() and not run.train_result.exists() and not run.report_json.exists()
    _check(tmp_path, "train.lr_peak=0.01")  # the changed key no longer meets anything built


def test_a_tokenizer_outside_the_run_folder_is_never_deleted(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    cfg = load_config(None, tiny(tmp_path / "runs", f"data.tokenizer={mine}"))
    run = RunDir.of(cfg)
    run.root.mkdir(parents=True)
    run.config.write_text(dump_yaml(cfg))
    (run.root / "data").mkdir()
    pipeline.check_config_change(load_config(None, tiny(tmp_path / "runs", f"data.tokenizer={mine}",
                                                          "data.num_train_docs=7")), force=True)
    assert mine.exists() and not run.data.exists()
