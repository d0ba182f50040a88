"""Chat data for supervised fine-tuning: conversations read, rendered, masked and packed into batches.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant", "content": str}``. Sources:
  read_conversations       JSON Lines (or .jsonl.gz) of ``{"messages": [...]}``; a bad record is a one-line
                           ValueError naming ``file:line`` and the fix
  procedural_conversations the procedural families with questions (arithmetic with its worked solution ending
                           ``#### N``, sorting, facts as several turns), each problem in the split ``build_corpus``
                           gives it for the same seed and base corpus: held-out problems stay held out
  synth_conversations      the synthesizer's question/answer records (math, exercises, grounded_qa)

``encode_conversations`` renders each (EOS first) with the chat template (``Tokenizer.encode_chat``) and marks the
tokens to train on: every assistant content token and the ``<|end|>`` closing an assistant turn, never a role id or a
system or user token (the loss on completions only, as in InstructGPT, arXiv:2203.02155).

``SFTLoader`` lays examples into rows of ``seq_len`` (packed, or one per row) and yields ``(x, y, doc)``, each
(B, T) int64: x the tokens (``pad_id`` after a row's last example); y[t] = x[t+1] when that token is in the same
example and trained, else -100 (cross-entropy's ignore index); doc[t] the index of t's example in its row (0, 1,
...), -1 on padding. The model attends only within equal doc values (a block-diagonal causal mask), positions
restarting at each example (``model.attention.document_positions``), so packed conversations never see each
other; padding is a block of its own that nothing reads and nothing is trained on.
"""

from __future__ import annotations

import gzip
import math
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import msgspec
import numpy as np
import torch

from slmforge.config import DataConfig
from slmforge.registry import lookup
from slmforge.synth.procedural import FAMILIES, SPLITS, _key, _split_of
from slmforge.tokens.tokenizer import CHAT_ROLES

IGNORE = -100  # the target of a position that is not trained (torch's cross_entropy ignore_index)
OVERLONG = ("truncate", "skip")
MESSAGES_FORMAT = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


# ---------------------------------------------------------------- conversations from files


