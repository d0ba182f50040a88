"""Your own text, end to end through the CLI: ``slmforge run`` on a book, a folder, JSONL, the synthesizer's kept
output and Parquet, each ending with report.md; then the inference commands on one of the runs. Also the held-out
books of ``recipes/gutenberg_10m.yaml`` and a reduced-size run of that recipe."""

import dataclasses
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slmforge import corpus
from slmforge.config import load_config
from slmforge.curate.documents import read_documents
from slmforge.curate.text_split import chunk_text
from tests.conftest import SHARED_DATA, has_data, needs_data

ROOT = Path(__file__).resolve().parents[1]
BOOKS = SHARED_DATA / "gutenberg" / "books"
TINY = ["model.vocab_size=320", "model.d_model=32", "model.num_layers=1", "model.attn.num_heads=4",
        "model.attn.num_kv_heads=2", "model.max_seq_len=64", "data.seq_len=32", "data.num_workers=1",
        "train.batch_size=4", "train.max_steps=3", "train.warmup_steps=1", "train.eval_every=3",
        "train.ckpt_every=3", "train.eval_batches=2", "sample_tokens=4", "data.chunk_chars=400"]


def slmforge(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return in_parallel([args], stdin)[0]


def in_parallel(commands: list, stdin: str | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``slmforge ARGS`` for each ARGS at once (one thread each, so that they share the cores evenly); every
    one must exit 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "slmforge", *map(str, args)], cwd=ROOT, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for args in commands]
    outs = []
    for args, proc in zip(commands, procs):
        stdout, stderr = proc.communicate(stdin, timeout=300)
        assert proc.returncode == 0, f"slmforge {' '.join(map(str, args))}\n{stdout[-2000:]}\n{stderr[-3000:]}"
        outs.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    return outs


