"""An integer range coder (arithmetic coding with bytes out), in pure Python integers.

Symbols come with integer frequencies: a symbol is ``(start, size, total)``, the half-open slice
``[start, start + size)`` of ``[0, total)``; it costs ``-log2(size / total)`` bits, plus at most about
``total / range`` relative for the integer division (``range`` stays above 2^56, totals below ``MAX_TOTAL``
= 2^32: under 2^-24 bits a symbol) and a few bytes at the end of the stream.

The layout is LZMA's range coder (Igor Pavlov's ``RangeEnc_ShiftLow``) widened from 32 to 64 bits: ``low``
holds one carry bit above its 64, and bytes are written late, one ``cache`` byte and a run of 0xFF bytes held
back until a carry can no longer reach them. Two changes make streams short: the first byte, always 0, is not
written (the decoder knows it), and ``finish`` picks the value of the final interval with the most trailing zero
bits and drops the trailing zero bytes (the decoder reads zeros past the end). Every stream decodes the exact
number of symbols it was told; a damaged stream decodes to wrong symbols, never to an error or a hang here (the
container's checksums catch it).
"""

from __future__ import annotations

PRECISION = 64
TOP = 1 << PRECISION  # low and range live in [0, TOP); low has a carry bit on top
BOTTOM = 1 << (PRECISION - 8)  # range is renormalised to stay at or above this
MAX_TOTAL = 1 << 32  # range // total >= 2^24, so no symbol of size >= 1 collapses
HEAD_BYTES = PRECISION // 8  # what the decoder reads first


class Encoder:
    def __init__(self):
        self.low = 0
        self.range = TOP - 1
        self.cache = 0  # the byte held back while a carry may still reach it
        self.cache_size = 1  # the cache byte and the 0xFF bytes held back after it
        self.out = bytearray()

    def encode(self, start: int, size: int, total: int) -> None:
        """Code the slice ``[start, start + size)`` of ``[0, total)``; 0 <= start, 1 <= size, total <= MAX_TOTAL."""
        r = self.range // total
        self.low += r * start
        self.range = r * size
        while self.range < BOTTOM:
            self.range <<= 8
            self._shift_low()

    def _shift_low(self) -> None:
        low = self.low
        if (low & (TOP - 1)) < 0xFF << (PRECISION - 8) or low >= TOP:
            carry = low >> PRECISION
            self.out.append((self.cache + carry) & 0xFF)
            self.out.extend(bytes([(0xFF + carry) & 0xFF]) * (self.cache_size - 1))
            self.cache_size = 0
            self.cache = (low >> (PRECISION - 8)) & 0xFF
        self.cache_size += 1
        self.low = (low & (BOTTOM - 1)) << 8

    def finish(self) -> bytes:
        """The coded bytes. The encoder is spent afterwards."""
        # The value with the most trailing zero bits inside [low, low + range): its zero tail need not be stored.
        for bits in range(PRECISION, -1, -1):
            mask = (1 << bits) - 1
            value = (self.low + mask) & ~mask
            if value < self.low + self.range:
                break
        self.low = value
        for _ in range(HEAD_BYTES + 1):
            self._shift_low()
        # The first byte is the initial cache, always 0: the interval never leaves [0, TOP), so no carry reaches it.
        assert self.out[0] == 0
        return bytes(self.out[1:]).rstrip(b"\0")


class Decoder:
    """Reads what ``Encoder`` wrote: ``target(total)`` gives a number in ``[0, total)``, the caller finds the
    symbol whose slice holds it and calls ``consume(start, size)``."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = HEAD_BYTES
        self.range = TOP - 1
        self.code = int.from_bytes(data[:HEAD_BYTES].ljust(HEAD_BYTES, b"\0"), "big")  # value - low
        self.r = 1

    def target(self, total: int) -> int:
        self.r = self.range // total
        # A valid stream always gives < total; a damaged one may not, and must still name a symbol.
        return min(self.code // self.r, total - 1)

    def consume(self, start: int, size: int) -> None:
        self.code -= self.r * start
        self.range = self.r * size
        while self.range < BOTTOM:
            self.range <<= 8
            byte = self.data[self.pos] if self.pos < len(self.data) else 0
            self.pos += 1
            # The mask is a no-op on a valid stream (code < range < TOP) and keeps a damaged one's ints small.
            self.code = ((self.code << 8) | byte) & (TOP - 1)


def encode(symbols: list[tuple[int, int, int]]) -> bytes:
    """A whole stream of ``(start, size, total)`` symbols -> bytes (the reference use of ``Encoder``)."""
    enc = Encoder()
    for start, size, total in symbols:
        enc.encode(start, size, total)
    return enc.finish()


def decode(data: bytes, tables: list[list[int]]) -> list[int]:
    """Symbol indices from bytes, given each step's frequency table (``tables[i][s]``: the frequency of symbol s)."""
    dec = Decoder(data)
    out = []
    for freqs in tables:
        target = dec.target(sum(freqs))
        start = 0
        for symbol, size in enumerate(freqs):
            if target < start + size:
                break
            start += size
        dec.consume(start, size)
        out.append(symbol)
    return out
