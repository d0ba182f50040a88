"""The model-driven coder in this process: round trips, determinism, near-optimal length, the guards."""

import os
import random

import pytest
import torch

from slmforge.checkpoint import load_for_inference
from slmforge.compress import codec, container, lm
from slmforge.model.ops import choice
from tests.compress.conftest import sample_text

# Small chunks, batches and window: rows leave the batch early, the window slides, there are several batches.
SMALL = dict(chunk_tokens=100, batch_rows=3, context=32, show_progress=False)


def mixed_bytes() -> bytes:
    return b"\xff\xfe" + sample_text().encode() + random.Random(1).randbytes(300) + sample_text()[:50].encode()


def test_round_trip_in_process(run):
    data = mixed_bytes()
    blob, stats = codec.compress(run, data, **SMALL, workers=1)
    header, _, streams = container.unpack(blob, "x")
    assert header.num_tokens > 3 * 100 and header.num_batches >= 2 and len(streams) == -(-header.num_tokens // 100)
    assert (header.context, header.keep) == (32, 16)
    back, _ = codec.decompress(run, blob, "x", workers=1, show_progress=False)
    assert back == data and stats.compressed_bytes == len(blob)


def test_the_same_bytes_every_time_and_for_any_number_of_workers(run, monkeypatch):
    """Worker processes (spawned, one thread each) give the bytes this process gives (the CLI tests decompress in
    another process)."""
    data = sample_text().encode() * 2
    first = codec.compress(run, data, **SMALL, workers=1)[0]
    assert codec.compress(run, data, **SMALL, workers=1)[0] == first
    monkeypatch.setattr(codec, "MIN_TOKENS_PER_PROCESS", 1)
    assert codec.compress(run, data, **SMALL, workers=2)[0] == first


def test_code_length_matches_the_models_log_loss(run):
    """Each chunk's stream is within a few bytes of the summed -log2 p of its tokens under the same schedule."""
    model, tokenizer, _ = load_for_inference(run)
    ids = tokenizer.encode_text(sample_text())
    chunks = [ids[i : i + 150] for i in range(0, len(ids), 150)]
    with lm.reference_mode():
        streams = lm.encode_rows(model, chunks, 32, 16, tokenizer.eos_id)
        ideal = [lm.code_length_bits(model, [c], 32, 16, tokenizer.eos_id) for c in chunks]
        assert lm.decode_rows(model, streams, [len(c) for c in chunks], 32, 16, tokenizer.eos_id) == chunks
    for stream, bits in zip(streams, ideal):
        assert bits - 24 <= 8 * len(stream) <= bits + 24, (len(stream), bits / 8)


def test_another_model_is_refused_before_decoding(run, other_run):
    blob = codec.compress(run, sample_text().encode(), **SMALL, workers=1)[0]
    with pytest.raises(ValueError, match="^f.slmz: compressed with another model .*decompress with the run folder"):
        codec.decompress(other_run, blob, "f.slmz", workers=1, show_progress=False)


def test_a_machine_that_computes_other_floats_is_refused(run, monkeypatch):
    """The probe fingerprint of the file differs from this machine's: one line, before decoding."""
    blob = codec.compress(run, sample_text().encode(), **SMALL, workers=1)[0]
    header, raw, streams = container.unpack(blob, "x")
    header.probe = bytes(8)
    with pytest.raises(ValueError, match="computes other probabilities .*probe fingerprint differs"):
        codec.decompress(run, container.pack(header, raw, streams), "f.slmz", workers=1, show_progress=False)
    # Floats that differ in the last bit change the fingerprint.
    model, tokenizer, _ = load_for_inference(run)
    before = lm.probe_fingerprint(model, tokenizer)
    with torch.no_grad():
        model.norm.weight.mul_(1 + 2**-20)
    assert lm.probe_fingerprint(model, tokenizer) != before


def test_a_changed_probability_table_fails_the_crc_not_silently(run, monkeypatch):
    """Where the probe passes but a later table differs, the CRC32 of the original catches it."""
    data = sample_text().encode()
    blob = codec.compress(run, data, **SMALL, workers=1)[0]
    quantise = lm.quantise

    def off_by_one(logits):
        freq, cum = quantise(logits)
        if freq.shape[0] == 3:  # the file's batches have 3 rows, the probe's 2
            freq[:, 0] += 1 << 20
            cum += 1 << 20
        return freq, cum

    monkeypatch.setattr(lm, "quantise", off_by_one)
    with pytest.raises(ValueError, match="differs from the original"):
        codec.decompress(run, blob, "f.slmz", workers=1, show_progress=False)


def test_reference_mode_forces_one_thread_and_torch_and_restores_them():
    threads, env = torch.get_num_threads(), os.environ.get(choice.KERNELS_ENV)
    with lm.reference_mode():
        assert torch.get_num_threads() == 1
        w = torch.randn(8, 32)
        assert choice.inference_kernel(1, w) is torch.nn.functional.linear
        assert choice.inference_kernel(300, w) is torch.nn.functional.linear
    assert torch.get_num_threads() == threads and os.environ.get(choice.KERNELS_ENV) == env


def test_bad_settings_are_one_line_errors(run):
    with pytest.raises(ValueError, match="context=999: expected 2 to the model's max_seq_len 64"):
        codec.compress(run, b"text", context=999, show_progress=False)
