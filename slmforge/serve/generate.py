"""Autoregressive generation: prefill the prompt once, then decode one token at a time with the cache.

``generate_ids`` works on token ids (and has ``use_cache=False`` for the full-recompute reference);
``generate`` works on text with a tokenizer and stop strings; ``generate_batch`` continues prompts of different
lengths in one left-padded batch. Sampling: temperature, top-k, top-p.

Fast path (``PaddedDecoder``, attention-only models): the blocks run here, through ``Attention.heads`` with a
per-row key mask and per-row RoPE positions, so left-padded rows decode exactly as they would alone; prefill
computes logits for the last position only, the KV cache is preallocated, and finished rows leave the batch.
Other models go through ``LM.forward`` with its caches, one row at a time when prompts differ in length.
``use_cache=False`` (full recompute through ``LM.forward``) is the reference the tests compare both with.
Shapes: B batch, T prompt length (padded), S keys, H query heads, K kv heads, D head dim, V vocabulary.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from slmforge.model.attention import Attention
from slmforge.model.layers import linear, rope_tables


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


class PaddedDecoder:
    """KV-cached decoding of left-padded rows through attention-only models.

    ``prefill()`` -> logits (B, V) of each prompt's last token; ``step(ids)`` appends one token per row and
    returns the next logits; ``keep(rows, ids)`` drops the other rows from the batch. Row i's tokens sit at RoPE
    positions 0, 1, ... from its first real token, and its queries never see its padding, so every row gets
    the logits it would get alone (up to float rounding).
    """

    def __init__(self, model, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0):
        if not prompts or not all(prompts):
            raise ValueError("generation needs at least one prompt and no empty prompt")
        self.model = model
        param = next(model.parameters())
        length = max(map(len, prompts))
        self.num_pad = torch.tensor([length - len(p) for p in prompts], device=param.device)  # (B,)
        self.tokens = torch.tensor([[pad_id] * (length - len(p)) + list(p) for p in prompts], device=param.device)
        total = length + max_new_tokens
        self.caches = model.init_cache(len(prompts), total)
        # (B, total) True where a slot holds a real token (left padding is False; new tokens are real)
        self.valid = torch.arange(total, device=param.device)[None, :] >= self.num_pad[:, None]
        self.padded = bool(self.num_pad.any())
        a = model.blocks[0].mixer
        self.cos, self.sin = rope_tables(a.head_dim, total, a.theta, device=param.device)  # (total, D/2)
        self.window = a.window
        self.pos = 0  # slots filled so far

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        t = self.tokens.shape[1]
        slots = torch.arange(t, device=self.tokens.device)
        positions = slots[None, :] - self.num_pad[:, None]  # (B, T); negative on padding
        if not self.padded and not self.window:
            return self._forward(self.tokens, positions, None)
        mask = slots[None, :] <= slots[:, None]  # (T, S) causal over slots
        if self.window:
            mask &= slots[None, :] > slots[:, None] - self.window
        mask = mask & self.valid[:, None, :t]  # (B, T, S)
        # A padding query sees itself only, so no softmax row is empty (that would give NaN).
        mask |= torch.eye(t, dtype=torch.bool, device=mask.device)
        return self._forward(self.tokens, positions, mask[:, None])

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        s = self.pos + 1
        mask = None
        if self.padded or (self.window and s > self.window):
            mask = self.valid[:, :s].clone()  # (B, S)
            if self.window:
                mask[:, : max(0, s - self.window)] = False
            mask = mask[:, None, None, :]  # (B, 1, 1, S)
        return self._forward(ids[:, None], (self.pos - self.num_pad)[:, None], mask)

    def keep(self, rows: list[int], ids: torch.Tensor) -> torch.Tensor:
        """Drop every row but ``rows`` (batch indices, ascending) from the batch; returns their ``ids``."""
        if len(rows) == ids.shape[0]:
            return ids
        index = torch.tensor(rows, device=ids.device)
        for cache in self.caches:
            cache.k, cache.v = cache.k[index], cache.v[index]
        self.valid, self.num_pad = self.valid[index], self.num_pad[index]
        self.padded = bool(self.num_pad.any())
        return ids[index]

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask) -> torch.Tensor:
        """tokens, positions: (B, T); mask: (B, 1, T, S) bool or None (every key) -> last logits (B, V)."""
        model = self.model
        positions = positions.clamp(min=0)
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # (B, T, 1, D/2)
        x = model.tok_emb(tokens)
        for block, cache in zip(model.layers(), self.caches):  # a repeated block once per layer it runs
            x = x + linear(block.mixer.heads(block.mixer_norm(x), cache, (cos, sin), mask), block.mixer.wo.weight)
            ffn = block.ffn if model.ffn is None else model.ffn
            x = x + ffn(block.ffn_norm(x))[0]
        self.pos += tokens.shape[1]
        return linear(model.norm(x[:, -1]), model.head.weight)


def fast_path(model) -> bool:
    """True when ``PaddedDecoder`` can run the model: every token mixer is attention."""
    return all(type(block.mixer) is Attention for block in model.blocks)


@torch.no_grad()
def stream_ids(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, use_cache: bool = True, generator: torch.Generator | None = None,
               return_logits: bool = False) -> Iterator:
    """Yield next ids (B,) one step at a time (with their logits (B, V) if ``return_logits``)."""
    model.eval()
    if use_cache and fast_path(model):
        decoder = PaddedDecoder(model, prompt.tolist(), max_new_tokens)
        step = decoder.step
        last = decoder.prefill()
    else:
        tokens = prompt
        cache = model.init_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens) if use_cache else None

        def step(nxt):
            nonlocal tokens
            if not use_cache:
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            return model(nxt[:, None] if use_cache else tokens, cache=cache)[0][:, -1]

        last = model(prompt, cache=cache)[0][:, -1]
    for i in range(max_new_tokens):
        nxt = sample_next(last, temperature, top_k, top_p, generator)
        yield (nxt, last) if return_logits else nxt
        if i + 1 == max_new_tokens:
            break
        last = step(nxt)


def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None = None,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   generator: torch.Generator | None = None,
                   stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Continue prompts of any lengths in one left-padded batch; return each row's new ids.

    A row ends at ``eos_id`` (not included), once ``stop(new_ids)`` is true (checked after every token; the
    ids are kept), or after ``max_new_tokens``; finished rows leave the batch. Models without the fast path
    run one prompt at a time.
    """
    model.eval()
    if not fast_path(model):
        return generate_batch_ref(model, prompts, max_new_tokens, eos_id, temperature, top_k, top_p, generator,
                                  stop, use_cache=True)
    decoder = PaddedDecoder(model, prompts, max_new_tokens)
    new: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # batch row -> prompt index
    logits = decoder.prefill()
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        alive = []
        for r, token in enumerate(nxt.tolist()):
            ended = token == eos_id
            if not ended:
                new[rows[r]].append(token)
                ended = stop is not None and stop(new[rows[r]])
            if not ended:
                alive.append(r)
        if not alive or i + 1 == max_new_tokens:
            break
        nxt, rows = decoder.keep(alive, nxt), [rows[r] for r in alive]
        logits = decoder.step(nxt)
    return new


def generate_batch_ref(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None = None,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                       generator: torch.Generator | None = None,
                       stop: Callable[[list[int]], bool] | None = None, use_cache: bool = False) -> list[list[int]]:
    """``generate_batch`` one prompt at a time, no padding; with full recompute by default: the reference."""
    device = next(model.parameters()).device
    out = []
    for p in prompts:
        new: list[int] = []
        for nxt in stream_ids(model, torch.tensor([p], device=device), max_new_tokens, temperature, top_k, top_p,
                              use_cache=use_cache, generator=generator):
            if int(nxt[0]) == eos_id:
                break
            new.append(int(nxt[0]))
            if stop is not None and stop(new):
                break
        out.append(new)
    return out


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
