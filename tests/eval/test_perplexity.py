"""Strided-window perplexity and bits per byte."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from slmforge.cli import main
from slmforge.eval.perplexity import PerplexityConfig, perplexity, stream_nats, windows
from slmforge.model.lm import LM


@pytest.mark.parametrize("num_tokens,seq_len,stride", [(2, 4, 4), (10, 4, 4), (10, 4, 1), (11, 4, 3), (63, 8, 5),
                                                       (5, 16, 8)])
def test_windows_score_every_token_once_with_enough_context(num_tokens, seq_len, stride):
    spans = windows(num_tokens, seq_len, stride)
    assert [p for _, end, first in spans for p in range(first, end)] == list(range(1, num_tokens))
    for start, end, first in spans:
        assert end - 1 - start <= seq_len and first >= start + 1
        # every scored token but those of the first window sees at least seq_len - stride tokens
        assert start == 0 or first - start >= seq_len - stride


def test_one_window_equals_a_full_forward(tiny_model_cfg):
    model = LM(tiny_model_cfg).eval()
    ids = torch.randint(0, 97, (40,)).tolist()
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    full = F.cross_entropy(logits[0], torch.tensor(ids[1:]), reduction="sum").item()
    nats, count = stream_nats(model, ids, seq_len=64, stride=32)
    assert count == 39 and nats == pytest.approx(full, rel=1e-5)
    # Strided windows give each token more context than disjoint ones, never less: a different, close sum.
    strided, count = stream_nats(model, ids, seq_len=16, stride=4, batch_size=3)
    assert count == 39 and strided != pytest.approx(full, rel=1e-7) and abs(strided - full) / full < 0.2


def test_bits_per_byte_and_cli(eval_run, loaded, tmp_path, capsys):
    model, tok = loaded
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Question: Tom has 3 apples and buys 4 more.\nAnswer: 7\n" * 5)
    b.write_text("Ünïcödé: 5 € and ✓ marks.\n" * 3)
    result = perplexity(model, tok, [a, b], PerplexityConfig(seq_len=32, stride=16))
    files, total = result["files"], result["total"]
    assert files[str(b)]["bytes"] == len(b.read_text().encode("utf-8")) > len(b.read_text())
    assert total["nats"] == pytest.approx(files[str(a)]["nats"] + files[str(b)]["nats"])
    assert total["bits_per_byte"] == pytest.approx(total["nats"] / math.log(2) / total["bytes"])
    assert total["perplexity"] == pytest.approx(math.exp(total["nats"] / total["tokens"]))
    assert files[str(a)]["tokens"] == len(tok.encode(a.read_text()))

    assert main(["eval", "ppl", str(eval_run), str(a), str(b), "seq_len=32", "stride=16"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    saved = json.loads((eval_run / "eval" / "perplexity.json").read_text())
    assert saved["total"]["nats"] == pytest.approx(total["nats"], rel=1e-6)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    assert main(["eval", "ppl", str(eval_run), str(bad)]) == 2
    assert "bad.txt" in capsys.readouterr().err
