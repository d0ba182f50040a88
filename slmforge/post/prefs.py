"""Preference pairs: reading (TRL's formats, Anthropic HH-RLHF), splitting, writing, encoding and batching.

A ``Pair`` is a chat prompt (messages, the last a user turn) with a preferred and a rejected assistant reply.
``read_pairs`` takes JSON Lines (``.jsonl`` or ``.jsonl.gz``) in TRL's preference formats::

    {"prompt": "text" | [messages], "chosen": "reply" | [messages], "rejected": ...}   explicit prompt
    {"messages": [messages], "chosen": ..., "rejected": ...}                         prompt as "messages"
    {"chosen": [messages], "rejected": [messages]}                                     implicit prompt

A text prompt is one user message. A side given as messages ends with the assistant reply; the messages before
it join the prompt and must be the same on both sides (the implicit prompt is exactly that shared prefix). Every
bad record is a ValueError ``path:line: what (fix)``; a file with no pair in it is an error too. ``write_pairs``
writes the conversational form (with each pair's "source"), which ``read_pairs`` reads back equal.

``encode_pairs`` turns pairs into token ids with the tokenizer's chat template (prompt ids end with
``<|assistant|>``, each reply ends with ``<|end|>``), truncating or skipping pairs longer than ``max_len``, and
``PairLoader`` batches them: rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected, targets only on the replies,
with the pair indices (for cached reference log-probs) and an exactly resumable position.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import msgspec
import numpy as np
import torch

from slmforge.runs import atomic_path
from slmforge.tokens.tokenizer import CHAT_ROLES

IGNORE = -100  # the target of a position whose next token is not a reply token (cross_entropy's ignore_index)
OVERLONG = ("truncate", "skip")
FORMATS = ('TRL\'s preference format: {"prompt": str or messages, "chosen": ..., "rejected": ...}, '
           '{"messages": [...], "chosen", "rejected"} or {"chosen": [messages], "rejected": [messages]}')
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class Pair:
    prompt: list[dict]  # chat messages {"role", "content"}, the last a user turn
    chosen: str  # the preferred assistant reply
    rejected: str
    source: str = ""  # where it came from ("file.jsonl:12", "hh-rlhf/helpful-base-test:7", ...)


@dataclass
class EncodedPair:
    prompt: list[int]  # encode_chat(prompt, add_generation_prompt=True): ends with <|assistant|>
    chosen: list[int]  # encode_text(reply) + [<|end|>] (a truncated reply loses its end)
    rejected: list[int]


# ---------------------------------------------------------------- reading


def read_pairs(path) -> list[Pair]:
    """Every pair of a JSON Lines file (gzip when the name ends in .gz) in one of TRL's formats (module docstring)."""
    path = Path(path)
    pairs = [_pair_of(record, f"{path}:{line_no}", f"{path.name}:{line_no}") for line_no, record in _records(path)]
    if not pairs:
        raise ValueError(f"{path}: no preference pairs in this file (expected one JSON object per line in {FORMATS})")
    return pairs


def _records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, decoded JSON) of each non-blank line; a line that is not JSON is a ValueError naming it."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file (give a JSON Lines file of preference pairs)")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                raw = raw.removeprefix(b"\xef\xbb\xbf") if line_no == 1 else raw
                if not raw.strip():
                    continue
                try:
                    yield line_no, msgspec.json.decode(raw)
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                    raise _bad(f"{path}:{line_no}", f"not JSON ({exc})", "each line must be one JSON object") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"{path}: not a readable gzip file after line {line_no} ({exc or 'truncated'}); "
                         f"copy it again or give it uncompressed") from None


def _bad(where: str, what: str, fix: str) -> ValueError:
    return ValueError(f"{where}: {what} ({fix})")


