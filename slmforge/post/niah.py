"""Long-context training on needle-in-a-haystack samples (``slmforge niah train RUN``, ``slmforge niah run RECIPE``).

A new run folder, ``<RUN>_niah`` beside RUN (or ``name=...``), trained by the one training loop on a ``Task`` whose
loader makes ``synth/niah.py`` samples as it goes: the loss is the next-token loss on the answer tokens, plus
``lm_weight`` times the next-token loss on the rest (haystack, needles, questions), which keeps the language
model and, trained from scratch, teaches it. A length curriculum runs ``lengths`` short to long (``length_steps``
optimizer steps each); every step holds about ``tokens_per_step`` tokens, so rows per step shrink as the length
grows (memory stays flat). ``init=run`` starts from RUN's weights (context extension: set
``model.max_seq_len``, ``model.attn.rope_scaling`` and ``rope_factor``); ``init=scratch`` trains RUN's model
config from fresh weights, with RUN's tokenizer. ``train.activation_checkpointing=true`` recomputes each block in
backward, for the long rows. Validation: the answer loss and ``val_recall``, the share of held-out samples at
the longest length whose every answer token is the argmax (what greedy decoding of the answer returns).
The NIAH settings are written to ``niah.yaml`` in the new folder once it has trained; the loader's state is its batch count,
so a resumed run makes the same samples.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from slmforge.checkpoint import find_checkpoint, find_tokenizer
from slmforge.config import RunConfig, dump_yaml, load, load_config
from slmforge.config.loading import validate
from slmforge.eval.niah import NiahEvalConfig
from slmforge.log import log
from slmforge.runs import RunDir, write_text
from slmforge.synth.niah import Haystack, NiahConfig, make_sample
from slmforge.tokens.tokenizer import Tokenizer
from slmforge.train.loop import RunResult, train
from slmforge.train.task import Task

# Fine-tuning defaults (a run's own keys and the user's win): cosine to 10%, evaluation and checkpoints often.
COMMON = ["train.schedule=cosine", "train.lr_min_ratio=0.1", "train.warmup_steps=20", "train.eval_every=50",
          "train.ckpt_every=50", "train.eval_batches=1", "train.weight_decay=0.0", "train.anneal_stage=", "post=[]",
          "data.mixture.stages=[]"]


@dataclass
class NiahTrainConfig(NiahConfig):
    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048])  # the curriculum, short to long
    length_steps: list[int] = field(default_factory=list)  # optimizer steps at each length; [] = max_steps split evenly
    tokens_per_step: int = 16384  # tokens per optimizer step at every length (rows = tokens_per_step // length)
    lm_weight: float = 0.0  # weight of the next-token loss on the non-answer tokens (0 = answers only)
    init: Literal["run", "scratch"] = "run"  # RUN's weights, or fresh weights of RUN's model config
    val_samples: int = 8  # held-out samples at the longest length, scored at each evaluation
    questions: int = 2  # questions per training sample (multi needles): more answers per step
    copy_share: float = 0.0  # share of rows that are copy rows (random tokens, segments copied later): induction

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        if not self.lengths or min(self.lengths) < 32:
            raise ValueError(f"{prefix}lengths={self.lengths}: give context lengths of at least 32 tokens, short "
                             f"to long (lengths=[512,1024])")
        if self.length_steps and len(self.length_steps) != len(self.lengths):
            raise ValueError(f"{prefix}length_steps has {len(self.length_steps)} entries for {len(self.lengths)} "
                             f"lengths; give one per length or [] to split train.max_steps evenly")
        if self.tokens_per_step < 1 or self.val_samples < 1 or self.lm_weight < 0:
            raise ValueError(f"{prefix}tokens_per_step, val_samples: expected >= 1; lm_weight: expected >= 0")
        if not 0 <= self.copy_share < 1:
            raise ValueError(f"{prefix}copy_share={self.copy_share}: expected a share in [0, 1)")


NIAH_KEYS = {f.name for f in dataclasses.fields(NiahTrainConfig)}


def niah_config(source: str | Path, overrides: list[str] | None = None) -> tuple[RunConfig, NiahTrainConfig]:
    """The run config and NIAH settings of training on ``source`` (a run folder). Keys of NiahTrainConfig
    (``lengths=...``, ``lm_weight=...``) are NIAH settings; every other key is a run key (``train.max_steps``,
    ``model.attn.rope_scaling``, ``name``). The new run is <source>_niah beside it."""
    source = Path(source)
    if not (source / "config.yaml").is_file():
        raise ValueError(f"{source}: not a trained run folder (no config.yaml); give one made by `slmforge run`")
    items = list(overrides or [])
    mine = [o for o in items if o.split("=", 1)[0].split(".")[0] in NIAH_KEYS]
    ncfg = load(NiahTrainConfig, None, mine)
    if ncfg.init == "run":
        find_checkpoint(source)  # a run that never saved a checkpoint is refused now
    base = [f"name={source.name}_niah", f"out_dir={source.parent}", *COMMON,
            f"train.init_from={source if ncfg.init == 'run' else ''}", f"data.seq_len={max(ncfg.lengths)}",
            f"train.batch_size={max(1, ncfg.tokens_per_step // max(ncfg.lengths))}"]
    cfg = load_config(source / "config.yaml", base + [o for o in items if o not in mine])
    return cfg, ncfg


def niah_train(cfg: RunConfig, ncfg: NiahTrainConfig, source: str | Path, resume: bool = False,
               force: bool = False, progress: bool = True) -> RunResult:
    """Train ``cfg``'s run on NIAH samples (``niah_config`` makes both configs from ``source``)."""
    tok_path = find_tokenizer(RunDir.at(source), load_config(Path(source) / "config.yaml"))
    tokenizer = Tokenizer.load(tok_path)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"{tok_path}: {tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}")
    haystack = Haystack(ncfg.haystack, tokenizer, ncfg.text_field)
    task = niah_task(cfg, ncfg, haystack, tok_path)
    run = RunDir.of(cfg)
    log(f"niah: lengths {ncfg.lengths}, about {ncfg.tokens_per_step:,} tokens per step, "
        f"{'from ' + str(source) if ncfg.init == 'run' else 'fresh weights'} -> {run.root}")
    result = train(cfg, resume=resume, force=force, progress=progress, task=task)
    write_text(run.root / "niah.yaml", dump_yaml(ncfg))  # what it was trained on, beside config.yaml
    return result


