"""The compressed file format: a checked header, then the raw bytes and one range-coded stream per chunk.

::

    magic "SLMZ" | version (1 byte) | header length (4 bytes, big-endian) | header | CRC32 of the header (4 bytes)
    | body: the raw-byte blob, then the chunks' coded streams back to back

The header, integers as LEB128 varints unless said otherwise:

- ``model``: 32 bytes, sha256 of the checkpoint's weights file then the tokenizer.json file (``lm.model_identity``);
- ``probe``: 8 bytes, the fingerprint of the quantised frequency tables the compressing machine computed for a fixed
  probe text (``lm.probe_fingerprint``): a machine that computes other floats fails before decoding anything;
- the original length and its CRC32 (4 bytes), the body's length and CRC32 (4 bytes);
- ``note``: a short UTF-8 text for messages (the run, its step, the torch version), length-prefixed;
- the coder's schedule (``chunk_tokens``, ``context``, ``keep``, ``num_batches``) and the total number of tokens;
- the raw blob's method (0 stored, 1 LZMA2 without xz's container) and its length in the body;
- the segment table: ``nbytes << 1 | is_text`` per segment, then its number of tokens for a text segment;
- the chunk table: each chunk's coded length in bytes.

Every way a file can be damaged is a one-line ``ValueError`` that names it: another magic (not such a file), a
newer version, a header or body cut short, a checksum that differs. A file is parsed whole before any model runs.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

MAGIC = b"SLMZ"
VERSION = 1
ID_BYTES, PROBE_BYTES = 32, 8
RAW_STORED, RAW_LZMA = 0, 1


@dataclasses.dataclass
class Segment:
    nbytes: int  # of the original
    text: bool  # coded by the model (else: raw bytes)
    num_tokens: int = 0


@dataclasses.dataclass
class Header:
    model: bytes
    probe: bytes
    original_len: int
    original_crc: int
    note: str
    chunk_tokens: int
    context: int
    keep: int
    num_batches: int
    num_tokens: int
    raw_method: int
    segments: list[Segment]
    chunk_lengths: list[int]
    raw_len: int = 0  # filled by pack
    body_len: int = 0
    body_crc: int = 0


def pack(header: Header, raw: bytes, streams: list[bytes]) -> bytes:
    """The whole file: header (with the body's length and CRC filled in) and body."""
    body = raw + b"".join(streams)
    header.raw_len, header.body_len, header.body_crc = len(raw), len(body), zlib.crc32(body)
    header.chunk_lengths = [len(s) for s in streams]
    out = bytearray(header.model + header.probe)
    note = header.note.encode()[:255]
    _varint(out, header.original_len)
    out += struct.pack(">I", header.original_crc)
    _varint(out, header.body_len)
    out += struct.pack(">I", header.body_crc)
    _varint(out, len(note))
    out += note
    for value in (header.chunk_tokens, header.context, header.keep, header.num_batches, header.num_tokens,
                  header.raw_method, header.raw_len, len(header.segments)):
        _varint(out, value)
    for seg in header.segments:
        _varint(out, seg.nbytes << 1 | seg.text)
        if seg.text:
            _varint(out, seg.num_tokens)
    _varint(out, len(header.chunk_lengths))
    for length in header.chunk_lengths:
        _varint(out, length)
    head = bytes(out)
    return MAGIC + bytes([VERSION]) + struct.pack(">I", len(head)) + head + struct.pack(">I", zlib.crc32(head)) + body


def unpack(data: bytes, name: str) -> tuple[Header, bytes, list[bytes]]:
    """(header, raw blob, coded streams) of a whole file; ``name`` is the file, for messages."""
    if data[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{name}: not a file made by `slmforge compress` (it does not start with {MAGIC.decode()})")
    if len(data) < len(MAGIC) + 5:
        raise ValueError(f"{name}: truncated ({len(data)} bytes, not even a header)")
    if data[4] != VERSION:
        raise ValueError(f"{name}: made by coder version {data[4]}; this slmforge reads version {VERSION}: "
                         f"decompress it with the slmforge that made it")
    (head_len,) = struct.unpack(">I", data[5:9])
    start = 9
    if len(data) < start + head_len + 4:
        raise ValueError(f"{name}: truncated inside the header ({len(data)} bytes; the header alone needs "
                         f"{start + head_len + 4})")
    head = data[start : start + head_len]
    if struct.unpack(">I", data[start + head_len : start + head_len + 4])[0] != zlib.crc32(head):
        raise ValueError(f"{name}: corrupted (the header's checksum differs)")
    header = _read_header(head, name)
    body = data[start + head_len + 4 :]
    if len(body) != header.body_len:
        what = "truncated" if len(body) < header.body_len else "has extra bytes"
        raise ValueError(f"{name}: {what} (the compressed data is {len(body)} bytes, the header says "
                         f"{header.body_len})")
    if zlib.crc32(body) != header.body_crc:
        raise ValueError(f"{name}: corrupted (the checksum of the compressed data differs)")
    raw, pos, streams = body[: header.raw_len], header.raw_len, []
    for length in header.chunk_lengths:
        streams.append(body[pos : pos + length])
        pos += length
    return header, raw, streams


def _read_header(head: bytes, name: str) -> Header:
    reader = _Reader(head, name)
    model, probe = reader.take(ID_BYTES), reader.take(PROBE_BYTES)
    original_len = reader.varint()
    (original_crc,) = struct.unpack(">I", reader.take(4))
    body_len = reader.varint()
    (body_crc,) = struct.unpack(">I", reader.take(4))
    note = reader.take(reader.varint()).decode("utf-8", errors="replace")
    chunk_tokens, context, keep, num_batches, num_tokens, raw_method, raw_len, num_segments = (
        reader.varint() for _ in range(8))
    segments = []
    for _ in range(num_segments):
        value = reader.varint()
        seg = Segment(value >> 1, bool(value & 1))
        seg.num_tokens = reader.varint() if seg.text else 0
        segments.append(seg)
    chunk_lengths = [reader.varint() for _ in range(reader.varint())]
    header = Header(model, probe, original_len, original_crc, note, chunk_tokens, context, keep, num_batches,
                    num_tokens, raw_method, segments, chunk_lengths, raw_len, body_len, body_crc)
    _check(header, reader, name)
    return header


def _check(h: Header, reader: "_Reader", name: str) -> None:
    """Tables that do not add up (a header that passed its CRC but was written wrong) are refused too."""
    problems = []
    if reader.pos != len(reader.data):
        problems.append(f"{len(reader.data) - reader.pos} stray header bytes")
    if sum(s.nbytes for s in h.segments) != h.original_len:
        problems.append("segments do not add up to the original length")
    if sum(s.num_tokens for s in h.segments) != h.num_tokens:
        problems.append("segment tokens do not add up")
    if h.num_tokens and (h.chunk_tokens < 1 or len(h.chunk_lengths) != -(-h.num_tokens // h.chunk_tokens)):
        problems.append("the chunk table does not match the number of tokens")
    if h.raw_len + sum(h.chunk_lengths) != h.body_len or h.raw_method not in (RAW_STORED, RAW_LZMA):
        problems.append("the body's parts do not add up")
    if h.chunk_lengths and not (1 <= h.num_batches <= len(h.chunk_lengths) and 1 <= h.keep < h.context):
        problems.append("the coder's schedule is not valid")
    if problems:
        raise ValueError(f"{name}: corrupted header ({'; '.join(problems)})")


class _Reader:
    def __init__(self, data: bytes, name: str):
        self.data, self.pos, self.name = data, 0, name

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"{self.name}: corrupted header (it ends inside a field)")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value
            if shift > 63:
                raise ValueError(f"{self.name}: corrupted header (a number is too long)")


def _varint(out: bytearray, value: int) -> None:
    assert value >= 0
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
