"""The one per-shard driver for document steps: sharding, kept/removed files, reports."""

import json

from slmforge.curate.documents import Document, read_documents, write_jsonl
from slmforge.curate.steps import DocumentGuard, run_steps


class DropOdd:
    """Drops documents whose number is odd, telling the driver why."""

    def __init__(self):
        self.on_drop = None

    def run(self, docs, rank=0, world_size=1):
        for doc in docs:
            if int(doc.text.split()[-1]) % 2:
                self.on_drop(doc, {"reason": "odd"})
            else:
                yield doc


class DropMultiplesOf5:
    """Drops silently (no on_drop): the driver still counts what went missing."""

    def run(self, docs, rank=0, world_size=1):
        return (doc for doc in docs if int(doc.text.split()[-1]) % 5)


def _corpus(path, n=50):
    write_jsonl(path, [Document(f"d{i}", f"document number {i}") for i in range(n)])
    with open(path, "a") as f:
        f.write('{"text": "   "}\n{"broken json\n')


def _steps():
    return [DocumentGuard(1000), DropOdd(), DropMultiplesOf5()]


def _kept(out_dir):
    return [d.id for d in read_documents(out_dir / "kept")]


def test_three_shards_keep_what_one_shard_keeps(tmp_path):
    _corpus(tmp_path / "in.jsonl")
    one = run_steps(_steps(), [str(tmp_path / "in.jsonl")], tmp_path / "one")
    three = run_steps(_steps(), [str(tmp_path / "in.jsonl")], tmp_path / "three", num_shards=3)
    assert sorted(_kept(tmp_path / "one")) == sorted(_kept(tmp_path / "three"))
    # Input order within a shard: one shard keeps the documents in file order.
    assert _kept(tmp_path / "one") == [f"d{i}" for i in range(50) if i % 2 == 0 and i % 5]
    for report in (one, three):
        assert report["num_docs"] == 50 and report["num_kept"] == 20
        assert report["removed"] == {"odd": 25, "DropMultiplesOf5": 5}
        assert report["read"]["num_malformed_skipped"] == 1 and report["read"]["num_empty_skipped"] == 1
    assert three["num_shards"] == 3
    assert sorted(p.name for p in (tmp_path / "three" / "kept").iterdir()) == [
        f"0000{r}-of-00003.jsonl" for r in range(3)]
    removed = [json.loads(line) for p in sorted((tmp_path / "three" / "removed").iterdir()) for line in p.open()]
    assert sorted(r["id"] for r in removed) == sorted(f"d{i}" for i in range(1, 50, 2))


def test_one_shard_index_writes_its_shard_and_merges_when_all_are_done(tmp_path):
    _corpus(tmp_path / "in.jsonl", n=9)
    inputs, out = [str(tmp_path / "in.jsonl")], tmp_path / "out"
    first = run_steps([DropOdd()], inputs, out, shard_index=1, num_shards=2)
    assert first["num_docs"] == 4 and not (out / "report.json").exists()  # d1, d3, d5, d7
    merged = run_steps([DropOdd()], inputs, out, shard_index=0, num_shards=2, config={"name": "x"})
    assert merged["num_docs"] == 9 and merged["num_kept"] == 5 and merged["config"] == {"name": "x"}
    assert json.loads((out / "report.json").read_text()) == merged
