"""The training tasks of post-training: what ``train.loop.train`` steps on for SFT, ORPO and DPO.

Each builder returns a ``Task`` (the loader, the loss with its step metrics, the validation), so the one training
loop runs every stage with the same checkpoints, exact resume, metrics and progress bar as pre-training.

- SFT: conversations, loss on assistant tokens only, packed rows with document masking (``LM.forward(doc=...)``).
- ORPO (Hong et al. 2024): NLL on the chosen reply plus beta times the odds-ratio term, no reference model.
- DPO (Rafailov et al. 2023): a frozen reference whose sequence log-probs are computed once, before training,
  and cached in the run folder (``reference_logps.npz``), so the reference model is never in memory while training.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from slmforge.config import RunConfig
from slmforge.log import log
from slmforge.post.chat_data import SFTLoader, encode_conversations
from slmforge.post.curriculum import order_by_difficulty
from slmforge.post.losses import dpo_loss, orpo_loss, sequence_logps
from slmforge.post.prefs import EncodedPair, PairLoader, encode_pairs
from slmforge.progress import progress_bar
from slmforge.runs import RunDir, atomic_path
from slmforge.tokens.shards import TokenLoader
from slmforge.train.task import Task


def max_len(cfg: RunConfig) -> int:
    return cfg.finetune.max_len or cfg.model.max_seq_len


def sft_task(cfg: RunConfig, tokenizer, tokenizer_path: Path, train_convs: list, val_convs: list,
             rank: int = 0, world_size: int = 1, replay_shards: Path | None = None) -> Task:
    """SFT on conversations: y is -100 except on assistant tokens; ``doc`` keeps packed conversations apart. With
    ``finetune.replay`` > 0 that share of each batch's rows are pre-training windows of ``replay_shards``."""
    f, t = cfg.finetune, cfg.train
    if f.curriculum:  # epoch 0 easy to hard: the loader keeps this order in its first epoch
        train_convs = order_by_difficulty(train_convs, t.seed)
    train_ex, counts = encode_conversations(tokenizer, train_convs, max_len(cfg), f.overlong)
    val_ex, _ = encode_conversations(tokenizer, val_convs, max_len(cfg), f.overlong)
    log(f"sft: {counts['conversations']:,} conversations, {counts['trained_tokens']:,} trained tokens of "
        f"{counts['tokens']:,}; {counts['truncated']} truncated, {counts['skipped']} skipped (over "
        f"finetune.max_len={max_len(cfg)}); {len(val_ex):,} held out")
    replay_rows = round(f.replay * t.batch_size)
    loader = SFTLoader(train_ex, max_len(cfg), t.batch_size - replay_rows, t.seed, tokenizer.pad_id,
                       packing=f.packing, rank=rank, world_size=world_size, curriculum=f.curriculum)
    if replay_rows:
        loader = ReplayLoader(loader, TokenLoader(replay_shards, max_len(cfg), replay_rows, seed=t.seed, rank=rank,
                                                  world_size=world_size))
    val = SFTLoader(val_ex, max_len(cfg), t.batch_size, t.seed, tokenizer.pad_id, packing=f.packing,
                    shuffle=False)
    val_batches = [b for _, b in zip(range(t.eval_batches), val)]

    def loss(model, batch):
        x, y, doc = batch
        return model(x, targets=y, doc=doc if f.packing else None)[1]

    return Task(loader, val_batches, loss, _sft_eval(f.packing), tokenizer=tokenizer_path)


