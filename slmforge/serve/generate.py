"""Autoregressive generation: prefill the prompt once, then decode one token at a time with the cache.

``generate_ids`` works on token ids (and has ``use_cache=False`` for the full-recompute reference);
``generate`` works on text with a tokenizer and stop strings; ``generate_batch`` continues prompts of different
lengths in one left-padded batch. Sampling: temperature, top-k, top-p.

Cached decoding (``PaddedDecoder``) runs ``LM.forward`` on caches that know each row's left padding, for every
mixer: attention masks padded keys and gives each row its own RoPE positions, the recurrent mixers leave their
state untouched on padding (``model/cache.py``), so left-padded rows decode exactly as they would alone. Prefill
computes logits for the last position only, the KV cache is preallocated, and finished rows leave the batch.
``generate_batch_ref`` (one prompt at a time, full recompute through ``LM.forward``) is the reference the tests
compare it with. A tool (``tools.py``: ``tools="calculator"``, the GSM8K paper's calculator) is a per-row hook: after
each token it reads the row's new ids and may queue ids that the next steps feed instead of sampled ones.
Shapes: B batch, T prompt length (padded), V vocabulary.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from slmforge.serve.tools import Tool, force, make_tool


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
    """KV-cached decoding of a batch of prompts of any lengths, left-padded, through ``LM.forward``.

    ``prefill()`` -> logits (B, V) of each prompt's last token; ``step(ids)`` appends one token per row and
    returns the next logits; ``keep(rows, ids)`` drops the other rows from the batch. The caches carry each row's
    left padding (``LM.init_cache(num_pad=...)``) and every mixer keeps padding out of the real tokens' results,
    so every row gets the logits it would get alone (up to float rounding).
    """

    def __init__(self, model, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0,
                 images: torch.Tensor | None = None, image_slots: list[list[bool]] | None = None):
        if not prompts or not all(prompts):
            raise ValueError("generation needs at least one prompt and no empty prompt")
        self.model = model
        device = next(model.parameters()).device
        length = max(map(len, prompts))
        self.tokens = torch.tensor([[pad_id] * (length - len(p)) + list(p) for p in prompts], device=device)
        # Images (N, P, F) enter at the prefill only, at each prompt's image slots (``LM.forward``'s image_mask).
        self.images, self.image_mask = images, None
        if images is not None:
            self.image_mask = torch.tensor([[False] * (length - len(m)) + list(m) for m in image_slots], device=device)
        num_pad = torch.tensor([length - len(p) for p in prompts], device=device)  # (B,)
        self.caches = model.init_cache(len(prompts), length + max_new_tokens, num_pad=num_pad)

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        if self.images is None:
            return self.model(self.tokens, cache=self.caches, last_only=True)[0][:, -1]
        return self.model(self.tokens, cache=self.caches, last_only=True, images=self.images,
                          image_mask=self.image_mask)[0][:, -1]

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids[:, None], cache=self.caches)[0][:, -1]

    def keep(self, rows: list[int], ids: torch.Tensor) -> torch.Tensor:
        """Drop every row but ``rows`` (batch indices, ascending) from the batch; returns their ``ids``."""
        if len(rows) == ids.shape[0]:
            return ids
        index = torch.tensor(rows, device=ids.device)
        for cache in self.caches:
            cache.keep(index)
        return ids[index]


@torch.no_grad()
def stream_ids(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, use_cache: bool = True, generator: torch.Generator | None = None,
               return_logits: bool = False, tool: Tool | None = None) -> Iterator:
    """Yield next ids (B,) one step at a time (with their logits (B, V) if ``return_logits``); with ``tool``, the
    ids it queues (from each row's ids so far) replace the sampled ones."""
    model.eval()
    if use_cache:
        decoder = PaddedDecoder(model, prompt.tolist(), max_new_tokens)
        step = decoder.step
        last = decoder.prefill()
    else:
        tokens = prompt

        def step(nxt):
            nonlocal tokens
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            return model(tokens)[0][:, -1]

        last = model(prompt)[0][:, -1]
    new: list[list[int]] = [[] for _ in range(prompt.shape[0])]
    queued: list[list[int]] = [[] for _ in new]
    for i in range(max_new_tokens):
        nxt = sample_next(last, temperature, top_k, top_p, generator)
        if tool is not None:
            nxt = force(nxt, queued)
            for row, token in zip(new, nxt.tolist()):
                row.append(token)
            queued = [q or tool(row) for q, row in zip(queued, new)]
        yield (nxt, last) if return_logits else nxt
        if i + 1 == max_new_tokens:
            break
        last = step(nxt)


def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None = None,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   generator: torch.Generator | None = None,
                   stop: Callable[[list[int]], bool] | None = None, tool: Tool | None = None,
                   images: torch.Tensor | None = None, image_slots: list[list[bool]] | None = None) -> list[list[int]]:
    """Continue prompts of any lengths in one left-padded batch; return each row's new ids.

    A row ends at ``eos_id`` (not included), once ``stop(new_ids)`` is true (checked after every token; the
    ids are kept), or after ``max_new_tokens``; finished rows leave the batch. ``tool(new_ids)`` (``tools.py``),
    called after each token, queues ids the row feeds next instead of sampled ones (each row on its own).
    ``images`` (N, P, F) and ``image_slots`` (a bool per prompt token): the vision encoder's features of the
    prompts' images, spliced in at their slots (``serve/vision.py``).
    """
    model.eval()
    decoder = PaddedDecoder(model, prompts, max_new_tokens, images=images, image_slots=image_slots)
    new: list[list[int]] = [[] for _ in prompts]
    queued: list[list[int]] = [[] for _ in prompts]  # forced ids still to feed, per prompt
    rows = list(range(len(prompts)))  # batch row -> prompt index
    logits = decoder.prefill()
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if tool is not None:
            nxt = force(nxt, [queued[p] for p in rows])
        alive = []
        for r, token in enumerate(nxt.tolist()):
            ended = token == eos_id
            if not ended:
                new[rows[r]].append(token)
                ended = stop is not None and stop(new[rows[r]])
                if tool is not None and not queued[rows[r]]:
                    queued[rows[r]] = tool(new[rows[r]])
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
                       stop: Callable[[list[int]], bool] | None = None, use_cache: bool = False,
                       tool: Tool | None = None) -> list[list[int]]:
    """``generate_batch`` one prompt at a time, no padding; with full recompute by default: the reference."""
    device = next(model.parameters()).device
    out = []
    for p in prompts:
        new: list[int] = []
        for nxt in stream_ids(model, torch.tensor([p], device=device), max_new_tokens, temperature, top_k, top_p,
                              use_cache=use_cache, generator=generator, tool=tool):
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
             new_document: bool = True, tools: str = "") -> str:
    """Text in, continuation out; stops at EOS, at any stop string (excluded), or after max_new_tokens."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, stop, seed,
                               new_document, tools=tools))


def stream_text(model, tokenizer, prompt: str | list[int], max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 50,
                top_p: float = 0.95, stop: list[str] | None = None, seed: int | None = None,
                new_document: bool = True, stop_ids: list[int] | None = None, tools: str = "") -> Iterator[str]:
    """Yield text pieces as they are decoded; stop strings and stop tokens are never emitted.

    Token shards separate documents with EOS, so ``new_document`` starts the prompt with EOS: the
    context in which the model saw every document begin (GPT-2's ``<|endoftext|>`` convention). ``prompt`` is
    text, or token ids already encoded (``Tokenizer.encode_chat``). A prompt longer than the context leaves
    room for ``max_new_tokens`` by keeping its last tokens; ``max_new_tokens`` must be below the context length.
    ``tools="calculator"`` turns on the calculator (``tools.py``).
    """
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len
    tool = make_tool(tools, tokenizer)
    if max_new_tokens >= max_len:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be below the model's context length {max_len}, "
                         f"to leave room for the prompt")
    ids = ([tokenizer.eos_id] if new_document else []) + (tokenizer.encode(prompt) if isinstance(prompt, str)
                                                          else list(prompt))
    ids = ids[-max(1, max_len - max_new_tokens):]
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    prompt_t = torch.tensor([ids], device=device)
    new: list[int] = []
    emitted = ""
    stop = [s for s in (stop or []) if s]
    hold = max((len(s) for s in stop), default=0)  # chars held back until we know they start no stop string
    for nxt in stream_ids(model, prompt_t, max_new_tokens, temperature, top_k, top_p, generator=gen, tool=tool):
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
