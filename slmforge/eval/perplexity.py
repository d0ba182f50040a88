"""Loss, perplexity and bits per byte of a model on text files, with strided windows over the token stream.

Each file is one stream: EOS (the document start the model saw in training), then the file's tokens. Windows of
``seq_len`` tokens start every ``stride`` tokens; a window scores only the tokens no earlier window scored, so
each token is predicted once, with at least ``seq_len - stride`` tokens of context once the stream is that long
(``stride = seq_len`` gives disjoint windows, as lm-eval's rolling log-likelihood; smaller strides give more
context for more compute). Bits per byte = total nats / ln 2 / total UTF-8 bytes: unlike per-token numbers it
compares models with different tokenizers (Gao et al. 2020, The Pile, arXiv 2101.00027, sec. 3).
Shapes: B windows per batch, T window length, V vocabulary.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from slmforge.checkpoint import load_for_inference
from slmforge.progress import progress_bar
from slmforge.runs import RunDir, write_json


@dataclass
class PerplexityConfig:
    seq_len: int = 0  # window length in tokens; 0 = the model's max_seq_len
    stride: int = 0  # tokens between window starts; 0 = seq_len // 2
    batch_size: int = 4
    out: str = ""  # summary JSON; "" = <run_dir>/eval/perplexity.json


def windows(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first) of each window over a stream of ``num_tokens`` ids.

    The window reads ids[start:end-1] (at most ``seq_len`` inputs) to predict ids[start+1:end], and scores the
    predictions of ids[first:end]; earlier positions were scored by an earlier window. Position 0 is context only.
    """
    out, start, first = [], 0, 1
    while first < num_tokens:
        end = min(start + seq_len + 1, num_tokens)
        out.append((start, end, first))
        start, first = start + stride, end
    return out


@torch.no_grad()
def stream_nats(model, ids: list[int], seq_len: int, stride: int, batch_size: int = 4) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ``ids[1:]`` given what precedes each, and the token count."""
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    spans = windows(len(ids), seq_len, stride)
    for i in progress_bar(range(0, len(spans), batch_size), desc="perplexity", unit="batch"):
        batch = spans[i : i + batch_size]
        width = max(end - 1 - start for start, end, _ in batch)
        inputs = torch.zeros(len(batch), width, dtype=torch.long, device=device)  # right-padded
        targets = torch.full((len(batch), width), -100, dtype=torch.long, device=device)
        for b, (start, end, first) in enumerate(batch):
            inputs[b, : end - 1 - start] = torch.tensor(ids[start : end - 1])
            targets[b, first - start - 1 : end - 1 - start] = torch.tensor(ids[first:end])
        logits, _ = model(inputs)
        keep = targets != -100
        total += F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum").item()
        count += int(keep.sum())
    return total, count


def perplexity(model, tokenizer, files: list[str | Path], cfg: PerplexityConfig | None = None) -> dict:
    """Per file and overall: nats, tokens, bytes, loss (nats/token), perplexity and bits per byte."""
    cfg = cfg or PerplexityConfig()
    seq_len = cfg.seq_len or model.cfg.max_seq_len
    stride = cfg.stride or max(1, seq_len // 2)
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride={stride} must be between 1 and seq_len={seq_len}")
    if not files:
        raise ValueError("no text files to score: give one or more files after the run folder")
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise ValueError(f"{', '.join(missing)}: no such file; give text files to score after the run folder")
    t0 = time.perf_counter()
    per_file = {}
    for path in map(Path, files):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if not text.strip():
            # Nothing to predict: the loss would read 0 and the perplexity 1.00, a perfect score for no evidence.
            raise ValueError(f"{path}: {'empty' if not text else 'only whitespace'}; give a file with text to score")
        nats, tokens = stream_nats(model, [tokenizer.eos_id] + tokenizer.encode(text), seq_len, stride, cfg.batch_size)
        per_file[str(path)] = _metrics(nats, tokens, len(text.encode("utf-8")))
    total = _metrics(*(sum(m[k] for m in per_file.values()) for k in ("nats", "tokens", "bytes")))
    return {"files": per_file, "total": total, "seq_len": seq_len, "stride": stride, "config": asdict(cfg),
            "seconds": time.perf_counter() - t0}


def _metrics(nats: float, tokens: int, num_bytes: int) -> dict:
    loss = nats / max(tokens, 1)
    return {"nats": nats, "tokens": tokens, "bytes": num_bytes, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nats / math.log(2) / max(num_bytes, 1)}


def evaluate(run_dir: str | Path, files: list[str | Path], cfg: PerplexityConfig | None = None) -> dict:
    """``perplexity`` of a run folder's model, also written as JSON (``cfg.out`` or <run_dir>/eval/perplexity.json)."""
    cfg = cfg or PerplexityConfig()
    model, tokenizer, _ = load_for_inference(run_dir)
    result = perplexity(model, tokenizer, files, cfg)
    write_json(cfg.out or RunDir.at(run_dir).eval_output("perplexity.json"), result)
    return result
