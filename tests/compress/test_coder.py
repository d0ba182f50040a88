"""The range coder alone: random frequency tables round-trip, cost what they should, and damage never hangs it."""

import math
import random

import pytest

from slmforge.compress import coder


def random_stream(rng: random.Random, num_symbols: int):
    """(symbols as (start, size, total), the tables, the chosen indices, the ideal code length in bits)."""
    symbols, tables, chosen, bits = [], [], [], 0.0
    for _ in range(num_symbols):
        vocab = rng.choice([1, 2, 3, 17, 300])
        kind = rng.random()
        if kind < 0.3:  # one symbol takes almost all of a 2^32 total; the others have frequency 1
            freqs = [1] * vocab
            freqs[rng.randrange(vocab)] = coder.MAX_TOTAL - vocab + 1
        elif kind < 0.6:
            freqs = [rng.randint(1, 1 << rng.randint(1, 23)) for _ in range(vocab)]
        else:
            freqs = [rng.randint(1, 4) for _ in range(vocab)]
        # The rarest symbol now and then: the most expensive case.
        s = min(range(vocab), key=freqs.__getitem__) if rng.random() < 0.3 else rng.randrange(vocab)
        total = sum(freqs)
        symbols.append((sum(freqs[:s]), freqs[s], total))
        tables.append(freqs)
        chosen.append(s)
        bits += -math.log2(freqs[s] / total)
    return symbols, tables, chosen, bits


@pytest.mark.parametrize("num_symbols", [0, 1, 2, 7, 100, 2000])
def test_round_trip_of_random_tables_costs_the_ideal_length(num_symbols):
    rng = random.Random(num_symbols)
    for _ in range(20 if num_symbols < 1000 else 2):
        symbols, tables, chosen, bits = random_stream(rng, num_symbols)
        data = coder.encode(symbols)
        assert coder.decode(data, tables) == chosen
        # Near-optimal: at most 2 bytes over the summed -log2 p (the flush). It may be under: the zero tail is not
        # stored, and a stream of first symbols (start 0) is all zeros.
        assert 8 * len(data) <= bits + 16, (len(data), bits)


def test_a_certain_symbol_costs_nothing_and_an_empty_stream_is_empty():
    assert coder.encode([]) == b""
    assert coder.encode([(0, 1, 1)] * 1000) == b""
    assert coder.decode(b"", [[1]] * 5) == [0] * 5


def test_carries_propagate_through_runs_of_ff():
    """Symbols at the very top of each interval push carries through held-back 0xFF bytes."""
    total = coder.MAX_TOTAL
    symbols = [(total - 2, 1, total), (total - 1, 1, total), (0, 1, total)] * 200 + [(total - 1, 1, total)] * 50
    data = coder.encode(symbols)
    dec = coder.Decoder(data)
    for start, size, total in symbols:
        target = dec.target(total)
        assert start <= target < start + size
        dec.consume(start, size)


def test_damaged_streams_decode_the_asked_number_of_symbols():
    rng = random.Random(7)
    symbols, tables, chosen, _ = random_stream(rng, 300)
    data = bytearray(coder.encode(symbols))
    data[len(data) // 2] ^= 0x55
    for damaged in (bytes(data), bytes(data[: len(data) // 3]), b"\xff" * 40):
        out = coder.decode(damaged, tables)
        assert len(out) == len(tables) and all(0 <= s < len(t) for s, t in zip(out, tables))