class ReplayLoader:
    """SFT batches with pre-training windows appended as extra rows (loss on every token, one document each):
    replaying the base corpus keeps what pre-training taught (the "alignment tax" on it) from being forgotten."""

    def __init__(self, sft: SFTLoader, replay: TokenLoader):
        self.sft, self.replay = sft, replay

    def __iter__(self):
        for (x, y, doc), (rx, ry) in zip(self.sft, self.replay):
            yield torch.cat([x, rx]), torch.cat([y, ry]), torch.cat([doc, torch.zeros_like(rx)])

    def state_dict(self) -> dict:
        return {"sft": self.sft.state_dict(), "replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sft.load_state_dict(state["sft"])
        self.replay.load_state_dict(state["replay"])


def _sft_eval(packing: bool):
    @torch.no_grad()
    def evaluate(model, batches, device) -> dict:
        was = model.training
        model.eval()
        total = count = 0.0
        for x, y, doc in batches:
            x, y, doc = x.to(device), y.to(device), doc.to(device)
            n = int((y != -100).sum())
            if n:
                total += float(model(x, targets=y, doc=doc if packing else None)[1]) * n
                count += n
        model.train(was)
        return {"val_loss": total / max(count, 1)}
    return evaluate


def pair_loss(method: str, beta: float, label_smoothing: float = 0.0, ref: torch.Tensor | None = None):
    """(model, (tokens, targets, index)) -> (loss, metrics) for ORPO or DPO; rows 0..B-1 chosen, B..2B-1 rejected.
    ``ref`` (num_pairs, 2): the reference's summed log-probs of (chosen, rejected), DPO only."""
    def loss(model, batch):
        tokens, targets, index = batch[:3]
        sums, counts = sequence_logps(model(tokens)[0], targets)
        b = tokens.shape[0] // 2
        if method == "orpo":
            mean = sums / counts.clamp(min=1)
            nll = -sums[:b].sum() / counts[:b].sum().clamp(min=1)
            value, metrics = orpo_loss(mean[:b], mean[b:], nll, beta)
        else:
            r = ref.to(sums.device)[index]
            value, metrics = dpo_loss(sums[:b], sums[b:], r[:, 0], r[:, 1], beta, label_smoothing)
        metrics.pop("loss", None)
        if len(batch) == 5:  # PairReplayLoader's pre-training windows: their plain next-token loss, added
            replay = model(batch[3], targets=batch[4])[1]
            value = value + replay
            metrics["replay_nll"] = float(replay.detach())
        return value, metrics
    return loss


def pair_eval(loss_fn):
    @torch.no_grad()
    def evaluate(model, batches, device) -> dict:
        was = model.training
        model.eval()
        sums: dict[str, float] = {}
        n = 0
        for batch in batches:
            rows = batch[2].numel()
            value, metrics = loss_fn(model, tuple(part.to(device) for part in batch))
            for key, v in {"loss": float(value), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + v * rows
            n += rows
        model.train(was)
        return {f"val_{k}": v / max(n, 1) for k, v in sums.items()}
    return evaluate


class PairReplayLoader:
    """Preference batches with ``finetune.replay * batch_size`` pre-training windows beside them, as
    (tokens, targets, index, replay x, replay y): their next-token loss is added to the pair loss, which keeps the
    base corpus's loss from drifting up while the pairs pull the replies apart (the alignment tax), as in SFT."""

    def __init__(self, pairs: PairLoader, replay: TokenLoader):
        self.pairs, self.replay = pairs, replay

    def __iter__(self):
        for (tokens, targets, index), (rx, ry) in zip(self.pairs, self.replay):
            yield tokens, targets, index, rx, ry

    def state_dict(self) -> dict:
        return {"pairs": self.pairs.state_dict(), "replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.pairs.load_state_dict(state["pairs"])
        self.replay.load_state_dict(state["replay"])


def pair_task(cfg: RunConfig, tokenizer_path: Path, pad_id: int, train_pairs: list[EncodedPair],
              val_pairs: list[EncodedPair], ref: torch.Tensor | None = None, rank: int = 0,
              world_size: int = 1, replay_shards: Path | None = None) -> Task:
    """ORPO or DPO on encoded pairs; ``ref`` (len(train) + len(val), 2) for DPO, train pairs first; with
    ``finetune.replay`` > 0, pre-training windows of ``replay_shards`` beside each batch (``PairReplayLoader``)."""
    f, t = cfg.finetune, cfg.train
    loader = PairLoader(train_pairs, t.batch_size, t.seed, pad_id, rank=rank, world_size=world_size)
    replay_rows = round(f.replay * t.batch_size)
    if replay_rows:
        loader = PairReplayLoader(loader, TokenLoader(replay_shards, max_len(cfg), replay_rows, seed=t.seed,
                                                      rank=rank, world_size=world_size))
    val_ref = None if ref is None else ref[len(train_pairs):]
    val = PairLoader(val_pairs[: f.eval_pairs], t.batch_size, t.seed, pad_id, shuffle=False)
    train_loss = pair_loss(f.method, f.beta, f.label_smoothing, None if ref is None else ref[: len(train_pairs)])
    val_loss = pair_loss(f.method, f.beta, f.label_smoothing, val_ref)
    return Task(loader, list(val), train_loss, pair_eval(val_loss), tokenizer=tokenizer_path)


def evaluate_pairs(model, tokenizer, pairs: list, cfg: RunConfig, ref: torch.Tensor | None = None) -> dict:
    """Held-out preference metrics of ``model`` on ``pairs`` (``Pair``s) under ``cfg.finetune``'s method and beta:
    the loss, reward margin and accuracy, chosen and rejected log-probs (ORPO's rewards need no reference)."""
    encoded, _ = encode_pairs(tokenizer, pairs, max_len(cfg), cfg.finetune.overlong)
    f = cfg.finetune
    batches = list(PairLoader(encoded, cfg.train.batch_size, 0, tokenizer.pad_id, shuffle=False))
    device = next(model.parameters()).device
    return pair_eval(pair_loss(f.method, f.beta, f.label_smoothing, ref))(model, batches, device)


@torch.no_grad()
def reference_logps(model, pairs: list[EncodedPair], pad_id: int, batch_size: int, run: RunDir,
                    weights_key: str) -> torch.Tensor:
    """(len(pairs), 2) summed log-probs of (chosen, rejected) under the frozen reference, computed once and
    cached in the run folder, keyed by the reference weights and the pairs (a resumed run reuses them)."""
    key = hashlib.sha256(weights_key.encode() + repr([(p.prompt, p.chosen, p.rejected) for p in pairs]).encode())
    path = run.root / "reference_logps.npz"
    if path.is_file():
        cached = np.load(path)
        if str(cached["key"]) == key.hexdigest():
            return torch.from_numpy(cached["logps"])
    model.eval()
    out = torch.zeros(len(pairs), 2)
    loader = PairLoader(pairs, batch_size, 0, pad_id, shuffle=False)
    bar = progress_bar(total=len(pairs), desc="reference log-probs")
    for tokens, targets, index in loader:
        sums, _ = sequence_logps(model(tokens)[0], targets)
        b = tokens.shape[0] // 2
        out[index] = torch.stack([sums[:b], sums[b:]], dim=1).float()
        bar.update(len(index))
    bar.close()
    run.root.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, key=np.array(key.hexdigest()), logps=out.numpy())
    return out
