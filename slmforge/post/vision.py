"""``slmforge vision encoder|train``: the offline vision encoder, and the projector that lets a trained LM read it.

LLaVA's two stages (arXiv 2304.08485) on the generated scenes (``synth/images.py``):
  encoder  ``train_encoder``: the small CNN (``model/vision.py``) learns to classify every attribute of a scene from
           its summary token; then it is frozen and saved (``vision/encoder.*``). A Hugging Face or timm tower from
           local weights can stand in for it (``encoder.json`` with kind hf / timm, nothing to train).
  train    ``train_projector``: a new run from a trained text run, with ``model.vision`` set from the encoder; the
           encoder's features of every image are computed once (the encoder is frozen); an example is the image's
           P slots then its caption, in LLaVA's stage-1 ``plain`` template (``[slots] caption\n``) or the chat one
           (``<|user|>[slots]Describe the image.<|end|><|assistant|>caption<|end|>``, for a chat-tuned model), with the
           loss on the caption and its end only; the one training loop runs with ``train.trainable=projector``
           (stage 1: the LM's weights stay bit-identical) or every weight (``stage=2``, joint tuning).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from slmforge.checkpoint import find_checkpoint, find_tokenizer
from slmforge.config import load_config
from slmforge.eval.vision import read_records
from slmforge.log import log
from slmforge.model.vision import SmallCNN
from slmforge.progress import progress_bar
from slmforge.runs import RunDir
from slmforge.serve.vision import (answer_ids, default_prompt, image_features, load_encoder,
                                   read_image, save_encoder, to_tensor, vision_prompt)
from slmforge.synth.images import COLOURS, COUNTS, KINDS, POSITIONS, RELATIONS, SHAPES, SIZES
from slmforge.tokens.tokenizer import Tokenizer
from slmforge.train.loop import RunResult, train
from slmforge.train.task import Task

# Every attribute the encoder's heads classify, with its words; the label of an attribute a scene lacks is -1.
HEADS = {"kind": list(KINDS), "size": list(SIZES), "colour": list(COLOURS), "shape": list(SHAPES),
         "position": list(POSITIONS), "count": list(COUNTS.values()), "relation": list(RELATIONS),
         "colour2": list(COLOURS), "shape2": list(SHAPES)}
# Stage 1 trains the projector alone: 3000 steps at 1e-2 were the best of the settings measured (README, "Vision");
# the schedule and evaluation of fine-tuning. Stage 2 (the LM too) wants a lower rate: train.lr_peak=1e-3.
DEFAULTS = ["train.max_steps=3000", "train.lr_peak=1e-2", "train.warmup_steps=30", "train.schedule=cosine",
            "train.lr_min_ratio=0.1", "train.eval_every=500", "train.ckpt_every=500", "train.weight_decay=0.0",
            "train.batch_size=32", "train.anneal_stage=", "post=[]"]


def read_manifest(data: str | Path, split: str, limit: int = 0) -> list[dict]:
    """The records of ``<data>/<split>.jsonl`` (``slmforge vision data``), each with its image's path."""
    return [{**r, "path": str(Path(data) / r["image"])} for r in read_records(data, split, limit)]


def load_images(records: list[dict], desc: str) -> list:
    return [read_image(r["path"]) for r in progress_bar(records, desc=desc, unit="img")]


def labels(records: list[dict]) -> dict[str, torch.Tensor]:
    out = {}
    for name, words in HEADS.items():
        values = [r["kind"] if name == "kind" else r["attrs"].get(name) for r in records]
        out[name] = torch.tensor([words.index(v) if v is not None else -1 for v in values])
    return out


# ---------------------------------------------------------------- the encoder


