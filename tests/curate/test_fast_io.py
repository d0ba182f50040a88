"""The fast JSON Lines path (msgspec, blocks, copied lines) against the stdlib path it replaced: same documents,
same counts and messages, byte-identical lines for documents that did not change."""

import dataclasses
import gzip
import json
import math

import pytest

from slmforge.curate import documents
from slmforge.curate.dedup import DedupConfig, dedup
from slmforge.curate.documents import Document, ReadStats, read_documents, write_jsonl

LONG = "long line " * 300_000  # 3 MB: longer than a block

TRICKY = [
    '\ufeff{"id": "bom", "text": "first line after a byte-order mark"}\r\n',
    '{"id": "u", "text": "caf\u00e9 \u2028 line sep \u2029 para \u0085 nel \U0001F600 emoji", '
    '"meta": {"k": [1, 2.5, null]}}\n',
    '{"id": "esc", "text": "tab\\t nl\\n quote\\" back\\\\ slash\\/ nul\\u0000 sep\\u2028 pair\\ud83d\\ude00"}\n',
    "\n",
    "   \t \n",
    "\u00a0\n",  # no JSON, but str.strip() makes it blank
    '{"text": "no id here", "source": "web", "meta": "not a dict"}\n',
    '{"id": 7, "text": "an int id", "meta": {"a": 1}, "a": 2}\n',
    '{"id": "dup", "text": "first", "text": "second wins"}\n',
    '{"id": "empty", "text": ""}\n',
    '{"id": "spaces", "text": " \\n\\t "}\n',
    '{"id": "broken", "text": \n',
    "[1, 2]\n",
    '{"id": "no-text", "body": "x"}\n',
    '{"id": "int-text", "text": 5}\n',
    '{"id": "nan", "text": "NaN in meta", "meta": {"x": NaN}}\n',
    '{"id": "big", "text": "big numbers", "meta": {"x": 1e400, "n": 123456789012345678901234567890}}\n',
    '{"id": "lone", "text": "lone \\ud800 surrogate"}\n',
    '{"id": "lone-low", "text": "lone \\udc00 low"}\n',
    '{"id": "ctl", "text": "raw\ttab"}\n',
    '{"id": "long", "text": "' + LONG + '"}\n',
    '{"id": "crlf", "text": "windows line end"}\r\n',
]
BAD_UTF8 = b'{"id": "latin1", "text": "caf\xe9"}\n'


def _tricky_bytes(last: str = '{"id": "last", "text": "no newline at the end"}') -> bytes:
    lines = [line.encode("utf-8") for line in TRICKY]
    return b"".join(lines[:5] + [BAD_UTF8] + lines[5:]) + last.encode("utf-8")


def _stdlib_read_jsonl(path, text_field, skip=None, keep_raw=False):
    """The reader this replaced, as the reference: line by line, each decoded and given to json.loads."""
    offset, line_no = 0, 0
    try:
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    message = (f"{path} line {line_no}: not valid UTF-8 at byte offset {offset + exc.start} "
                               f"(byte 0x{raw[exc.start]:02x}); expected UTF-8 text")
                    if skip is None:
                        raise ValueError(message) from None
                    skip("invalid_utf8", message)
                    offset += len(raw)
                    continue
                offset += len(raw)
                line = line.lstrip("\ufeff") if line_no == 1 else line
                if line.strip():
                    record = documents._parsed_or_skipped(
                        lambda: documents._parse_json_line(line, text_field, f"{path} line {line_no}"), skip)
                    yield None if record is None else (*record, None)
    except EOFError:
        raise ValueError(f"{path}: truncated gzip file: the compressed data ends after line {line_no}, before its "
                         f"end marker (an interrupted download or copy?); fetch or compress the file again") from None


def _read(path, careful: bool, monkeypatch, block: int | None = None, on_error="skip", **kwargs):
    """Documents and stats of ``path``; ``careful``: with the reference reader."""
    with monkeypatch.context() as m:
        if careful:
            m.setattr(documents, "_read_jsonl", _stdlib_read_jsonl)
        if block:
            m.setattr(documents, "_BLOCK_BYTES", block)
        stats = ReadStats()
        docs = list(read_documents(path, stats=stats, on_error=on_error, **kwargs))
    return [(d.id, d.text, d.meta) for d in docs], dataclasses.asdict(stats)