def english(num_chars: int, seed: int = 0) -> str:
    """A stretch of a Gutenberg book, or made-up English paragraphs where ../shared/data is absent."""
    books = sorted(BOOKS.glob("*.txt")) if has_data(BOOKS) else []
    if books:
        text = books[seed % len(books)].read_text(encoding="utf-8")
        return text[len(text) // 3:][:num_chars]
    words = "the a house river old man walked slowly toward quiet town under grey sky and she said".split()
    rng, paras = random.Random(seed), []
    while sum(map(len, paras)) < num_chars:
        paras.append(" ".join(rng.choice(words) for _ in range(rng.randint(20, 80))).capitalize() + ".")
    return "\n\n".join(paras)[:num_chars]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One finished run per kind of input: {kind: run folder}."""
    tmp = tmp_path_factory.mktemp("own_text")
    inputs = {}
    (tmp / "book.txt").write_text(english(40_000))
    inputs["book"] = ["data.paths=" + str(tmp / "book.txt"), "data.val_fraction=0.1", "data.test_fraction=0.1"]
    folder = tmp / "texts"
    folder.mkdir()
    for i in range(3):
        (folder / f"part{i}.txt").write_text(english(15_000, seed=i + 1))
    inputs["folder"] = [f"data.paths={folder}", f"data.val_paths={folder / 'part2.txt'}"]
    with (tmp / "notes.jsonl").open("w") as f:
        for i, para in enumerate(english(40_000, seed=5).split("\n\n")):
            f.write(json.dumps({"body": para, "n": i}) + "\n")
    inputs["jsonl"] = [f"data.paths={tmp / 'notes.jsonl'}", "data.text_field=body", "data.val_fraction=0.15",
                       "data.test_fraction=0.1"]
    # A local evaluation set for the job's decontamination step, so the test needs no ../shared/data.
    (tmp / "eval.jsonl").write_text(json.dumps({"question": "How many apples are left in the basket now?",
                                                "answer": "3"}) + "\n")
    slmforge("synth", "--job", "recipes/synth_math.yaml", "teacher.name=procedural", f"out_dir={tmp / 'synth'}",
             f"eval_paths=[{tmp / 'eval.jsonl'}]")
    inputs["synth"] = [f"data.paths={tmp / 'synth' / 'decontam' / 'kept'}/*.jsonl", "data.val_fraction=0.1",
                       "data.test_fraction=0.1"]
    paras = english(40_000, seed=7).split("\n\n")
    pq.write_table(pa.table({"content": paras, "source": ["book"] * len(paras)}), tmp / "pages.parquet")
    inputs["parquet"] = [f"data.paths={tmp / 'pages.parquet'}", "data.text_field=content", "data.val_fraction=0.15",
                         "data.test_fraction=0.1"]
    in_parallel([("run", f"out_dir={tmp / 'runs'}", f"name={kind}", "data.source=files", *TINY, *keys)
                 for kind, keys in inputs.items()])
    return {kind: tmp / "runs" / kind for kind in inputs}


@pytest.mark.parametrize("kind", ["book", "folder", "jsonl", "synth", "parquet"])
def test_run_ends_with_a_report(runs, kind):
    run = runs[kind]
    report = json.loads((run / "report.json").read_text())
    assert report["train"]["steps"] == 3
    assert (run / "report.md").read_text().startswith(f"# slmforge run `{kind}`")
    num_docs = {s: sum(1 for _ in (run / "data" / f"{s}.jsonl").open()) for s in ("train", "validation", "test")}
    assert num_docs["train"] > num_docs["validation"] > 0
    # The folder run holds out one file and no test split: the test split is skipped, and the report says so.
    if kind == "folder":
        assert num_docs["test"] == 0 and "test" not in report["eval"]
        assert "| test loss | empty split, not evaluated |" in (run / "report.md").read_text()
    else:
        assert num_docs["test"] > 0 and report["eval"]["test"]["tokens"] > 0


def test_held_out_file_is_never_trained_on(runs):
    data = runs["folder"] / "data"
    ids = {s: {json.loads(line)["id"].split(":")[0] for line in (data / f"{s}.jsonl").open()}
           for s in ("train", "validation")}
    assert ids == {"train": {"part0", "part1"}, "validation": {"part2"}}


def test_inference_commands_take_the_run_folder(runs, tmp_path):
    run = runs["book"]
    (tmp_path / "page.txt").write_text(english(3_000, seed=9))
    generate, chat, ppl, info, _ = in_parallel([
        ("generate", run, "prompt=The house", "max_new_tokens=5"), ("chat", run, "max_new_tokens=5"),
        ("eval", "ppl", run, tmp_path / "page.txt"), ("info", run), ("export", run, f"out={tmp_path / 'hf'}")],
        stdin="Hello there\n/exit\n")
    assert generate.stdout.strip()
    assert chat.stdout.strip() and "perplexity" in ppl.stdout and "parameters" in info.stdout.lower()
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()


def test_too_few_tokens_names_the_split_and_the_keys(tmp_path):
    # Enough text for the train split (also when english() makes it up), too little for validation.
    # One batch is 256 x 33 tokens: the train split (57 KB) has more, the validation split (about 3 KB) fewer.
    (tmp_path / "short.txt").write_text(english(60_000))
    out = subprocess.run([sys.executable, "-m", "slmforge", "run", f"out_dir={tmp_path}", "data.source=files",
                          f"data.paths={tmp_path / 'short.txt'}", "data.val_fraction=0.05", *TINY,
                          "train.batch_size=256"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert re.search(r"the validation split has [\d,]+ tokens from \d+ documents, too few", out.stderr)
    for key in ("data.val_fraction", "data.val_paths", "data.text_split", "train.batch_size"):
        assert key in out.stderr


# ---------------------------------------------------------------- splitting and held-out splits, in process


def test_chunks_are_bounded_cut_at_whitespace_and_lossless(tmp_path):
    text = english(20_000, seed=3) + "\n" + "x" * 900
    for size in (1, 37, 400, 2000):
        chunks = list(chunk_text(text.splitlines(keepends=True), size))
        assert "".join(chunks) == text and max(map(len, chunks)) <= size
    chunks = list(chunk_text([text], 400))
    # Every cut but the forced one inside the 900 x's falls after whitespace.
    assert sum(not c[-1].isspace() for c in chunks[:-1]) <= 2
    (tmp_path / "a.txt").write_text(text)
    docs = list(read_documents(tmp_path / "a.txt", text_split="chunk", chunk_chars=400))
    assert len(docs) == len(chunks) and docs[0].id == "a:0"


def _files_config(tmp_path, **keys):
    cfg = load_config(None, ["data.source=files", f"data.paths={tmp_path}/*.txt", "data.chunk_chars=300"])
    return dataclasses.replace(cfg.data, **keys)


@pytest.fixture
def three_books(tmp_path):
    for i in range(3):
        (tmp_path / f"b{i}.txt").write_text(english(12_000, seed=i))
    return tmp_path


def test_fractions_make_disjoint_splits_and_keep_validation_stable(three_books):
    before = corpus.read_corpus(_files_config(three_books, val_fraction=0.1))
    after = corpus.read_corpus(_files_config(three_books, val_fraction=0.1, test_fraction=0.2))
    assert before["test"] == [] and len(after["test"]) > 0
    # A test split takes documents from train only: validation stays the same.
    assert [d.text for d in after["validation"]] == [d.text for d in before["validation"]]
    texts = {s: {d.text for d in docs} for s, docs in after.items()}
    assert not (texts["train"] & texts["test"] or texts["train"] & texts["validation"])
    assert sum(map(len, after.values())) == sum(map(len, before.values()))


def test_held_out_paths_win_over_the_paths_glob(three_books, monkeypatch):
    # Compared as resolved paths: a relative name and a detour through another folder still match the glob.
    (three_books / "x").mkdir()
    monkeypatch.chdir(three_books)
    d = _files_config(three_books, val_paths=["b1.txt"],
                      test_paths=[str(three_books / "x" / ".." / "b2.txt")])
    assert {s: [p.name for p in files] for s, files in corpus.split_files(d).items()} == \
        {"validation": ["b1.txt"], "test": ["b2.txt"], "train": ["b0.txt"]}
    split = corpus.read_corpus(d)
    assert {s: {doc.id.split(":")[0] for doc in docs} for s, docs in split.items()} == \
        {"train": {"b0"}, "validation": {"b1"}, "test": {"b2"}}


@pytest.mark.parametrize("keys, message", [
    ({"val_paths": ["{t}/b1.txt"], "test_paths": ["{t}/b1.txt"]}, "listed in both data.val_paths and data.test_paths"),
    ({"val_paths": ["{t}/*.txt"]}, "every file is held out"),
    ({"val_paths": ["{t}/nope.txt"]}, "data.val_paths: no files match"),
    ({"text_split": "file", "val_fraction": 0.01}, "the validation split got none of the 3 documents at "
                                                   "data.val_fraction=0.01; .*data.val_paths.*data.text_split"),
    ({"text_split": "file", "val_fraction": 0.0, "test_fraction": 0.99}, "the train split got none"),
])
def test_split_mistakes_name_the_keys(three_books, keys, message):
    keys = {k: [p.format(t=three_books) for p in v] if isinstance(v, list) else v for k, v in keys.items()}
    with pytest.raises(ValueError, match=message):
        corpus.read_corpus(_files_config(three_books, **keys))


def test_an_empty_validation_split_names_the_keys(three_books):
    cfg = load_config(None, [f"out_dir={three_books}", "data.source=files", f"data.paths={three_books}/*.txt",
                             "data.chunk_chars=300", "data.val_fraction=0", "data.test_fraction=0.2"])
    with pytest.raises(ValueError, match="validation split is empty.*data.val_fraction.*data.val_paths"):
        corpus.build_data(cfg)
    assert not (three_books / "run").exists()


def test_fraction_keys_are_checked():
    with pytest.raises(ValueError, match="data.test_fraction=1.5: expected a fraction"):
        load_config(None, ["data.test_fraction=1.5"])
    with pytest.raises(ValueError, match="nothing would be left to train on"):
        load_config(None, ["data.val_fraction=0.5", "data.test_fraction=0.5"])


# ---------------------------------------------------------------- recipes/gutenberg_10m.yaml

needs_books = needs_data(BOOKS, ROOT.parent / "shared" / "data" / "gutenberg")  # the recipe reads ../shared


def validation_books() -> set[str]:
    """The books ../shared/data/gutenberg/README.md lists with split "valid"."""
    readme = (BOOKS.parent / "README.md").read_text()
    return set(re.findall(r"^\| `([^`]+\.txt)` \| valid \|", readme, re.M))


@needs_books
def test_gutenberg_recipe_holds_out_the_readme_validation_books(monkeypatch):
    monkeypatch.chdir(ROOT)
    files = corpus.split_files(load_config("recipes/gutenberg_10m.yaml").data)
    held_out = {p.name for p in files["validation"]}
    assert held_out == validation_books() and len(held_out) == 5
    assert not held_out & {p.name for p in files["train"]}
    assert len(files["train"]) == 60 and files["test"] == []


@needs_books
def test_gutenberg_recipe_runs_at_a_reduced_size(tmp_path):
    one_book = BOOKS / "0061_shakespeares-sonnets.txt"
    slmforge("run", "recipes/gutenberg_10m.yaml", f"out_dir={tmp_path}", f"data.paths={one_book}", *TINY,
             "data.chunk_chars=2000", "data.num_workers=2")
    report = json.loads((tmp_path / "gutenberg_10m" / "report.json").read_text())
    assert report["eval"]["validation"]["tokens"] > 0 and "test" not in report["eval"]
