"""Autoregressive generation: prefill the prompt once, then decode one token at a time with the cache.

``generate_ids`` works on token ids (and has ``use_cache=False`` for the full-recompute reference);
``generate`` works on text with a tokenizer and stop strings. Sampling: temperature, top-k, top-p.
Shapes: B batch, T prompt length, V vocabulary.
"""

from __future__ import annotations

from typing import Iterator

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (B, V) -> next ids (B,). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream_ids(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, use_cache: bool = True, generator: torch.Generator | None = None,
               return_logits: bool = False) -> Iterator:
    """Yield next ids (B,) one step at a time (with their logits (B, V) if ``return_logits``)."""
    model.eval()
    tokens = prompt
    cache = model.init_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens) if use_cache else None
    logits, _ = model(prompt, cache=cache)
    for i in range(max_new_tokens):
        last = logits[:, -1]
        nxt = sample_next(last, temperature, top_k, top_p, generator)
        yield (nxt, last) if return_logits else nxt
        if i + 1 == max_new_tokens:
            break
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        logits, _ = model(nxt[:, None], cache=cache) if use_cache else model(tokens)


def generate_ids(model, prompt: torch.Tensor, max_new_tokens: int, eos_id: int | None = None, **kw) -> torch.Tensor:
    """prompt (B, T) -> (B, T + new). Stops early once every row has produced ``eos_id``."""
    out, done = [prompt], torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for nxt in stream_ids(model, prompt, max_new_tokens, **kw):
        out.append(nxt[:, None])
        if eos_id is not None:
            done |= nxt == eos_id
            if done.all():
                break
    return torch.cat(out, dim=1)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 50,
             top_p: float = 0.95, stop: list[str] | None = None, seed: int | None = None,
             new_document: bool = True) -> str:
    """Text in, continuation out; stops at EOS, at any stop string (excluded), or after max_new_tokens."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, stop, seed,
                               new_document))


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 50,
                top_p: float = 0.95, stop: list[str] | None = None, seed: int | None = None,
                new_document: bool = True, stop_ids: list[int] | None = None) -> Iterator[str]:
    """Yield text pieces as they are decoded; stop strings and stop tokens are never emitted.

    Token shards separate documents with EOS, so ``new_document`` starts the prompt with EOS: the
    context in which the model saw every document begin (GPT-2's ``<|endoftext|>`` convention).
    """
    device = next(model.parameters()).device
    ids = ([tokenizer.eos_id] if new_document else []) + tokenizer.encode(prompt)
    max_len = model.cfg.max_seq_len
    ids = ids[-max(1, max_len - max_new_tokens):]
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    prompt_t = torch.tensor([ids], device=device)
    new: list[int] = []
    emitted = ""
    stop = [s for s in (stop or []) if s]
    hold = max((len(s) for s in stop), default=0)  # chars held back until we know they start no stop string
    for nxt in stream_ids(model, prompt_t, max_new_tokens, temperature, top_k, top_p, generator=gen):
        token = int(nxt[0])
        if token == tokenizer.eos_id or token in (stop_ids or ()):
            break
        new.append(token)
        text = tokenizer.decode(new)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            yield text[len(emitted):cut]
            return
        # Hold back a possible partial stop string and an incomplete UTF-8 character at the end.
        safe = len(text) - hold if hold else len(text)
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        if safe > len(emitted):
            yield text[len(emitted):safe]
            emitted = text[:safe]
    text = tokenizer.decode(new)
    if len(text) > len(emitted):
        yield text[len(emitted):]