@pytest.mark.parametrize("name", ["tricky.jsonl", "tricky.jsonl.gz"])
@pytest.mark.parametrize("block", [None, 7, 4096])
def test_fast_reader_equals_the_stdlib_path(tmp_path, monkeypatch, name, block):
    data = _tricky_bytes()
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    fast = _read(path, False, monkeypatch, block)
    assert fast == _read(path, True, monkeypatch)
    docs, stats = fast
    by_id = {d[0]: d for d in docs}
    assert by_id["esc"][1] == 'tab\t nl\n quote" back\\ slash/ nul\x00 sep\u2028 pair\U0001F600'
    assert by_id["dup"][1] == "second wins" and by_id["7"][2] == {"a": 2} and by_id["long"][1] == LONG
    # Index 3: blank lines and the line that is not UTF-8 take none.
    assert by_id["tricky:3"][2] == {"meta": "not a dict", "source": "web"}
    assert by_id["nan"][2]["x"] != by_id["nan"][2]["x"] and by_id["big"][2]["x"] == float("inf")
    assert by_id["last"][1] == "no newline at the end" and by_id["bom"][0] == "bom"
    assert "lone" not in by_id and "latin1" not in by_id and "broken" not in by_id
    assert (stats["num_malformed_skipped"], stats["num_missing_field"], stats["num_invalid_utf8_skipped"],
            stats["num_empty_skipped"]) == (5, 1, 3, 2)
    assert any("line 6: not valid UTF-8 at byte offset" in e for e in stats["errors"])


@pytest.mark.parametrize("last", ['{"id": "broken-last", "text": ', '{"id": "x"}', "[]", '{"text": "\\ud800"}'])
def test_first_error_message_is_the_same(tmp_path, monkeypatch, last):
    """on_error="raise": the same ValueError, also for a bad last line without its newline."""
    path = tmp_path / "bad.jsonl"
    for data in (_tricky_bytes(last), b'{"id": "a", "text": "fine"}\n' + last.encode()):
        path.write_bytes(data)
        messages = []
        for careful in (False, True):
            with pytest.raises(ValueError) as exc:
                _read(path, careful, monkeypatch, on_error="raise")
            messages.append(str(exc.value))
        assert messages[0] == messages[1]