def read_conversations(path: str | Path) -> list[list[dict]]:
    """The conversations of a JSON Lines file (``.jsonl`` or ``.jsonl.gz``), one ``{"messages": [...]}`` per line
    (other keys ignored; blank lines skipped). Each message keeps only its role and content."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; give a JSON Lines file with one {MESSAGES_FORMAT} per line")
    out = [_conversation(record, f"{path}:{line_no}") for line_no, record in _json_lines(path)]
    if not out:
        raise ValueError(f"{path}: no conversations in it (empty file); expected one {MESSAGES_FORMAT} per line")
    return out


def _json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(1-based line number, decoded JSON) of each non-blank line; a line that is not JSON is a ValueError."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield line_no, msgspec.json.decode(line)
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                    raise ValueError(f"{path}:{line_no}: not JSON ({exc}) (write one JSON object per line)") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"{path}: not a readable gzip file after line {line_no} ({exc or 'truncated'}) "
                         f"(compress it again, or name it .jsonl)") from None


def _conversation(record, where: str) -> list[dict]:
    """The checked messages of one record: known roles, string contents, a non-empty assistant turn."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: no \"messages\" list (each line needs {MESSAGES_FORMAT})")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: message {i} is not an object (write {{role, content}})")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"{where}: message {i} has role {role!r} (use one of {', '.join(CHAT_ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {i} content is {type(content).__name__}, not a string (give the text)")
        if role == "assistant" and not content.strip():
            raise ValueError(f"{where}: message {i} is an empty assistant turn (write the reply or drop the turn)")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: no assistant turn, nothing to train on (add the reply or drop the line)")
    return out


# ---------------------------------------------------------------- procedural problems as conversations


def _qa(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _facts_turns(doc) -> list[dict]:
    """The paragraph and its first question, then one turn per further question; answers as in the text."""
    paragraph = doc.text.split("\n\n", 1)[0]
    turns = []
    for k, (question, answer) in enumerate(doc.meta["qa"]):
        turns += _qa(f"{paragraph}\n\n{question}" if k == 0 else question, f"{answer[0].upper()}{answer[1:]}.")
    return turns


# family -> the conversation of one of its documents; families without questions (narrative) are not here
TURNS = {
    "arithmetic": lambda doc: _qa(doc.meta["question"], doc.meta["solution"]),
    "sorting": lambda doc: _qa(doc.meta["question"], doc.meta["answer"]),
    "facts": _facts_turns,
}


def procedural_conversations(families: list[str], num: int, seed: int, split: str = "train",
                             corpus: DataConfig | None = None) -> list[list[dict]]:
    """``num`` conversations of ``split``, the families mixed evenly, in a seeded order.

    ``corpus``: the pre-training corpus whose splits to keep (its families and num_*_docs; default DataConfig()),
    ``seed`` its data.seed. build_corpus puts a problem in the split a hash of its key picks (cut in proportion to
    the family's split sizes) or drops it; here each family's stream is drawn again and a problem kept when that
    hash picks ``split``: first the corpus's own problems of ``split``, then new ones, and never one of another
    split of the corpus (or of another call's ``split``), whatever ``num``.
    """
    lookup(dict.fromkeys(SPLITS), split, "split")
    families = list(dict.fromkeys(families))
    if not families:
        raise ValueError("procedural conversations need at least one family; choose from " + ", ".join(TURNS))
    for name in families:
        lookup(FAMILIES, name, "procedural family")
        if name not in TURNS:
            raise ValueError(f"procedural family {name!r} has no questions to answer, so it makes no "
                             f"conversations; choose from {', '.join(TURNS)}")
    corpus = corpus or DataConfig()
    base = list(dict.fromkeys(corpus.families))
    sizes = (corpus.num_train_docs, corpus.num_val_docs, corpus.num_test_docs)
    out = []
    for i, name in enumerate(families):
        need = num // len(families) + (i < num % len(families))
        # The family's quota in the base corpus (build_corpus's even mix); a family it lacks keeps the ratios.
        j, k = (base.index(name), len(base)) if name in base else (0, 1)
        quota = {s: n // k + (j < n % k) for s, n in zip(SPLITS, sizes)}
        out += [TURNS[name](doc) for doc in _problems(name, seed, split, quota, need)]
    random.Random(f"slmforge.post.chat:{seed}:{split}").shuffle(out)
    return out


def _problems(name: str, seed: int, split: str, quota: dict[str, int], need: int) -> list:
    """The first ``need`` unique problems of build_corpus's stream of ``name`` that ``quota`` puts in ``split``."""
    if need and not quota[split]:
        raise ValueError(f"procedural family {name!r}: the base corpus has no {split} problems (its data.num_*_docs "
                         f"give this family {quota}), so its {split} split is undefined; give it some")
    rng, make = random.Random(f"slmforge.procedural:{seed}:{name}"), FAMILIES[name]
    limit = (20 * need + 1000) * sum(quota.values()) / max(quota[split], 1)
    seen, out, tries = set(), [], 0
    while len(out) < need:
        tries += 1
        if tries > limit:
            raise ValueError(f"procedural family {name!r} produced only {len(out)} unique {split} problems in "
                             f"{tries - 1} tries, but {need} are needed; ask for fewer")
        doc = make(rng)
        key = _key(doc)
        if key not in seen:
            seen.add(key)
            if _split_of(key, quota) == split:
                out.append(doc)
    return out


# ---------------------------------------------------------------- synthesizer output as conversations


def synth_conversations(path: str | Path) -> list[list[dict]]:
    """Conversations from a synth job's records (``slmforge synth``; synth/jobs.py): a shard file, a folder of
    them, or a job's output folder (its cleanest records: decontam/kept, else dedup/kept, else shards).

    Question/answer templates become one user and one assistant turn: math (question -> the solution ending
    ``#### N``), exercises (exercise -> solution), grounded_qa (passage and question -> reasoning and
    ``Answer: ...``). Free-text templates (textbook, rewrite) have no answer to train on: an error says so.
    """
    out, free = [], {}
    for file in _synth_files(Path(path)):
        for line_no, record in _json_lines(file):
            meta = record.get("meta") if isinstance(record, dict) else None
            source = record if isinstance(record, dict) and "fields" in record else meta
            fields = source.get("fields") if isinstance(source, dict) else None
            if not isinstance(fields, dict):
                raise ValueError(f"{file}:{line_no}: not a synthesizer record (no \"fields\"; give the output of "
                                 f"`slmforge synth`, or read {MESSAGES_FORMAT} lines as chat data)")
            turns = _synth_turns(fields, source.get("seed") if isinstance(source.get("seed"), dict) else {})
            if turns is None:
                free[str(source.get("template", "?"))] = sorted(fields)
            else:
                out.append(_qa(*turns))
    if not out:
        kinds = "; ".join(f"template {t!r} (fields {', '.join(f)})" for t, f in free.items()) or "no records"
        raise ValueError(f"{path}: no question/answer records to make conversations of: {kinds}; free text has "
                         f"no answer to train on (synthesize with the math, exercises or grounded_qa template, or "
                         f"pre-train on the text with data.paths)")
    return out


def _synth_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"{path}: no such file or folder (give a synth job's output folder or a shard file)")
    if (path / "shards").is_dir():
        path = next(p for p in (path / "decontam" / "kept", path / "dedup" / "kept", path / "shards") if p.is_dir())
    files = sorted(p for p in path.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")) and p.name != "rejects.jsonl")
    if not files:
        raise ValueError(f"{path}: no .jsonl files here (give a synth job's output folder or a shard file)")
    return files


def _synth_turns(fields: dict, seed: dict) -> tuple[str, str] | None:
    """(user, assistant) of a question/answer record, or None for free text."""
    if not all(isinstance(v, str) for v in fields.values()):
        return None
    question = fields.get("question") or fields.get("exercise")
    if question and fields.get("solution"):
        return question, fields["solution"]
    if question and fields.get("answer"):
        passage = f"{seed['passage']}\n\n" if isinstance(seed.get("passage"), str) else ""
        reasoning = f"{fields['reasoning']}\nAnswer: " if fields.get("reasoning") else ""
        return passage + question, reasoning + fields["answer"]
    return None


# ---------------------------------------------------------------- rendering and masking


@dataclass
class ChatExample:
    ids: np.ndarray  # (L,) int32: EOS + tokenizer.encode_chat(messages, add_generation_prompt=False)
    train: np.ndarray  # (L,) bool: the tokens the model learns to predict (assistant contents and their <|end|>)


def encode_conversations(tokenizer, conversations: list[list[dict]], max_len: int,
                         overlong: str = "truncate") -> tuple[list[ChatExample], dict]:
    """Render and mask each conversation; one longer than ``max_len`` tokens is cut to its first ``max_len``
    (``truncate``; kept only if a trained token remains, else skipped) or dropped (``skip``).

    Returns the examples and the counts {"conversations", "truncated", "skipped", "trained_tokens", "tokens"}
    (tokens of the kept examples); a ValueError when nothing is left.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r}: choose one of {', '.join(OVERLONG)}")
    counts = dict.fromkeys(("conversations", "truncated", "skipped", "trained_tokens", "tokens"), 0)
    examples = []
    for messages in conversations:
        counts["conversations"] += 1
        ids, train = _render(tokenizer, messages)
        if len(ids) > max_len:
            if overlong == "skip" or not train[:max_len].any():
                counts["skipped"] += 1
                continue
            ids, train = ids[:max_len], train[:max_len]
            counts["truncated"] += 1
        examples.append(ChatExample(ids, train))
        counts["tokens"] += len(ids)
        counts["trained_tokens"] += int(train.sum())
    if not counts["conversations"]:
        raise ValueError("no conversations to encode")
    if not examples:
        raise ValueError(f"no conversation left to train on: {counts['conversations']} given, {counts['skipped']} "
                         f"longer than finetune.max_len={max_len} tokens skipped (raise it, or truncate them with "
                         f"finetune.overlong=truncate)")
    return examples, counts


def _render(tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """EOS (as pre-training documents and chat prompts start) and ``encode_chat``'s ids, with the train mask."""
    end = tokenizer.token_id("<|end|>")
    ids, train = [tokenizer.eos_id], [False]
    for message in messages:
        role = tokenizer.token_id(lookup(CHAT_ROLES, message["role"], "chat role"))
        content = tokenizer.encode_text(message["content"])
        ids += [role, *content, end]
        train += [False] + [message["role"] == "assistant"] * (len(content) + 1)
    return np.array(ids, np.int32), np.array(train, bool)


# ---------------------------------------------------------------- batches


class SFTLoader:
    """Seeded, resumable (x, y, doc) batches of chat examples (the module docstring says what they hold).

    Epoch e takes the examples in the order of ``np.random.default_rng(seed + e)`` (``shuffle``; else as given;
    epoch 0 as given with ``curriculum``, post/curriculum.py's easy-to-hard order) into rows: with ``packing``
    greedily end to end (an example that does not fit in the row's remaining space starts the next row), else one
    per row. Global batch b is rows [b*B*W, (b+1)*B*W), rank r taking the r-th B.
    ``shuffle``: endless, an epoch's remainder rows dropped so ranks stay in step; else one pass per ``iter``, the
    last batch smaller. ``trained_tokens_per_step`` and ``fill`` (tokens / row space) are epoch 0's.
    """

    def __init__(self, examples: list[ChatExample], seq_len: int, batch_size: int, seed: int, pad_id: int,
                 packing: bool = True, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 curriculum: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"SFTLoader rank={rank}: must be in [0, world_size={world_size})")
        if not examples:
            raise ValueError("SFTLoader: no examples")
        self.lengths = np.array([len(e.ids) for e in examples], np.int64)
        if self.lengths.max() > seq_len:
            raise ValueError(f"SFTLoader: an example has {self.lengths.max()} tokens, more than seq_len={seq_len}; "
                             f"encode them with max_len={seq_len}")
        self.ids = [e.ids.astype(np.int64) for e in examples]
        # labels[t] = ids[t+1] where that token is trained, else IGNORE; the last token predicts nothing
        self.labels = [np.append(np.where(e.train[1:], e.ids[1:], IGNORE), IGNORE).astype(np.int64) for e in examples]
        self.seq_len, self.batch_size, self.seed, self.pad_id = seq_len, batch_size, seed, pad_id
        self.packing, self.shuffle, self.rank, self.world_size = packing, shuffle, rank, world_size
        self.curriculum = curriculum
        self.epoch = self.position = 0  # position: global batches of the current epoch already yielded
        self._plan: tuple[int, list[list[int]]] | None = None
        # Rows in any order number at least this many: no epoch goes without a whole batch.
        fewest = math.ceil(self.lengths.sum() / seq_len) if packing else len(examples)
        if shuffle and fewest < batch_size * world_size:
            raise ValueError(f"SFT data: {len(examples)} examples of {self.lengths.sum():,} tokens fill about "
                             f"{fewest} rows of {seq_len}, fewer than one batch of {batch_size} rows on each of "
                             f"{world_size} ranks; add conversations or lower the batch size")
        rows = self._rows(0)
        trained = sum(int((lab != IGNORE).sum()) for lab in self.labels)
        self.rows_per_epoch = len(rows)
        self.trained_tokens_per_step = trained / len(rows) * batch_size * world_size
        self.fill = float(self.lengths.sum()) / (len(rows) * seq_len)

    def _rows(self, epoch: int) -> list[list[int]]:
        """The example indices of each row of ``epoch``; cached for the epoch."""
        if self._plan is None or self._plan[0] != epoch:
            n = len(self.lengths)
            shuffled = self.shuffle and not (self.curriculum and epoch == 0)
            order = np.random.default_rng(self.seed + epoch).permutation(n) if shuffled else np.arange(n)
            rows, row, used = [], [], 0
            for i in order.tolist():
                if row and (not self.packing or used + self.lengths[i] > self.seq_len):
                    rows.append(row)
                    row, used = [], 0
                row.append(i)
                used += int(self.lengths[i])
            self._plan = (epoch, rows + [row])
        return self._plan[1]

    def __len__(self) -> int:
        """Global batches in the current epoch."""
        step = self.batch_size * self.world_size
        rows = len(self._rows(self.epoch))
        return rows // step if self.shuffle else -(-rows // step)

    def __iter__(self):
        while True:
            if self.position >= len(self):
                self.epoch, self.position = self.epoch + 1, 0
            while self.position < len(self):
                first = self.position * self.batch_size * self.world_size + self.rank * self.batch_size
                rows = self._rows(self.epoch)[first:first + self.batch_size]
                # Advance before yielding, so that state_dict() taken after a batch points past it.
                self.position += 1
                if rows:
                    yield self._batch(rows)
            if not self.shuffle:
                return

    def _batch(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (len(rows), self.seq_len)
        x, y, doc = np.full(shape, self.pad_id, np.int64), np.full(shape, IGNORE, np.int64), np.full(shape, -1)
        for r, row in enumerate(rows):
            ends = np.cumsum(self.lengths[row])
            for k, (i, end) in enumerate(zip(row, ends.tolist())):
                at = end - self.lengths[i]
                x[r, at:end], y[r, at:end], doc[r, at:end] = self.ids[i], self.labels[i], k
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(doc.astype(np.int64))

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, position=self.position, seed=self.seed, seq_len=self.seq_len,
                    batch_size=self.batch_size, world_size=self.world_size, packing=self.packing,
                    shuffle=self.shuffle, num_examples=len(self.lengths), curriculum=self.curriculum)

    def load_state_dict(self, state: dict) -> None:
        state = {"curriculum": False, **state}  # a state saved before finetune.curriculum existed
        for key in ("seed", "seq_len", "batch_size", "world_size", "packing", "shuffle", "num_examples", "curriculum"):
            mine = len(self.lengths) if key == "num_examples" else getattr(self, key)
            if state[key] != mine:
                raise ValueError(f"SFT loader state has {key}={state[key]!r} but this loader has {mine!r}; "
                                 f"resume with the same data and settings")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