def _pair_of(record, where: str, source: str) -> Pair:
    """One record in any of the formats as a Pair; ``where`` (path:line) names it in errors."""
    if not isinstance(record, dict):
        raise _bad(where, f"a JSON {type(record).__name__}, not an object", f"expected {FORMATS}")
    for side in ("chosen", "rejected"):
        if side not in record:
            keys = ", ".join(map(str, record)) or "none"
            raise _bad(where, f"no {side!r} side (keys: {keys})", f"expected {FORMATS}")
    if "prompt" in record:
        prompt = _prompt(record["prompt"], where)
    elif "messages" in record:
        prompt = _messages(record["messages"], where, "messages")
    elif not (isinstance(record["chosen"], list) and isinstance(record["rejected"], list)):
        raise _bad(where, "no prompt", 'add a "prompt" key, or give chosen and rejected as message lists that share '
                   "the prompt; for HH-RLHF transcripts use the hh-rlhf reader")
    else:
        prompt = []
    chosen_before, chosen = _side(record["chosen"], where, "chosen")
    rejected_before, rejected = _side(record["rejected"], where, "rejected")
    if chosen_before != rejected_before:
        raise _bad(where, "chosen and rejected differ before their last assistant turn",
                   "the turns before the replies are the prompt and must be equal on both sides")
    prompt = prompt + chosen_before
    if not prompt or prompt[-1]["role"] != "user":
        last = f"is {prompt[-1]['role']!r}" if prompt else "is missing: the prompt is empty"
        raise _bad(where, f"the prompt's last turn {last}", "a prompt must end with the user's turn")
    if chosen.strip() == rejected.strip():
        raise _bad(where, "chosen and rejected are the same reply", "drop the pair: it prefers nothing")
    src = record.get("source")
    return Pair(prompt, chosen, rejected, src if isinstance(src, str) and src else source)