def test_truncated_gzip_names_the_same_line(tmp_path, monkeypatch):
    whole = gzip.compress(b"".join(json.dumps({"id": f"d{i}", "text": f"text {i} " * 50}).encode() + b"\n"
                                   for i in range(3000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    messages = []
    for careful, block in ((False, None), (False, 1000), (True, None)):
        with pytest.raises(ValueError, match="truncated gzip file") as exc:
            _read(path, careful, monkeypatch, block)
        messages.append(str(exc.value))
    assert messages[0] == messages[1] == messages[2]


def test_unchanged_documents_are_written_as_their_lines(tmp_path):
    lines = [b'{"id": "a", "text": "caf\\u00e9 \\u2028", "meta": {"k": 1}, "extra": [1, 2]}',
             b'{"text":"plain","id":"b"}',
             b'{"id": "c", "text": "keeps its meta", "meta": {"deep": {"x": [1]}}}',
             b'{"id": "d", "text": "text replaced"}',
             b'{"id": "e", "text": "meta changed deep inside", "meta": {"deep": {"x": [1]}}}',
             b'{"id": "f", "text": "id changed"}',
             b'{"text": "no id: encoded, so its id survives"}',
             b'{"id": 5, "text": "an int id"}']
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    docs = list(read_documents(src, keep_raw=True))
    docs[3] = dataclasses.replace(docs[3], text="new text")
    docs[4].meta["deep"]["x"].append(2)
    docs[5].id = "f2"
    out = tmp_path / "out.jsonl"
    assert write_jsonl(out, docs) == 8
    written = out.read_bytes().split(b"\n")
    assert written[:3] == lines[:3] and written[-1] == b""  # copied as they were, without BOM and CR
    for k in range(3, 8):
        assert written[k] != lines[k]
    again = [(d.id, d.text, d.meta) for d in read_documents(out)]
    assert again == [(d.id, d.text, d.meta) for d in docs]
    assert again[4][2] == {"deep": {"x": [1, 2]}} and again[6][0] == "in:6"
    # Under another text field every document is encoded anew; without keep_raw too.
    write_jsonl(out, read_documents(src, keep_raw=True), text_field="body")
    assert [d.text for d in read_documents(out, text_field="body")] == [d.text for d in read_documents(src)]
    write_jsonl(out, read_documents(src))
    first = b'{"id":"a","text":"caf\xc3\xa9 \xe2\x80\xa8","meta":{"k":1,"extra":[1,2]}}'
    assert out.read_bytes().split(b"\n")[0] == first


@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz"])
def test_encoded_lines_read_back_as_json_dumps_lines(tmp_path, name):
    docs = [Document("a", "x \u2028 \U0001F600\n\t\"\\", {"f": 0.1, "n": None, "big": 2 ** 70}),
            Document("b", "nan in meta", {"x": float("nan"), "inf": float("inf")}),
            Document("c", "tuple and int keys", {1: (1, 2), "s": "é"})]
    write_jsonl(tmp_path / name, docs)
    reference = tmp_path / "ref.jsonl"
    reference.write_text("".join(json.dumps({"id": d.id, "text": d.text, "meta": d.meta}, ensure_ascii=False) + "\n"
                                 for d in docs), encoding="utf-8")
    got, want = list(read_documents(tmp_path / name)), list(read_documents(reference))
    assert repr([(d.id, d.text, d.meta) for d in got]) == repr([(d.id, d.text, d.meta) for d in want])
    assert math.isnan(got[1].meta["x"]) and got[1].meta["inf"] == float("inf")  # as json.dumps writes them, not null
    with pytest.raises(UnicodeEncodeError):
        write_jsonl(tmp_path / name, [Document("s", "lone \ud800")])


def test_dedup_copies_the_kept_lines(tmp_path):
    words = [f"w{i}" for i in range(3600)]
    lines = []
    for i in range(60):
        text = " ".join(words[i * 60:i * 60 + 60]) if i % 3 else " ".join(words[:60])  # every third a duplicate
        lines.append(json.dumps({"id": f"d{i}", "text": text, "meta": {"i": i}}, separators=(", ", ": ")))
    other = " ".join(f"z{j}" for j in range(60))
    lines.insert(7, '{"text": "no id, so encoded: ' + other + '"}')
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    cfg = DedupConfig(inputs=[str(src)], out_dir=str(tmp_path / "out"), num_workers=1)
    result = dedup(cfg)
    kept = (tmp_path / "out" / "kept" / "00000-of-00001.jsonl").read_bytes()
    assert result["write"][0]["num_kept"] == 61 - 19 == len(kept.splitlines())
    assert set(kept.splitlines()) - {line.encode() for line in lines} == {
        b'{"id":"in:7","text":"no id, so encoded: ' + other.encode() + b'","meta":{}}'}
    # Stage C copied stage A's lines and deleted them; run again, it reads the inputs and writes the same bytes.
    signatures = tmp_path / "out" / "signatures" / "00000-of-00001"
    assert not (signatures / "lines.bin").exists() and not (signatures / "line_offsets.npy").exists()
    (tmp_path / "out" / "kept" / "00000-of-00001.jsonl").unlink()
    dedup(cfg, stage="write")
    assert (tmp_path / "out" / "kept" / "00000-of-00001.jsonl").read_bytes() == kept


def test_records_without_other_keys_equal_the_stdlib_path(tmp_path, monkeypatch):
    """The struct decoding (records with only id, the text field and meta) until the first record with other keys."""
    path = tmp_path / "canonical.jsonl"
    path.write_text('{"id": "a", "body": "first", "body": "duplicate key: the last wins"}\n'
                    '{"id": null, "body": "null id", "meta": null}\n'
                    '{"body": "meta not a dict", "meta": [1, {"x": 2}]}\n'
                    '{"id": 3.5, "body": "float id", "meta": {"m": {"n": 1}}}\n'
                    '{"id": "b", "body": 12}\n'
                    '{"id": "c", "text": "no body"}\n'
                    '{"id": "d", "body": "other keys from here on", "url": "u"}\n'
                    '{"id": "e", "body": "a dict again", "meta": {"k": 1}}\n', encoding="utf-8")
    fast = _read(path, False, monkeypatch, text_field="body")
    assert fast == _read(path, True, monkeypatch, text_field="body")
    assert [d[0] for d in fast[0]] == ["a", "canonical:1", "canonical:2", "3.5", "d", "e"]
    assert fast[0][2][2] == {"meta": [1, {"x": 2}]} and fast[1]["num_malformed_skipped"] == 2
