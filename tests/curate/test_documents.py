"""Documents: JSONL/Parquet/text round trips, streaming, clear errors on bad input, atomic writes."""

import gzip
import json

import pytest

from slmforge.curate.documents import (Document, ReadStats, expand_paths, read_documents, shard_of, write_documents,
                                     write_jsonl, write_parquet)
from tests.conftest import SHARED_DATA, needs_data

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"


def _docs(n: int = 5) -> list[Document]:
    return [Document(f"d{i}", f"text {i}\nwith ünïcode ✓", {"i": i, "tags": ["a", "b"], "nested": {"x": i / 2}})
            for i in range(n)]


def _as_tuples(docs):
    return [(d.id, d.text, d.meta) for d in docs]


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.parquet"])
def test_round_trip(tmp_path, name):
    path = tmp_path / name
    assert write_documents(path, iter(_docs())) == 5
    assert _as_tuples(read_documents(path)) == _as_tuples(_docs())


def test_parquet_small_row_groups_and_custom_text_field(tmp_path):
    path = tmp_path / "docs.parquet"
    assert write_parquet(path, _docs(23), text_field="content", batch_size=4) == 23
    import pyarrow.parquet as pq

    assert pq.ParquetFile(path).metadata.num_row_groups == 6
    assert _as_tuples(read_documents(path, text_field="content")) == _as_tuples(_docs(23))