def niah_task(cfg: RunConfig, ncfg: NiahTrainConfig, haystack: Haystack, tokenizer_path: Path | None = None) -> Task:
    """The ``Task``: the curriculum loader, the answer (+ lm_weight x text) loss, held-out recall."""
    for kind in dict.fromkeys(ncfg.kinds):  # a length too short for the needles fails now, not at its first batch
        make_sample(haystack, dataclasses.replace(ncfg, kinds=[kind]), min(ncfg.lengths), 0.5, "check")
    loader = NiahLoader(haystack, ncfg, cfg.train.max_steps, cfg.train.grad_accum)
    held_out = dataclasses.replace(ncfg, seed=ncfg.seed + 1_000_003)
    rows = max(1, ncfg.tokens_per_step // max(ncfg.lengths))
    val = [make_sample(haystack, held_out, max(ncfg.lengths), random.Random(j).random(), f"val:{j}")
           for j in range(ncfg.val_samples)]
    pad = haystack.tokenizer.pad_id
    val_batches = [rows_batch(val[i : i + rows], pad) for i in range(0, len(val), rows)]
    return Task(loader, val_batches, niah_loss(ncfg.lm_weight), evaluate_recall, tokenizer=tokenizer_path)


class NiahLoader:
    """Endless (x, answer targets, text targets) batches on the length curriculum; its state is the batch count."""

    def __init__(self, haystack: Haystack, ncfg: NiahTrainConfig, max_steps: int, grad_accum: int = 1):
        self.haystack, self.cfg, self.grad_accum = haystack, ncfg, grad_accum
        steps = ncfg.length_steps or [max(1, -(-max_steps // len(ncfg.lengths)))] * len(ncfg.lengths)
        self.ends = [sum(steps[: i + 1]) for i in range(len(steps))]
        self.batches = 0

    def length_at(self, step: int) -> int:
        """The curriculum's length at optimizer step ``step`` (the last length after the last end)."""
        return self.cfg.lengths[next((i for i, end in enumerate(self.ends) if step < end), len(self.ends) - 1)]

    def __iter__(self):
        while True:
            length = self.length_at(self.batches // self.grad_accum)
            rows = max(1, self.cfg.tokens_per_step // self.grad_accum // length)
            depths = random.Random(f"slmforge.niah.train:{self.cfg.seed}:{self.batches}")
            copies = round(rows * self.cfg.copy_share)
            samples = [make_sample(self.haystack, self.cfg, length, depths.random(), f"train:{self.batches}:{r}")
                       for r in range(rows - copies)]
            batch = rows_batch(samples, self.haystack.tokenizer.pad_id)
            if copies:
                batch = _with_copies(batch, copies, self.haystack.tokenizer.vocab_size, depths)
            self.batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = state["batches"]


def _with_copies(batch: tuple, copies: int, vocab: int, rng: random.Random) -> tuple:
    """``copies`` more rows of the batch's width: random token ids whose second half is made of 16-token slots,
    each a copy of a segment from a random place of the first half; the copies (past each slot's first token) are
    text targets. The prefix-matching copy of induction heads (Olsson et al. 2022) at varying distances, the
    circuit the needles' key lookup then uses."""
    x, answer, text = batch
    width = x.shape[1]
    half = (width + 1) // 2
    gen = torch.Generator().manual_seed(rng.randrange(2**62))
    ids = torch.randint(7, vocab, (copies, width + 1), generator=gen)  # above the special ids (0..6)
    target = torch.full((copies, width), -100, dtype=torch.long)
    for r in range(copies):
        for start in range(half, width + 1 - 4, 16):
            size = min(16, width + 1 - start)
            src = rng.randrange(0, half - size + 1)
            ids[r, start : start + size] = ids[r, src : src + size]
            target[r, start : start + size - 1] = ids[r, start + 1 : start + size]
    none = torch.full_like(target, -100)
    return torch.cat([x, ids[:, :-1]]), torch.cat([answer, none]), torch.cat([text, target])


def rows_batch(samples: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples right-padded into x (B, T), answer targets (B, T) and the other tokens' targets (B, T), -100 where
    a position has no target of that kind."""
    width = max(len(s.ids) for s in samples) - 1
    x = torch.full((len(samples), width), pad_id, dtype=torch.long)
    answer = torch.full((len(samples), width), -100, dtype=torch.long)
    text = torch.full((len(samples), width), -100, dtype=torch.long)
    for r, s in enumerate(samples):
        ids = torch.tensor(s.ids)
        x[r, : len(ids) - 1] = ids[:-1]
        text[r, : len(ids) - 1] = ids[1:]
        for start, end in s.answers:  # the target at position p is token p + 1
            answer[r, start - 1 : end - 1] = ids[start:end]
            text[r, start - 1 : end - 1] = -100
    return x, answer, text


def niah_loss(lm_weight: float):
    """(model, batch) -> (answer loss + lm_weight x text loss, {answer_loss, answer_acc, text_loss})."""
    def loss(model, batch):
        x, answer, text = batch
        logits = model(x)[0].float()  # (B, T, V)
        flat = logits.view(-1, logits.shape[-1])
        value = F.cross_entropy(flat, answer.reshape(-1), ignore_index=-100)
        mask = answer != -100
        metrics = {"answer_loss": value.item(), "answer_acc": float((logits.argmax(-1)[mask] == answer[mask])
                                                                    .float().mean())}
        if lm_weight:
            lm = F.cross_entropy(flat, text.reshape(-1), ignore_index=-100)
            metrics["text_loss"] = lm.item()
            value = value + lm_weight * lm
        return value, metrics
    return loss


@torch.no_grad()
def evaluate_recall(model, batches, device) -> dict:
    """The held-out answer loss and recall (every token of the last answer the argmax: greedy's exact match)."""
    was = model.training
    model.eval()
    total = count = found = rows = 0.0
    for x, answer, _ in batches:
        x, answer = x.to(device), answer.to(device)
        logits = model(x)[0].float()
        mask = answer != -100
        total += float(F.cross_entropy(logits[mask], answer[mask], reduction="sum"))
        count += int(mask.sum())
        right = logits.argmax(-1) == answer
        for r in range(x.shape[0]):
            found += bool(right[r, last_run(torch.nonzero(mask[r]).flatten().tolist())].all())
            rows += 1
    model.train(was)
    return {"val_loss": total / max(count, 1), "val_recall": found / max(rows, 1)}


def last_run(positions: list[int]) -> list[int]:
    """The last run of consecutive positions in an ascending list: the last answer's target positions."""
    start = len(positions) - 1
    while start > 0 and positions[start - 1] == positions[start] - 1:
        start -= 1
    return positions[start:]


# ---------------------------------------------------------------- recipes: base run -> NIAH stages -> eval


@dataclass
class NiahRecipe:
    """``slmforge niah run RECIPE``: the base run, then NIAH stages each from the one before, then the grid."""

    name: str = "niah"  # the base run's folder name (<out_dir>/<name>)
    out_dir: str = "runs"
    base: RunConfig = field(default_factory=RunConfig)  # the base run (`slmforge run` keys), trained first
    stages: list[dict[str, Any]] = field(default_factory=list)  # NIAH keys and run keys (train: {...}, model: ...)
    eval: dict[str, Any] = field(default_factory=dict)  # `slmforge eval niah` keys for the last stage

    def validate(self, prefix: str = "") -> None:
        """Every part read now, so that a typo in the last stage or the evaluation stops before any training."""
        validate(self.base, f"{prefix}base.")
        if not self.stages:
            raise ValueError(f"{prefix}stages is empty: give at least one NIAH stage (lengths: [...], train: {{...}})")
        for i, stage in enumerate(self.stages):
            items = stage_overrides({k: v for k, v in stage.items() if k != "name"})
            mine = [o for o in items if o.split("=", 1)[0].split(".")[0] in NIAH_KEYS]
            _checked(f"{prefix}stages[{i}]", NiahTrainConfig, mine)
            _checked(f"{prefix}stages[{i}]", RunConfig, [o for o in items if o not in mine])
        _checked(f"{prefix}eval", NiahEvalConfig, stage_overrides(self.eval))


def _checked(where: str, cls, items: list[str]) -> None:
    try:
        load(cls, None, items, where=where)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def stage_overrides(stage: dict[str, Any]) -> list[str]:
    """A stage mapping as ``key=value`` items: nested run keys dotted, lists as JSON (valid YAML)."""
    out = []
    for key, value in stage.items():
        if isinstance(value, dict) and key not in NIAH_KEYS:
            out += [f"{key}.{item}" for item in stage_overrides(value)]
        else:
            out.append(f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}")
    return out


def niah_chain(source: str | Path, stages: list[dict[str, Any]]) -> Path:
    """Train ``stages`` one after the other, the first from ``source``; finished stages are skipped, a stopped one
    resumes. Returns the last stage's run folder."""
    source = Path(source)
    for stage in stages:
        items = stage_overrides({k: v for k, v in stage.items() if k != "name"})
        cfg, ncfg = niah_config(source, [*items, f"name={stage.get('name') or f'{source.name}_niah'}"])
        run = RunDir.of(cfg)
        done = run.train_result.is_file() and json.loads(run.train_result.read_text())["steps"] >= cfg.train.max_steps
        if done:
            log(f"niah: {cfg.name}: already finished")
        else:  # a stopped stage resumes from its newest checkpoint (none yet: from the start)
            niah_train(cfg, ncfg, source, resume=True)
        source = run.root
    return source
