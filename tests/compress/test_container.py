"""The file format and the segments: every damage is a one-line ValueError naming the file; any bytes split and
join back exactly."""

import os
import random

import pytest

from slmforge.compress import container, segments
from slmforge.tokens.tokenizer import Tokenizer
from tests.compress.conftest import sample_text


def header(**changes) -> container.Header:
    fields = dict(model=bytes(range(32)), probe=b"probe123", original_len=10, original_crc=1234, note="run/step_1",
                  chunk_tokens=4, context=8, keep=4, num_batches=1, num_tokens=6, raw_method=container.RAW_STORED,
                  segments=[container.Segment(7, True, 6), container.Segment(3, False)], chunk_lengths=[])
    return container.Header(**{**fields, **changes})


def packed() -> bytes:
    return container.pack(header(), b"raw", [b"\x01\x02", b"\x03"])


def test_pack_unpack_round_trip():
    h, raw, streams = container.unpack(packed(), "f.slmz")
    assert (raw, streams) == (b"raw", [b"\x01\x02", b"\x03"])
    assert h.segments == header().segments and h.note == "run/step_1" and h.chunk_lengths == [2, 1]
    assert (h.model, h.probe, h.original_len, h.original_crc, h.num_tokens) == (bytes(range(32)), b"probe123", 10, 1234, 6)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"hello world, plain text", "not a file made by `slmforge compress`"),
    (lambda b: b[:4], "truncated"),
    (lambda b: b[:4] + b"\x09" + b[5:], "coder version 9"),
    (lambda b: b[:20], "truncated inside the header"),
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"\0", "has extra bytes"),
    (lambda b: b[:30] + bytes([b[30] ^ 1]) + b[31:], "the header's checksum differs"),
    (lambda b: b[:-2] + bytes([b[-2] ^ 1]) + b[-1:], "checksum of the compressed data differs"),
])
def test_damaged_files_are_one_line_errors(damage, message):
    with pytest.raises(ValueError, match="^f.slmz: ") as err:
        container.unpack(damage(packed()), "f.slmz")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_every_truncation_and_bit_flip_is_caught():
    data = packed()
    for cut in range(len(data)):
        with pytest.raises(ValueError, match="^f.slmz: "):
            container.unpack(data[:cut], "f.slmz")
    for i in range(len(data)):
        with pytest.raises(ValueError, match="^f.slmz: "):
            container.unpack(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :], "f.slmz")


def test_a_header_whose_tables_do_not_add_up_is_refused():
    bad = container.pack(header(original_len=11), b"raw", [b"\x01\x02", b"\x03"])
    with pytest.raises(ValueError, match="segments do not add up"):
        container.unpack(bad, "f.slmz")


@pytest.fixture(scope="module")
def tokenizer(run):
    return Tokenizer.load(run / "tokenizer.json")


@pytest.mark.parametrize("data", [
    b"", b"a", b"\xff", b"a" * 100, b"\xff" * 100, os.urandom(3000), sample_text().encode(),
    b"\xc3" + sample_text().encode() + b"\xe2\x82" + b"tail text that is long enough \xf0\x9f",
    "\udcff".encode("utf-8", "surrogatepass") + b"abc" * 10,  # an encoded surrogate is not valid UTF-8
])
def test_segments_split_and_join_back_exactly(tokenizer, data):
    segs, texts, raw = segments.split(data, tokenizer)
    assert sum(s.nbytes for s in segs) == len(data)
    assert all(len(ids) == s.num_tokens for s, ids in zip([s for s in segs if s.text], texts))
    method, blob = segments.pack_raw(raw)
    raw_back = segments.unpack_raw(method, blob, len(raw), "f")
    decoded = [tokenizer.decode(ids, skip_special=False) for ids in texts]
    assert segments.join(segs, decoded, raw_back, "f") == data


def test_text_goes_to_the_model_and_binary_to_raw(tokenizer):
    text = sample_text().encode()
    segs, _, raw = segments.split(b"\xff\xfe" + text + bytes([0x80]), tokenizer)
    assert [(s.text, s.nbytes) for s in segs] == [(False, 2), (True, len(text)), (False, 1)]
    assert raw == b"\xff\xfe\x80"
    noise = random.Random(0).randbytes(5000)
    segs, texts, raw = segments.split(noise, tokenizer)
    assert len(raw) > 0.9 * len(noise)  # random bytes hold only short runs of valid UTF-8
    assert segments.pack_raw(b"\xff" * 5000)[0] == container.RAW_LZMA
    assert segments.pack_raw(noise) == (container.RAW_STORED, noise)
