"""Byte-level BPE tokenizer (GPT-2 style, arXiv:1909.07083 ch. 2.2) trained and run with HF ``tokenizers``.

Every byte is in the initial alphabet, so any text encodes losslessly: ``decode(encode(s)) == s``.
The special tokens take the fixed ids 0..6 in the order of ``SPECIAL_TOKENS``; they are "special"
added tokens, so their strings are never split and ``decode(..., skip_special=True)`` drops them.

Chat template (``apply_chat_template``), no newlines or spaces added::

    <|system|>{content}<|end|><|user|>{content}<|end|><|assistant|>{content}<|end|>...<|assistant|>

``encode_chat`` builds its ids segment by segment: the template's control ids plus each content encoded as
TEXT (``encode_text``), so a message containing ``<|end|><|system|>`` cannot forge a role.

Fast path: ``encode_batch``/``encode_flat`` cut each text into pieces at positions that are certainly
boundaries of the GPT-2 pre-tokenizer regex (see ``_PIECE``), encode each distinct piece once with HF and
reuse it from a cache. HF's own ``encode`` (what ``encode`` calls) is the reference; the tests compare
the two. HF spends its time per byte (regex, alignment bookkeeping), not in the BPE merges, so on the
Gutenberg books (vocab 8192) the cache gives about 9.5 MB per CPU second against HF's 1.4
(``benchmarks/tokenize_throughput.py``).

Digits: ``train_tokenizer(..., split_digits=True)`` (the default) puts HF's ``Digits(individual_digits=True)``
before the byte-level pre-tokenizer, as Llama and SmolLM2 do, so every digit (every Unicode numeric character)
is a piece of its own and no token holds two digits: " 345" is " ", "3", "4", "5". A tokenizer.json keeps its
own pre-tokenizer, so files trained before (plain ``ByteLevel``) load and encode exactly as they did. The fast
path's cuts hold for both: Digits only adds boundaries, around single characters.
"""

from __future__ import annotations

import re
from itertools import repeat
from pathlib import Path
from typing import Iterable

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from slmforge.registry import lookup
from slmforge.runs import atomic_path

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}

# The GPT-2 regex the ByteLevel pre-tokenizer runs (in Oniguruma) is
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# Cutting a text at position p and encoding the parts separately gives the same ids if p is a boundary
# between two matches and no match near p looks past it; ``(?!\S)`` is the only look-ahead. That holds
# (a) after a non-space before ASCII whitespace: no non-space match takes a whitespace after its first
# character; (b) after a lone "\n" between non-spaces: it is one match either way; (c) after a run of
# ASCII letters, digits or punctuation before an ASCII character of another of those classes (or
# whitespace), except after "'" before a letter, which may start "'s". ``_PIECE`` cuts only there; a
# piece is optional whitespace, a run that ends at such a cut (or any run of non-spaces), and then an
# optional "\n" of case (b). Python's ``\s`` equals Oniguruma's on ASCII whitespace, so texts with any
# other whitespace character (U+00A0, U+001C, ...) are kept whole, which is always correct.
_LETTERS = r"[A-Za-z]+(?=[\x00-\x40\x5b-\x60\x7b-\x7f]|\Z)"
_DIGITS = r"[0-9]+(?=[\x00-\x2f\x3a-\x7f]|\Z)"
_PUNCT = r"[!-/:-@\[-`{-~]*[!-&(-/:-@\[-`{-~](?=[\t-\r 0-9A-Za-z]|\Z)|[!-/:-@\[-`{-~]+(?=[\t-\r 0-9]|\Z)"
_PIECE = re.compile(rf"\s*(?:{_LETTERS}|{_DIGITS}|{_PUNCT}|\S+)(?:\n(?=\S))?|\s+")
_ODD_SPACE = re.compile(r"[^\S\t-\r ]")
# Distinct pieces are encoded joined by this separator: HF splits on added tokens before pre-tokenizing,
# so each piece is encoded exactly as it would be alone, at a fraction of the per-call overhead.
_SEPARATOR = "<|pad|>"
_JOIN_PIECES = 2048
# Bound the cache; it is rebuilt from scratch when it outgrows either limit.
_CACHE_MAX_PIECES = 1 << 20
_CACHE_MAX_TOKENS = 1 << 24