def train_encoder(data: str | Path, out: str | Path, dim: int = 128, steps: int = 1500, batch_size: int = 64,
                  lr: float = 2e-3, seed: int = 0, limit: int = 0, attribute_tokens: bool = False) -> dict:
    """Train ``SmallCNN`` to classify every attribute of the training scenes; save it frozen to ``out``; return the
    validation accuracy of each head."""
    train_recs, val_recs = read_manifest(data, "train", limit), read_manifest(data, "validation")
    size = read_image(train_recs[0]["path"]).width
    x_train = to_tensor(load_images(train_recs, "images"), size)
    x_val = to_tensor(load_images(val_recs, "images"), size)
    y_train, y_val = labels(train_recs), labels(val_recs)
    torch.manual_seed(seed)
    heads = {k: len(v) for k, v in HEADS.items()}
    encoder = SmallCNN(dim, size, heads, attribute_tokens)
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    bar = progress_bar(total=steps, desc="encoder")
    for _ in range(steps):
        idx = torch.randint(len(train_recs), (batch_size,), generator=gen)
        logits = encoder.classify(x_train[idx])
        loss = sum(F.cross_entropy(logits[k], y_train[k][idx], ignore_index=-1) for k in HEADS
                   if (y_train[k][idx] >= 0).any())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
    bar.close()
    held = torch.tensor([bool(r["held_out"]) for r in val_recs])
    accuracy = head_accuracy(encoder.eval(), x_val, y_val)
    accuracy_held_out = head_accuracy(encoder, x_val[held], {k: v[held] for k, v in y_val.items()})
    save_encoder(encoder, {"kind": "cnn", "dim": dim, "image_size": size, "heads": heads,
                           "attribute_tokens": attribute_tokens}, out)
    (Path(out) / "encoder_eval.json").write_text(json.dumps(
        {"validation_accuracy": accuracy, "held_out_pairs_accuracy": accuracy_held_out}, indent=1) + "\n")
    log(f"vision encoder: validation accuracy {', '.join(f'{k} {v:.3f}' for k, v in accuracy.items())}; on "
        f"images with a held-out pair {', '.join(f'{k} {v:.3f}' for k, v in accuracy_held_out.items())}; "
        f"saved to {out}")
    return accuracy


@torch.no_grad()
def head_accuracy(encoder: SmallCNN, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, float]:
    logits = {k: torch.cat([encoder.classify(x[i:i + 256])[k] for i in range(0, len(x), 256)]) for k in HEADS}
    return {k: float((logits[k].argmax(-1) == y[k])[y[k] >= 0].float().mean()) for k in HEADS if (y[k] >= 0).any()}


# ---------------------------------------------------------------- the projector