def test_plain_text_split_modes(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("First para line one.\nline two.\n\n\n  \nSecond para.\n\nThird.\n")
    whole = list(read_documents(path))
    assert [d.text for d in whole] == [path.read_text()] and whole[0].id == "story:0"
    paras = list(read_documents(path, text_split="blank_line"))
    assert [d.text for d in paras] == ["First para line one.\nline two.", "Second para.", "Third."]
    stats = ReadStats()
    lines = list(read_documents(path, text_split="line", stats=stats))
    assert [d.text for d in lines] == ["First para line one.", "line two.", "Second para.", "Third."]
    # Ids keep the line index, so skipped blank lines do not shift them.
    assert [d.id for d in lines] == ["story:0", "story:1", "story:5", "story:7"]
    assert (stats.num_docs, stats.num_empty_skipped) == (4, 4)


def test_jsonl_ids_meta_and_extra_keys(tmp_path):
    path = tmp_path / "raw.jsonl"
    path.write_text('{"text": "a", "source": "web"}\n\n{"id": 7, "text": "b", "meta": {"k": 1}, "lang": "en"}\n')
    docs = list(read_documents(path))
    assert _as_tuples(docs) == [("raw:0", "a", {"source": "web"}), ("7", "b", {"k": 1, "lang": "en"})]


def test_streaming_large_jsonl(tmp_path):
    path = tmp_path / "big.jsonl"
    n = 50_000
    write_jsonl(path, (Document(str(i), f"document number {i} " * 5) for i in range(n)))
    # A broken last line: the reader must hand out documents before it reaches it, i.e. it streams.
    with path.open("a") as f:
        f.write("{broken\n")
    it = read_documents(path)
    first = [next(it) for _ in range(3)]
    assert [d.id for d in first] == ["0", "1", "2"]
    stats = ReadStats()
    count = 0
    with pytest.raises(ValueError, match=f"line {n + 1}"):
        for _ in read_documents(path, stats=stats):
            count += 1
    assert count == stats.num_docs == n


@needs_data(GSM8K_TEST)
def test_reads_real_gsm8k():
    stats = ReadStats()
    docs = list(read_documents(GSM8K_TEST, text_field="question", stats=stats))
    assert len(docs) == stats.num_docs == 1319
    assert docs[0].id == "test:0" and docs[0].text.startswith("Janet")
    assert docs[0].meta["answer"].endswith("#### 18")
    # A directory expands to its supported files only (the LICENSE is not read).
    assert expand_paths(GSM8K_TEST.parent) == [GSM8K_TEST.parent / "test.jsonl", GSM8K_TEST.parent / "train.jsonl"]


def test_broken_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "also ok"}\n{"text": "oops",\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3: invalid JSON"):
        list(read_documents(path))


@pytest.mark.parametrize("line, expected", [
    ('["a list"]', "expected a JSON object, got list"),
    ('{"body": "x", "id": 1}', "missing text field 'text'; available keys: 'body', 'id'"),
    ('{"text": 5}', "field 'text' must be a string, got int"),
])
def test_bad_records(tmp_path, line, expected):
    path = tmp_path / "rec.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"rec\.jsonl line 2: ") as exc:
        list(read_documents(path))
    assert expected in str(exc.value)


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl", "latin1.jsonl.gz"])
def test_non_utf8_names_file_line_and_offset(tmp_path, name):
    raw = '{"text": "fine"}\n{"text": "caf\xe9"}\n'.encode("latin-1")
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(ValueError, match=rf"{name} line 2: not valid UTF-8 at byte offset 30 \(byte 0xe9\)"):
        list(read_documents(path))


def test_empty_file_and_empty_documents(tmp_path):
    (tmp_path / "a_empty.jsonl").write_text("")
    (tmp_path / "b_empty.txt").write_text("")
    (tmp_path / "c.jsonl").write_text('{"text": ""}\n{"text": "  \\n "}\n{"text": "real"}\n')
    stats = ReadStats()
    docs = list(read_documents(str(tmp_path / "*"), stats=stats))
    assert [d.id for d in docs] == ["c:2"]
    assert stats == ReadStats(num_files=3, num_docs=1, num_empty_skipped=2, num_bytes=4)


def test_parquet_missing_column_lists_columns(tmp_path):
    path = tmp_path / "p.parquet"
    write_parquet(path, _docs(2))
    with pytest.raises(ValueError, match=r"p\.parquet: no column 'content'; columns: 'id', 'text', 'meta'"):
        list(read_documents(path, text_field="content"))


def test_glob_matching_nothing_names_pattern(tmp_path):
    pattern = str(tmp_path / "nothing-*.jsonl")
    # Raised at the call, before any iteration.
    with pytest.raises(ValueError, match="no files match .*nothing-\\*\\.jsonl"):
        read_documents(pattern)


def test_expand_paths_sorted_and_deduplicated(tmp_path):
    for name in ["b.jsonl", "a.txt", "c.parquet", "notes.csv"]:
        (tmp_path / name).write_text("")
    files = expand_paths([str(tmp_path / "*"), str(tmp_path / "a.txt")])
    assert [p.name for p in files] == ["a.txt", "b.jsonl", "c.parquet"]
    with pytest.raises(ValueError, match="notes.csv: unsupported file type"):
        read_documents(tmp_path / "notes.csv")


@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet"])
def test_failed_write_keeps_existing_file(tmp_path, name):
    path = tmp_path / name
    write_documents(path, _docs(3))
    before = path.read_bytes()
    src = tmp_path / "src.jsonl"
    src.write_text('{"text": "one"}\n{"text": "two"}\nnot json\n')
    with pytest.raises(ValueError, match="line 3"):
        write_documents(path, read_documents(src))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "src.jsonl"])


def test_failed_first_write_leaves_no_file(tmp_path):
    def failing():
        yield Document("a", "x")
        raise RuntimeError("upstream failed")

    with pytest.raises(RuntimeError):
        write_jsonl(tmp_path / "new.jsonl", failing())
    assert list(tmp_path.iterdir()) == []


def test_write_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="expected a name ending in"):
        write_documents(tmp_path / "out.csv", _docs(1))


def test_shard_of_partitions():
    docs = _docs(10)
    shards = [list(shard_of(docs, r, 3)) for r in range(3)]
    assert [d.id for d in shards[1]] == ["d1", "d4", "d7"]
    assert sorted(d.id for s in shards for d in s) == sorted(d.id for d in docs)
    with pytest.raises(ValueError):
        list(shard_of(docs, 3, 3))


def test_jsonl_is_plain_json_per_line(tmp_path):
    path = tmp_path / "x.jsonl"
    write_jsonl(path, _docs(2), text_field="content")
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert first == {"id": "d0", "content": "text 0\nwith ünïcode ✓", "meta": {"i": 0, "tags": ["a", "b"],
                                                                           "nested": {"x": 0.0}}}
