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
from slmforge.model.layers import RMSNorm, cross_entropy, linear


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
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
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
        for block in self.blocks:
            block.reset_parameters(self.cfg)
        if self.ffn is not None:
            self.ffn.reset_parameters(self.cfg.init_std, residual_out_std(self.cfg))

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
        if num_pad is not None:
            num_pad = torch.as_tensor(num_pad, device=device)
            for cache in caches:
                cache.left_pad(num_pad)
        return caches

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None, cache: list | None = None,
        last_only: bool = False, doc: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens: (B, T) -> logits (B, T, V) and, given targets (B, T), the mean next-token loss.

        With ``cache`` (from ``init_cache``) the tokens continue the cached sequence, which may be left-padded.
        ``last_only`` computes the logits of the last position only, (B, 1, V): a prefill needs no more, and the
        (B, T, V) head matmul is its largest. Targets equal to -100 are ignored. The loss includes the FFNs'
        auxiliary losses. ``doc`` (B, T) ints marks packed documents (equal ids in a run; training only, no
        cache): each attends only to itself with positions from its own start, as if run alone.
        """
        if doc is not None:
            self._check_doc(doc, tokens, cache)
        x = self.tok_emb(tokens)
        aux_total = 0.0
        for i, block in enumerate(self.layers()):
            x, aux = block(x, cache=None if cache is None else cache[i], ffn=self.ffn, doc=doc)
            aux_total = aux_total + aux
        if last_only:
            x = x[:, -1:]
        logits = linear(self.norm(x), self.head.weight)
        if targets is None:
            return logits, None
        # Log-softmax in float32 (bf16 over a large vocabulary loses precision), a block of rows at a time.
        loss = cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss + aux_total

    def _check_doc(self, doc: torch.Tensor, tokens: torch.Tensor, cache) -> None:
        if cache is not None or doc.shape != tokens.shape:
            raise ValueError(f"doc must be (B, T) like the tokens {tuple(tokens.shape)}, without a cache")
        others = sorted({b.kind for b in self.blocks if not isinstance(b.mixer, Attention)})
        if others:
            raise ValueError(f"packed documents (document masking) need attention in every layer; model.layers has "
                             f"{', '.join(others)}: train without packing (packing=false)")