@dataclass
class Captions:
    """Encoded examples: tokens and targets (N, L), image slots (N, L), encoder features (N, P, F)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    slots: torch.Tensor
    feats: torch.Tensor

    def batch(self, idx: torch.Tensor) -> tuple:
        return self.tokens[idx], self.targets[idx], self.feats[idx], self.slots[idx]


def encode_captions(tokenizer, records: list[dict], feats: torch.Tensor, template: str) -> Captions:
    """The examples of ``records`` in ``template`` (module docstring), right-padded to one length."""
    prompt, slots = vision_prompt(tokenizer, feats.shape[1], default_prompt(template), template)
    pad = tokenizer.token_id("<|pad|>")
    rows = [prompt + answer_ids(tokenizer, r["caption"], template) for r in records]
    length = max(map(len, rows)) - 1
    tokens = torch.full((len(rows), length), pad)
    targets = torch.full((len(rows), length), -100)
    for i, row in enumerate(rows):
        tokens[i, :len(row) - 1] = torch.tensor(row[:-1])
        targets[i, len(prompt) - 1:len(row) - 1] = torch.tensor(row[len(prompt):])
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    mask[:, :len(slots)] = torch.tensor(slots)
    return Captions(tokens, targets, mask, feats)


class CaptionLoader:
    """Endless shuffled batches of one ``Captions``, epoch by epoch; its state is (epoch, position): exact resume."""

    def __init__(self, data: Captions, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch = self.pos = 0

    def __iter__(self):
        n = len(self.data.tokens)
        while True:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
            while self.pos + self.batch_size <= n:
                idx = order[self.pos:self.pos + self.batch_size]
                self.pos += self.batch_size
                yield self.data.batch(idx)
            self.epoch, self.pos = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["position"]


def caption_loss(model, batch):
    tokens, targets, feats, slots = batch
    return model(tokens, targets=targets, images=feats, image_mask=slots)[1]


def _evaluate(model, batches, device) -> dict:
    was = model.training
    model.eval()
    with torch.no_grad():
        losses = [caption_loss(model, tuple(p.to(device) for p in b)).item() for b in batches]
    model.train(was)
    return {"val_loss": sum(losses) / len(losses)}


def vision_config(base: str | Path, encoder, overrides: list[str], stage: int, projector: str):
    """The new run's config: the base run's, with ``model.vision`` from the encoder and the stage's trainable set."""
    base = Path(base)
    if not (base / "config.yaml").is_file():
        raise ValueError(f"{base}: not a trained run folder (no config.yaml); give one made by slmforge run or train")
    find_checkpoint(base)
    if stage not in (1, 2):
        raise ValueError(f"stage={stage}: expected 1 (projector only) or 2 (projector and LM)")
    keys = [f"name={base.name}_vision", f"out_dir={base.parent}", f"train.init_from={base}", *DEFAULTS,
            f"model.vision.feature_dim={encoder.feature_dim}", f"model.vision.num_tokens={encoder.num_tokens}",
            f"model.vision.projector={projector}", f"train.trainable={'projector' if stage == 1 else ''}"]
    return load_config(base / "config.yaml", keys + list(overrides))


def train_projector(base: str | Path, data: str | Path, encoder_dir: str | Path, overrides: list[str] | None = None,
                    stage: int = 1, projector: str = "linear", limit: int = 0, resume: bool = False,
                    force: bool = False, progress: bool = True) -> RunResult:
    """Stage 1 (or 2) of LLaVA on the images of ``data`` from the trained text run ``base``; returns the result."""
    encoder = load_encoder(encoder_dir)
    cfg = vision_config(base, encoder, overrides or [], stage, projector)
    tok_path = find_tokenizer(RunDir.at(base), load_config(Path(base) / "config.yaml"))
    tokenizer = Tokenizer.load(tok_path)  # the base's weights load once, in the training loop (train.init_from)
    train_recs, val_recs = read_manifest(data, "train", limit), read_manifest(data, "validation")
    feats = {s: image_features(encoder, load_images(r, f"{s} images")) for s, r in
             (("train", train_recs), ("validation", val_recs))}
    template = cfg.model.vision.template
    train_c = encode_captions(tokenizer, train_recs, feats["train"], template)
    val_c = encode_captions(tokenizer, val_recs, feats["validation"], template)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=train_c.tokens.shape[1]))
    bs = cfg.train.batch_size
    val_batches = [val_c.batch(torch.arange(i, min(i + bs, len(val_recs)))) for i in range(0, len(val_recs), bs)]
    task = Task(CaptionLoader(train_c, bs, cfg.train.seed), val_batches[:cfg.train.eval_batches], caption_loss,
                _evaluate, tokenizer=tok_path)
    log(f"vision: {len(train_recs):,} training images, {feats['train'].shape[1]} image tokens of "
        f"{feats['train'].shape[2]}, stage {stage} ({'projector only' if stage == 1 else 'projector and LM'})")
    result = train(cfg, resume=resume, force=force, progress=progress, task=task)
    save_encoder(encoder, json.loads((load_encoder_dir(encoder_dir) / "encoder.json").read_text()),
                 RunDir.of(cfg).root / "vision")
    return result


def load_encoder_dir(folder: str | Path) -> Path:
    folder = Path(folder)
    return folder / "vision" if (folder / "vision" / "encoder.json").is_file() else folder

