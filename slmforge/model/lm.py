"""The language model: token embedding, a stack of residual blocks, final norm, output head.

A Llama-style decoder (Touvron et al. 2023, arXiv 2302.13971) whose per-layer token mixer and FFN
come from ``block.MIXERS`` / ``block.FFNS``. Shapes: B batch, T time, C d_model, V vocabulary.

Parameter sharing keeps the parameters in ``blocks``, a ModuleList of unique blocks, and ``block_index``
says which block each of the ``num_layers`` layers runs: MobileLLM's immediate block-wise repeat (arXiv
2402.14905) runs each block ``block_repeat`` times in a row, MobiLlama (arXiv 2402.16840) shares one FFN,
``ffn``, across all layers. Without sharing ``blocks[i]`` is layer i, so state-dict names are unchanged.
OpenELM's layer-wise scaling (arXiv 2404.14619) only changes each unique block's config.
Every layer application gets its own cache, even when it shares weights with another.
"""

from __future__ import annotations

import torch
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.attention import Attention
from slmforge.model.block import Block, build_ffn, residual_out_std
from slmforge.model.engram import Engram, EngramCache, compression_map, context_ids
from slmforge.model.layers import RMSNorm, cross_entropy, linear
from slmforge.model.vision import Projector, splice


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.block_config(j), kind, own_ffn=not cfg.share_ffn, ffn=ffn)
                                    for j, (kind, ffn) in enumerate(zip(cfg.block_kinds(), cfg.block_ffns())))
        self.ffn = build_ffn(cfg) if cfg.share_ffn else None
        self.block_index = cfg.block_index()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.projector = Projector(cfg.vision, cfg.d_model) if cfg.vision.feature_dim else None
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.engram.layers:  # Engram memories (model/engram.py) by layer, and the token compression they share
            self.engrams = nn.ModuleDict({str(i): Engram(cfg, i) for i in cfg.engram.layer_ids()})
            self.register_buffer("token_map", torch.arange(cfg.vocab_size))
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        if self.tok_emb.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.cfg.init_std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, mean=0.0, std=self.cfg.init_std)
        self.norm.weight.fill_(1.0)
        if self.projector is not None:
            self.projector.reset_parameters(self.cfg.init_std)
        for block in self.blocks:
            block.reset_parameters(self.cfg)
        if self.ffn is not None:
            self.ffn.reset_parameters(self.cfg.init_std, residual_out_std(self.cfg))
        for engram in getattr(self, "engrams", {}).values():
            engram.reset_parameters(self.cfg.init_std, residual_out_std(self.cfg))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def layers(self) -> list[Block]:
        """The block each layer runs, num_layers long (a shared block appears several times)."""
        return [self.blocks[j] for j in self.block_index]

    def init_cache(self, batch_size: int, max_len: int, device=None, dtype=None,
                   num_pad: torch.Tensor | None = None) -> list:
        """One cache per layer application: a repeated block sees different inputs each time.

        ``num_pad`` (B,) ints: the left padding of each row of a batch of prompts of different lengths (None = no
        padding). Every mixer keeps padded slots out of the real tokens' results, so each row's logits are those
        it would get alone, and each row's RoPE positions start at its first real token.
        """
        device = device or self.tok_emb.weight.device
        dtype = dtype or self.tok_emb.weight.dtype
        caches = [b.mixer.init_cache(batch_size, max_len, device, dtype) for b in self.layers()]
        for key in getattr(self, "engrams", {}):
            caches[int(key)] = EngramCache(caches[int(key)], self.engrams[key], batch_size, self.cfg.vocab_size,
                                           device, dtype)
        if num_pad is not None:
            num_pad = torch.as_tensor(num_pad, device=device)
            for cache in caches:
                cache.left_pad(num_pad)
        return caches

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None, cache: list | None = None,
        last_only: bool = False, doc: torch.Tensor | None = None, images: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None, memory: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens: (B, T) -> logits (B, T, V) and, given targets (B, T), the mean next-token loss.

        With ``cache`` (from ``init_cache``) the tokens continue the cached sequence, which may be left-padded.
        ``last_only`` computes the logits of the last position only, (B, 1, V): a prefill needs no more, and the
        (B, T, V) head matmul is its largest. Targets equal to -100 are ignored. The loss includes the FFNs'
        auxiliary losses. ``doc`` (B, T) ints marks packed documents (equal ids in a run; training only, no
        cache): each attends only to itself with positions from its own start, as if run alone. ``images`` (N, P, F):
        N images' encoder features, projected and spliced in place of the token embeddings where ``image_mask``
        (B, T) is True (N * P slots, row-major; ``model.vision``, ``model/vision.py``). ``memory``: the Engram lookups
        of these tokens (``engram_memory``), made ahead (prefetched); computed here when None.
        """
        if doc is not None:
            self._check_doc(doc, tokens, cache)
        x = self.tok_emb(tokens)
        if images is not None:
            if self.projector is None:
                raise ValueError("this model has no vision projector (model.vision.feature_dim=0): it reads no images")
            x = splice(x, image_mask, self.projector(images))
        aux_total = 0.0
        engrams = getattr(self, "engrams", {})
        if engrams and memory is None:
            memory = self.engram_memory(tokens, cache, doc)
        for i, block in enumerate(self.layers()):
            layer_cache = None if cache is None else cache[i]
            if str(i) in engrams:
                x = x + engrams[str(i)](x, memory[str(i)], layer_cache, doc)
                layer_cache = None if cache is None else layer_cache.inner
            x, aux = block(x, cache=layer_cache, ffn=self.ffn, doc=doc)
            aux_total = aux_total + aux
        if last_only:
            x = x[:, -1:]
        logits = linear(self.norm(x), self.head.weight)
        if targets is None:
            return logits, None
        # Log-softmax in float32 (bf16 over a large vocabulary loses precision), a block of rows at a time.
        loss = cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss + aux_total

    def set_token_compression(self, tokens: list[str]) -> None:
        """Engram's token compression from the tokenizer's token strings, by id (``engram.compression_map``); ids past
        the tokenizer's vocabulary keep ids of their own."""
        ids = compression_map(tokens[: self.cfg.vocab_size])
        ids += range(len(set(ids)), len(set(ids)) + self.cfg.vocab_size - len(ids))
        self.token_map.copy_(torch.tensor(ids))

    def engram_memory(self, tokens: torch.Tensor, cache: list | None = None, doc: torch.Tensor | None = None) -> dict:
        """{layer: (B, T, H * D) Engram lookups} of ``tokens`` (B, T), on the model's device. They depend on the
        tokens only: without a cache, run this ahead of the forward (prefetch from offloaded tables) and pass it in as
        ``memory``. With a cache it reads and advances the caches' last ids (and treats left padding as a start)."""
        c = self.token_map[tokens.to(self.token_map.device)]  # (B, T) compressed ids
        device, out = self.head.weight.device, {}
        for key, engram in self.engrams.items():
            state = None if cache is None else cache[int(key)]
            if state is not None:
                pad = state.pad_mask(tokens.shape[1])
                c_layer = c if pad is None else c.masked_fill(pad.to(c.device), self.cfg.vocab_size)
                ctx = context_ids(c_layer, engram.order, self.cfg.vocab_size, history=state.history)
                state.history = torch.cat([state.history, c_layer], dim=1)[:, -(engram.order - 1):]
            else:
                ctx = context_ids(c, engram.order, self.cfg.vocab_size, doc=doc)
            out[key] = engram.lookup(engram.rows(ctx), device)
        return out

    def _check_doc(self, doc: torch.Tensor, tokens: torch.Tensor, cache) -> None:
        if cache is not None or doc.shape != tokens.shape:
            raise ValueError(f"doc must be (B, T) like the tokens {tuple(tokens.shape)}, without a cache")
        others = sorted({b.kind for b in self.blocks if not isinstance(b.mixer, Attention)})
        if others:
            raise ValueError(f"packed documents (document masking) need attention in every layer; model.layers has "
                             f"{', '.join(others)}: train without packing (packing=false)")
