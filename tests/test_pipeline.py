"""``slmforge run`` as a list of stages: the order, optional curation feeding the tokenizer and shards, resume."""

import json
import random

import pytest

from slmforge import corpus, pipeline
from slmforge.config import load_config, merge
from slmforge.curate.documents import Document, read_documents, write_jsonl
from slmforge.runs import RunDir

NUM_WEB_DOCS, NUM_PLANTED = 40, 6


def test_stage_order():
    assert [s.name for s in pipeline.STAGES] == ["data", "dedup", "quality", "decontaminate", "tokenizer", "shards",
                                                 "train", "eval", "math", "samples", "post", "report"]


# An evaluation item of our own (GSM8K-shaped), so the test needs no ../shared/data.
QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")


def _web_corpus(path):
    """Random-word documents (no two alike), ``NUM_PLANTED`` exact copies of some, and one holding the
    evaluation question (a 13-gram match for decontamination)."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    docs = [Document(f"web{i}", " ".join(rng.choices(words, k=40))) for i in range(NUM_WEB_DOCS)]
    docs += [Document(f"copy{i}", docs[i].text) for i in range(NUM_PLANTED)]
    docs.append(Document("leak", f"Today's puzzle. {QUESTION} Think it over."))
    write_jsonl(path, docs)


@pytest.fixture(scope="module")
def curated_run(tmp_path_factory):
    """A tiny run over a procedural source and a files source, with dedup and decontamination on."""
    tmp = tmp_path_factory.mktemp("pipeline")
    _web_corpus(tmp / "web.jsonl")
    (tmp / "eval.jsonl").write_text(json.dumps({"question": QUESTION, "answer": "72"}) + "\n")
    cfg = load_config(None, [
        f"out_dir={tmp}", "name=curated", "model.vocab_size=320", "model.d_model=32", "model.num_layers=1",
        "model.attn.num_heads=4", "model.attn.num_kv_heads=2", "model.max_seq_len=64", "data.num_train_docs=60",
        "data.num_val_docs=20", "data.num_test_docs=20", "data.seq_len=32", "data.num_workers=1",
        "train.batch_size=4", "train.max_steps=3", "train.warmup_steps=1", "train.eval_every=3",
        "train.ckpt_every=3", "train.eval_batches=2", "sample_tokens=4", "curate.dedup=true",
        "curate.decontaminate=true", f"curate.eval_paths=[{tmp / 'eval.jsonl'}]"])
    cfg = merge(cfg, {"data": {"sources": {"proc": {}, "web": {"source": "files", "paths": [str(tmp / "web.jsonl")],
                                                              "val_fraction": 0.0}}}})
    tokenizer_docs = []
    train_tokenizer = corpus.train_tokenizer

    def spy(texts, *args, **kwargs):
        texts = list(texts)
        tokenizer_docs.append(len(texts))
        return train_tokenizer(texts, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(corpus, "train_tokenizer", spy)
    try:
        report = pipeline.run(cfg)
    finally:
        mp.undo()
    return cfg, report, tokenizer_docs


def _num_docs(path) -> int:
    return sum(1 for _ in read_documents(path))


def test_curation_feeds_the_tokenizer_and_shards(curated_run):
    cfg, report, tokenizer_docs = curated_run
    run = RunDir.of(cfg)
    web = report["curate"]["dedup"]["web/train"]
    assert web["num_docs"] == NUM_WEB_DOCS + NUM_PLANTED + 1
    assert web["removed"] == {"exact": NUM_PLANTED, "near": 0}
    assert report["curate"]["decontaminate"]["web/train"]["removed"] == {"contamination": 1}
    kept = {key: report["curate"]["decontaminate"][key]["num_kept"] for key in ("train", "web/train")}
    assert kept["web/train"] == NUM_WEB_DOCS
    assert kept["train"] <= _num_docs(run.split_data("train")) - NUM_PLANTED - 1
    for key in ("train", "web/train", "proc/train"):
        meta = json.loads((run.split_shards(key) / "meta.json").read_text())
        assert meta["num_docs"] == report["curate"]["decontaminate"][key]["num_kept"]
    assert tokenizer_docs == [kept["train"]]
    # The held-out splits are not curated.
    assert json.loads((run.split_shards("validation") / "meta.json").read_text())["num_docs"] == \
        _num_docs(run.split_data("validation"))
    saved = json.loads(run.report_json.read_text())
    assert saved["curate"] == report["curate"] and saved["train"]["steps"] == 3
    assert "| dedup web/train | 47 | 41 | 6 exact, 0 near |" in run.report_md.read_text()


def test_rerun_skips_finished_stages(curated_run, monkeypatch, capsys):
    cfg, first, _ = curated_run
    for stage in pipeline.STAGES[:7]:
        assert stage.done(cfg), stage.name

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(pipeline, "train", no_training)
    capsys.readouterr()
    report = pipeline.run(cfg)
    out = capsys.readouterr().out
    for name in ("data", "dedup", "decontaminate", "tokenizer", "shards"):
        assert f"[slmforge] {name}: reusing" in out
    assert "train: already finished" in out and "quality" not in out
    assert report["curate"] == first["curate"] and report["eval"] == first["eval"]


def test_unknown_mixer_fails_before_any_work(tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path}", "model.layers=attn,mamba9"])
    with pytest.raises(ValueError, match="mamba9"):
        pipeline.run(cfg)
    assert not any(tmp_path.iterdir())