def _prompt(value, where: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise _bad(where, "empty prompt", "give the user's question as the prompt")
        return [{"role": "user", "content": value}]
    return _messages(value, where, "prompt")


def _side(value, where: str, name: str) -> tuple[list[dict], str]:
    """(the messages before the reply, the reply) of a chosen or rejected value: a string or messages."""
    before: list[dict] = []
    if isinstance(value, str):
        reply = value
    else:
        messages = _messages(value, where, name)
        if not messages or messages[-1]["role"] != "assistant":
            raise _bad(where, f"{name} does not end with an assistant turn", f"the last message of {name} is the reply")
        before, reply = messages[:-1], messages[-1]["content"]
    if not reply.strip():
        raise _bad(where, f"empty {name} reply", "every pair needs two non-empty replies; drop this one")
    return before, reply


def _messages(value, where: str, name: str) -> list[dict]:
    """Chat messages checked and reduced to {"role", "content"}."""
    if not isinstance(value, list):
        raise _bad(where, f"{name} is a JSON {type(value).__name__}", f"{name} must be a string or a list of messages")
    out = []
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise _bad(where, f"{name}[{i}] is not a message", 'a message is {"role": ..., "content": "text"}')
        if message["role"] not in CHAT_ROLES:
            raise _bad(where, f"{name}[{i}] has the unknown role {message['role']!r}",
                       f"roles are {', '.join(CHAT_ROLES)}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def hh_rlhf_pairs(path, limit: int = 0) -> tuple[list[Pair], dict]:
    """Pairs from an Anthropic HH-RLHF file ({"chosen": transcript, "rejected": transcript}, gzip JSON Lines).

    A transcript is "\\n\\nHuman: ...\\n\\nAssistant: ..." turns; the reply is what follows the last
    "\\n\\nAssistant:" and the prompt the turns before it (contents stripped). Pairs whose prompts differ, whose
    replies are equal or one empty are dropped and counted: {"read", "kept", "prefix_mismatch", "identical",
    "empty"}. ``limit`` > 0 stops after that many kept pairs.
    """
    path = Path(path)
    name = path.name.split(".")[0]
    counts = {"read": 0, "kept": 0, "prefix_mismatch": 0, "identical": 0, "empty": 0}
    pairs: list[Pair] = []
    for line_no, record in _records(path):
        if limit and len(pairs) >= limit:
            break
        counts["read"] += 1
        where = f"{path}:{line_no}"
        (chosen_prefix, chosen), (rejected_prefix, rejected) = (_hh_split(record, side, where)
                                                                 for side in ("chosen", "rejected"))
        if chosen_prefix != rejected_prefix:
            counts["prefix_mismatch"] += 1
        elif chosen == rejected:
            counts["identical"] += 1
        elif not chosen or not rejected:
            counts["empty"] += 1
        else:
            pairs.append(Pair(_hh_turns(chosen_prefix, where), chosen, rejected, f"hh-rlhf/{name}:{line_no}"))
    if not pairs:
        raise ValueError(f"{path}: no HH-RLHF pairs kept of {counts['read']} read ({counts}); expected gzip JSON Lines "
                         f'{{"chosen": transcript, "rejected": transcript}}')
    counts["kept"] = len(pairs)
    return pairs, counts


def _hh_split(record, side: str, where: str) -> tuple[str, str]:
    """(transcript before the last "\\n\\nAssistant:", the stripped reply after it) of one side."""
    text = record.get(side) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise _bad(where, f"no {side} transcript", 'an HH-RLHF line is {"chosen": str, "rejected": str}')
    cut = text.rfind("\n\nAssistant:")
    if cut < 0 or not text.startswith("\n\nHuman:"):
        raise _bad(where, f"{side} is not an HH-RLHF transcript", 'it must be "\\n\\nHuman: ...\\n\\nAssistant: ..."')
    return text[:cut], text[cut + len("\n\nAssistant:"):].strip()


def _hh_turns(prefix: str, where: str) -> list[dict]:
    parts = _HH_TURN.split(prefix)  # ["", role, text, role, text, ...]
    turns = [{"role": _HH_ROLES[role], "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2])]
    if turns[-1]["role"] != "user":
        raise _bad(where, "the turn before the last Assistant: is not a Human turn", "the prompt must end with Human:")
    return turns


# ---------------------------------------------------------------- splitting and writing


def split_pairs(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, val): round(val_fraction x distinct prompts) prompts, chosen by a seeded hash of the prompt, go to
    val with all their pairs, so no prompt is in both; each split keeps the input order."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: must be in [0, 1)")
    keys = [_prompt_key(pair.prompt) for pair in pairs]
    distinct = sorted(set(keys), key=lambda key: hashlib.blake2b(key, digest_size=8, key=str(seed).encode()).digest())
    num_val = round(val_fraction * len(distinct))
    if val_fraction > 0:
        if len(distinct) < 2:
            raise ValueError(f"val_fraction={val_fraction}: {len(distinct)} distinct prompt(s) cannot be split; "
                             f"give more pairs or val_fraction=0")
        num_val = min(max(num_val, 1), len(distinct) - 1)
    val_keys = set(distinct[:num_val])
    train = [pair for pair, key in zip(pairs, keys) if key not in val_keys]
    val = [pair for pair, key in zip(pairs, keys) if key in val_keys]
    return train, val


def _prompt_key(prompt: list[dict]) -> bytes:
    return msgspec.json.encode([[m["role"], m["content"]] for m in prompt])


def write_pairs(path, pairs: list[Pair]) -> None:
    """TRL's conversational format, one pair a line, with its "source" (gzip when the name ends in .gz); atomic."""
    path = Path(path)
    lines = b"".join(msgspec.json.encode({
        "prompt": pair.prompt, "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected}], "source": pair.source}) + b"\n"
        for pair in pairs)
    with atomic_path(path) as tmp:
        if path.name.lower().endswith(".gz"):
            with gzip.open(tmp, "wb", compresslevel=6) as f:
                f.write(lines)
        else:
            tmp.write_bytes(lines)


# ---------------------------------------------------------------- encoding and batching


def encode_pairs(tokenizer, pairs: list[Pair], max_len: int,
                 overlong: str = "truncate") -> tuple[list[EncodedPair], dict]:
    """Token ids of each pair; counts {"pairs" (encoded), "truncated", "skipped"}.

    A pair whose prompt + longer reply is over ``max_len`` tokens is skipped (``overlong="skip"``) or truncated: the
    replies keep their first ``reply`` tokens and the prompt its last ``max_len - reply``, where ``reply`` is the
    longer reply's length, but at most the room the prompt leaves or ``max_len // 2`` if that is more.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r}: must be one of {', '.join(OVERLONG)}")
    if max_len < 2:
        raise ValueError(f"max_len={max_len}: must be at least 2 tokens")
    if not pairs:
        raise ValueError("no preference pairs to encode")
    end = tokenizer.token_id("<|end|>")
    encoded, counts = [], {"pairs": 0, "truncated": 0, "skipped": 0}
    for pair in pairs:
        # EOS first, as pre-training's documents and every chat prompt at inference start (serve/chat.py).
        prompt = [tokenizer.eos_id, *tokenizer.encode_chat(pair.prompt, add_generation_prompt=True)]
        chosen, rejected = (tokenizer.encode_text(reply) + [end] for reply in (pair.chosen, pair.rejected))
        longest = max(len(chosen), len(rejected))
        if len(prompt) + longest > max_len:
            if overlong == "skip":
                counts["skipped"] += 1
                continue
            reply = min(longest, max(max_len - len(prompt), max_len // 2))
            prompt, chosen, rejected = prompt[len(prompt) - (max_len - reply):], chosen[:reply], rejected[:reply]
            counts["truncated"] += 1
        encoded.append(EncodedPair(prompt, chosen, rejected))
    if not encoded:
        raise ValueError(f"all {len(pairs)} preference pairs are longer than finetune.max_len={max_len} tokens: "
                         f"raise it or truncate them (finetune.overlong=truncate)")
    counts["pairs"] = len(encoded)
    return encoded, counts


class PairLoader:
    """Batches of encoded pairs: (tokens (2B, T), targets (2B, T), index (B,)), all int64 (module docstring).

    With ``shuffle`` the stream is endless: epoch e is a permutation of the pairs drawn with seed + e, of which rank r
    takes every ``world_size``-th from r (trimmed to the same count on every rank), in batches of ``batch_size`` (the
    last one may be smaller). ``state_dict`` is the position of the next batch, so a loader restored from it gives the
    batches the uninterrupted one would have (at another world size it goes on from the same epoch and batch
    number). Without ``shuffle`` every iteration is one pass over the rank's pairs in
    order (for evaluation), from the start.
    """

    def __init__(self, pairs: list[EncodedPair], batch_size: int, seed: int, pad_id: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        if not 0 <= rank < world_size or len(pairs) < world_size:
            raise ValueError(f"{len(pairs)} pairs cannot be shared by rank {rank} of {world_size} processes")
        self.pairs, self.batch_size, self.seed, self.pad_id = pairs, batch_size, seed, pad_id
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size
        self.epoch = self.batch = 0  # the position of the next batch (shuffle only)

    def _order(self, epoch: int) -> np.ndarray:
        """(pairs on this rank,) pair indices of ``epoch`` in the order this rank takes them."""
        if not self.shuffle:
            return np.arange(self.rank, len(self.pairs), self.world_size)
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.pairs))
        return order[self.rank::self.world_size][: len(self.pairs) // self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if not self.shuffle:
            order = self._order(0)
            for start in range(0, len(order), self.batch_size):
                yield self.collate(order[start : start + self.batch_size])
            return
        while True:
            order = self._order(self.epoch)
            start = self.batch * self.batch_size
            if start >= len(order):  # resumed at another world size past this rank's epoch
                self.epoch, self.batch = self.epoch + 1, 0
                continue
            batch = order[start : start + self.batch_size]
            self.batch += 1
            if self.batch * self.batch_size >= len(order):
                self.epoch, self.batch = self.epoch + 1, 0
            yield self.collate(batch)

    def collate(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch of these pair indices: right-padded rows, targets on the reply positions only."""
        chosen = [(self.pairs[i].prompt, self.pairs[i].chosen) for i in index]
        rejected = [(self.pairs[i].prompt, self.pairs[i].rejected) for i in index]
        rows = chosen + rejected
        width = max(len(prompt) + len(reply) for prompt, reply in rows)
        tokens = np.full((len(rows), width), self.pad_id, np.int64)
        targets = np.full((len(rows), width), IGNORE, np.int64)
        for row, (prompt, reply) in enumerate(rows):
            tokens[row, : len(prompt) + len(reply)] = prompt + reply
            targets[row, len(prompt) - 1 : len(prompt) + len(reply) - 1] = reply
        return torch.from_numpy(tokens), torch.from_numpy(targets), torch.as_tensor(np.asarray(index), dtype=torch.long)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "num_pairs": len(self.pairs), "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = [f"{k} {state.get(k)} -> {mine[k]}" for k in ("num_pairs", "seed", "batch_size")
                   if state.get(k) != mine[k]]
        if changed:
            raise ValueError(f"cannot resume the preference loader: {', '.join(changed)} since the checkpoint; "
                             f"resume with the same pairs and settings or start a new run")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