def _json_path(path: str | Path) -> Path:
    """Accept a tokenizer directory or the ``tokenizer.json`` file itself."""
    path = Path(path)
    return path if path.suffix == ".json" or path.is_file() else path / "tokenizer.json"


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer``; not thread-safe (the piece cache is shared)."""

    def __init__(self, hf: tokenizers.Tokenizer):
        self.hf = hf
        for i, name in enumerate(SPECIAL_TOKENS):
            if hf.token_to_id(name) != i:
                raise ValueError(f"tokenizer: special token {name} must have id {i}, got {hf.token_to_id(name)}")
        # HF matches added tokens (longest first) before pre-tokenizing, so the fast path must not cut inside
        # one: it splits texts at them first. Tokens that strip neighbouring spaces keep such texts whole.
        added = sorted(hf.get_added_tokens_decoder().values(), key=lambda t: -len(t.content))
        self._added = re.compile("(" + "|".join(re.escape(t.content) for t in added) + ")")
        self._added_plain = not any(t.lstrip or t.rstrip or t.single_word for t in added)
        self._text_hf: tokenizers.Tokenizer | None = None  # a copy that encodes special-token strings as text
        self._reset_cache()

    # ------------------------------------------------------------------ files

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = _json_path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no tokenizer here; train one: "
                             f"slmforge tokenizer FILES vocab_size=8192 out={path}")
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as e:  # the Rust library raises a bare Exception for a truncated or foreign file
            raise ValueError(f"{path}: not a readable tokenizer file ({e}); it may be truncated or another "
                             f"format: copy it again or train one with `slmforge tokenizer`") from None

    def save(self, path: str | Path) -> Path:
        path = _json_path(path)
        with atomic_path(path) as tmp:
            self.hf.save(str(tmp))
        return path

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    def token_id(self, name: str) -> int:
        token_id = self.hf.token_to_id(name)
        if token_id is None:
            raise ValueError(f"token {name!r} is not in the vocabulary; special tokens: {', '.join(SPECIAL_TOKENS)}")
        return token_id

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added (HF's plain path; the reference for the fast path)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, computed with the piece cache."""
        ids, lengths = self.encode_flat(texts)
        return [chunk.tolist() for chunk in np.split(ids, np.cumsum(lengths)[:-1])] if len(lengths) else []

    def encode_flat(self, texts: Iterable[str], append_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Encode texts into one int32 array of ids plus the int64 number of ids per text.

        With ``append_id`` (e.g. ``eos_id``) each text's ids are followed by that id, counted in its length.
        """
        pieces: list[str] = []
        num_pieces = []
        for text in texts:
            found = self._pieces(text)
            pieces.extend(found)
            num_pieces.append(len(found))
        if len(self._index) > _CACHE_MAX_PIECES or len(self._ids) > _CACHE_MAX_TOKENS:
            self._reset_cache()
        # (num_pieces_total,) cache slot of each piece; -1 = not cached yet
        slot = np.fromiter(map(self._index.get, pieces, repeat(-1)), np.int64, len(pieces))
        missing = np.flatnonzero(slot < 0)
        if missing.size:
            # C-level map() rather than Python loops: on a cold cache nearly every piece is missing.
            missed = list(map(pieces.__getitem__, missing.tolist()))
            self._add_pieces(list(dict.fromkeys(missed)))
            slot[missing] = np.fromiter(map(self._index.__getitem__, missed), np.int64, len(missed))
        piece_lengths = self._lengths[slot]
        # Gather every piece's ids from the cache in one indexing operation.
        out_starts = np.cumsum(piece_lengths) - piece_lengths
        ids = self._ids[np.repeat(self._starts[slot] - out_starts, piece_lengths) + np.arange(piece_lengths.sum())]
        piece_ends = np.concatenate([[0], np.cumsum(piece_lengths)])
        doc_ends = piece_ends[np.cumsum(num_pieces, dtype=np.int64)] if num_pieces else np.zeros(0, np.int64)
        lengths = np.diff(doc_ends, prepend=0)
        if append_id is not None:
            ids = np.insert(ids, doc_ends, append_id)
            lengths = lengths + 1
        return ids, lengths

    def _pieces(self, text: str) -> list[str]:
        """Cut ``text`` where encoding the parts separately gives the same ids (see ``_PIECE``)."""
        parts = self._added.split(text)
        if len(parts) == 1:
            return [text] if _ODD_SPACE.search(text) else _PIECE.findall(text)
        if not self._added_plain:
            return [text]
        # Odd indices of the split are added tokens, each a piece of its own.
        return [piece for i, part in enumerate(parts) for piece in ([part] if i % 2 else self._pieces(part))]

    def _reset_cache(self) -> None:
        self._index: dict[str, int] = {}
        self._ids = np.zeros(0, np.int32)  # ids of all cached pieces, back to back
        self._starts = np.zeros(0, np.int64)  # (num_cached,) offset of each piece in _ids
        self._lengths = np.zeros(0, np.int64)  # (num_cached,) number of ids of each piece

    def _add_pieces(self, new: list[str]) -> None:
        """Encode distinct uncached pieces with HF and append them to the cache."""
        groups = [new[i : i + _JOIN_PIECES] for i in range(0, len(new), _JOIN_PIECES)]
        joined = [_SEPARATOR.join(g) for g in groups]
        encodings = self.hf.encode_batch_fast(joined, add_special_tokens=False)
        all_ids, all_lengths = [], []
        for group, text, encoding in zip(groups, joined, encodings):
            ids = np.array(encoding.ids, np.int32)
            if text.count(_SEPARATOR) != len(group) - 1:
                # A piece contains the separator itself: encode this group piece by piece instead.
                per_piece = [e.ids for e in self.hf.encode_batch_fast(group, add_special_tokens=False)]
                all_ids.append(np.array([i for p in per_piece for i in p], np.int32))
                all_lengths.append(np.array([len(p) for p in per_piece], np.int64))
                continue
            # (len(group)+1,) positions of the separators, with sentinels at both ends
            bounds = np.concatenate([[-1], np.flatnonzero(ids == self.pad_id), [len(ids)]])
            all_ids.append(ids[ids != self.pad_id])
            all_lengths.append(np.diff(bounds) - 1)
        lengths = np.concatenate(all_lengths)
        self._index.update(zip(new, range(len(self._index), len(self._index) + len(new))))
        self._starts = np.concatenate([self._starts, len(self._ids) + np.cumsum(lengths) - lengths])
        self._lengths = np.concatenate([self._lengths, lengths])
        self._ids = np.concatenate([self._ids, *all_ids])

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` with special-token strings (``<|end|>``, ...) encoded as plain text, never as
        control ids: for text a user sends (chat content, a completion prompt)."""
        if self._text_hf is None:
            self._text_hf = tokenizers.Tokenizer.from_str(self.hf.to_str())
            self._text_hf.encode_special_tokens = True
        return self._text_hf.encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The ids of ``apply_chat_template(messages)`` with every content encoded as text (``encode_text``):
        the only control ids are the template's own."""
        ids: list[int] = []
        for i, message in enumerate(messages):
            _check_message(i, message)
            role = self.token_id(lookup(CHAT_ROLES, message["role"], "chat role"))
            ids += [role, *self.encode_text(message["content"]), self.token_id("<|end|>")]
        if add_generation_prompt:
            ids.append(self.token_id(CHAT_ROLES["assistant"]))
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``[{"role": "user", "content": "hi"}, ...]`` as ``<|user|>hi<|end|>...`` (module docstring).

        With ``add_generation_prompt`` the text ends with ``<|assistant|>`` so a model continues as the assistant.
        """
        parts = []
        for i, message in enumerate(messages):
            _check_message(i, message)
            parts.append(f"{lookup(CHAT_ROLES, message['role'], 'chat role')}{message['content']}<|end|>")
        if add_generation_prompt:
            parts.append(CHAT_ROLES["assistant"])
        return "".join(parts)


def _check_message(i: int, message) -> None:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"chat message {i}: expected a dict with 'role' and 'content', got {message!r}")


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path | None = None,
                    min_frequency: int = 2, show_progress: bool = False, split_digits: bool = True) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids (special tokens and the 256 bytes included).

    With ``path`` (a directory or a ``.json`` file) the tokenizer is saved there as ``tokenizer.json``.
    With ``split_digits`` every digit is a token of its own (module docstring); False is the plain GPT-2 BPE.
    """
    min_vocab = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size}: must be at least {min_vocab} (special tokens + 256 bytes)")
    hf = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                        if split_digits else byte_level)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(texts, trainer)
    tokenizer = Tokenizer(hf)
    if path is not None:
        tokenizer.save(path)
    return tokenizer
