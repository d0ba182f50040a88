"""Any bytes -> segments: text the model codes, and raw bytes coded apart (stored, or LZMA2 where that is smaller).

The input is decoded as UTF-8 with ``surrogateescape``: each byte that is not part of valid UTF-8 becomes a lone
surrogate (U+DC80..U+DCFF), which valid UTF-8 can never hold, so the runs between them are exactly the valid text.
A text run becomes a text segment only if it is at least ``MIN_TEXT_BYTES`` long (a segment costs header bytes;
random bytes hold many short valid runs) and the tokenizer gives it back exactly (``decode(encode_text(s)) == s``,
checked, never assumed); anything else joins the raw bytes. Empty input has no segments.
"""

from __future__ import annotations

import lzma
import re

from slmforge.compress.container import RAW_LZMA, RAW_STORED, Segment

MIN_TEXT_BYTES = 16
# xz -9e's LZMA2 without the xz container (its 60 bytes of headers and checks; the file has its own CRC32s).
_LZMA = dict(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
_ESCAPED = re.compile("[\udc80-\udcff]+")


def split(data: bytes, tokenizer) -> tuple[list[Segment], list[list[int]], bytes]:
    """(segments, the tokens of each text segment in order, the raw bytes of the others back to back)."""
    segments: list[Segment] = []
    tokens: list[list[int]] = []
    raw = bytearray()
    for text, piece in _runs(data):
        ids = tokenizer.encode_text(text) if text is not None else []
        if text is not None and len(piece) >= MIN_TEXT_BYTES and tokenizer.decode(ids, skip_special=False) == text:
            segments.append(Segment(len(piece), True, len(ids)))
            tokens.append(ids)
            continue
        raw += piece
        if segments and not segments[-1].text:
            segments[-1].nbytes += len(piece)
        else:
            segments.append(Segment(len(piece), False))
    return segments, tokens, bytes(raw)


def _runs(data: bytes):
    """(text or None, its bytes) for each maximal run of valid UTF-8 (text) or of other bytes (None)."""
    text = data.decode("utf-8", errors="surrogateescape")
    pos = 0
    for m in _ESCAPED.finditer(text):
        if m.start() > pos:
            part = text[pos : m.start()]
            yield part, part.encode("utf-8")
        yield None, m.group().encode("utf-8", errors="surrogateescape")
        pos = m.end()
    if pos < len(text):
        part = text[pos:]
        yield part, part.encode("utf-8")


def pack_raw(raw: bytes) -> tuple[int, bytes]:
    """(method, bytes): LZMA2 at its strongest where that is smaller, else the bytes as they are."""
    packed = lzma.compress(raw, **_LZMA) if raw else b""
    return (RAW_LZMA, packed) if len(packed) < len(raw) else (RAW_STORED, raw)


def unpack_raw(method: int, blob: bytes, nbytes: int, name: str) -> bytes:
    try:
        # Never more than the header's length, however the blob was made.
        raw = lzma.LZMADecompressor(**_LZMA).decompress(blob, nbytes + 1) if method == RAW_LZMA else blob
    except lzma.LZMAError:
        raw = b""
    if len(raw) != nbytes:
        raise ValueError(f"{name}: corrupted (its raw bytes do not unpack to the {nbytes} bytes the header says)")
    return raw


def join(segments: list[Segment], texts: list[str], raw: bytes, name: str) -> bytes:
    """The original bytes from the decoded texts (one per text segment) and the raw bytes."""
    out = bytearray()
    texts_left, raw_pos = iter(texts), 0
    for seg in segments:
        if seg.text:
            piece = next(texts_left).encode("utf-8", errors="surrogatepass")
            if len(piece) != seg.nbytes:
                raise ValueError(f"{name}: the decoded text differs from the original ({len(piece)} bytes where "
                                 f"{seg.nbytes} were coded): this machine computed other probabilities than the one "
                                 f"that compressed it")
            out += piece
        else:
            out += raw[raw_pos : raw_pos + seg.nbytes]
            raw_pos += seg.nbytes
    return bytes(out)
