"""``slmforge sft|orpo|dpo RUN [k=v]``: a post-training run folder made from a trained run.

``finetune_config`` builds the new run's config from the source run's ``config.yaml`` (same model, same data seed,
so held-out problems stay held out), the method's fine-tuning defaults and the user's keys; ``post_train`` reads
the data, builds the task (``post/tasks.py``) and runs the one training loop. The new folder has everything
``chat``, ``serve``, ``eval`` and ``export`` read (config.yaml, tokenizer.json, checkpoints) plus the source
run's held-out documents (``data/{validation,test}.jsonl``), so ``eval gsm8k data=procedural`` scores the same
problems before and after. A Hugging Face folder as the source is imported first (``<run>/init``).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

from slmforge.checkpoint import find_checkpoint, find_tokenizer, load_for_inference
from slmforge.config import PostConfig, RunConfig, load_config
from slmforge.config.post import GSM8K_PREFIX, HH_PREFIX, PROCEDURAL, SYNTH_PREFIX, VERIFIED
from slmforge.corpus import source_configs
from slmforge.eval.gsm8k import load_problems
from slmforge.log import log
from slmforge.post.chat_data import procedural_conversations, read_conversations, synth_conversations
from slmforge.post.prefs import Pair, encode_pairs, hh_rlhf_pairs, read_pairs, split_pairs
from slmforge.post.tasks import max_len, pair_task, reference_logps, sft_task
from slmforge.post.verified import problem, verified_pairs
from slmforge.runs import RunDir
from slmforge.train.loop import RunResult, resolve_device, train

# Fine-tuning starts from trained weights: a lower peak rate, a short warm-up, cosine to 10%, frequent evaluation.
DEFAULTS = {
    "sft": ["train.max_steps=300", "train.lr_peak=1e-3", "train.warmup_steps=20"],
    "orpo": ["train.max_steps=200", "train.lr_peak=3e-4", "train.warmup_steps=10"],
    "dpo": ["train.max_steps=200", "train.lr_peak=1e-4", "train.warmup_steps=10"],
}
COMMON = ["train.schedule=cosine", "train.lr_min_ratio=0.1", "train.eval_every=50", "train.ckpt_every=50",
          "train.weight_decay=0.0", "train.anneal_stage=", "post=[]"]  # no pre-training mixture stage to anneal
POST_KEYS = {f.name for f in dataclasses.fields(PostConfig)} - {"name", "train", "method"}


def finetune_config(source: str | Path, method: str, overrides: list[str] | None = None) -> RunConfig:
    """The config of ``method`` run on ``source`` (a run folder or a Hugging Face folder). Bare keys of
    PostConfig (``data=...``, ``beta=0.2``) mean ``finetune.<key>``; the new run is <source>_<method> beside it."""
    source = Path(source)
    hf = (source / "config.json").is_file() and not (source / "config.yaml").is_file()
    if not hf and not (source / "config.yaml").is_file():
        raise ValueError(f"{source}: not a trained run folder (no config.yaml) nor a Hugging Face folder "
                         f"(config.json); give one made by `slmforge run`, `train` or `import`")
    user = [f"finetune.{o}" if o.split("=", 1)[0] in POST_KEYS else o for o in overrides or []]
    base = [f"name={source.name}_{method}", f"out_dir={source.parent}", f"finetune.method={method}",
            f"train.init_from={source}", *COMMON, *DEFAULTS[method]]
    if hf:
        from slmforge.serve.hf import import_hf_run

        cfg = load_config(None, base + user)
        imported = import_hf_run(source, RunDir.of(cfg).root / "init")
        return load_config(imported / "config.yaml", [*base, f"train.init_from={imported}", *user])
    find_checkpoint(source)  # a run folder that never saved a checkpoint is refused now
    return load_config(source / "config.yaml", base + user)


def stage_config(source: Path, stage: PostConfig, prev_name: str) -> RunConfig:
    """A recipe's ``post`` stage as a run config: it starts from ``source`` (the run before it), and its folder is
    ``stage.name`` or <prev_name>_<method> beside it."""
    keys = [f"finetune.{k}={v}" for k, v in _flat(dataclasses.asdict(stage)) if k not in ("name", "train")]
    keys += [f"train.{k}={v}" for k, v in stage.train.items()]
    return finetune_config(source, stage.method, [*keys, f"name={stage.name or f'{prev_name}_{stage.method}'}"])


def _flat(d: dict):
    # Lists as JSON (valid YAML flow): a path with ", " or ": " in it stays one item.
    for k, v in d.items():
        yield k, json.dumps(v) if isinstance(v, list) else v


def post_train(cfg: RunConfig, resume: bool = False, force: bool = False, progress: bool = True) -> RunResult:
    f = cfg.finetune
    if f.method not in ("sft", "orpo", "dpo"):
        raise ValueError(f"finetune.method={f.method!r}: post-training needs sft, orpo or dpo")
    if not cfg.train.init_from:
        raise ValueError("train.init_from is empty: post-training starts from a trained run")
    # On the training device: on-policy sampling (verified pairs) and DPO's reference pass run there too.
    model, tokenizer, src_cfg = load_for_inference(cfg.train.init_from, str(resolve_device(cfg.train.device)))
    if src_cfg.model != cfg.model:
        raise ValueError(f"model: the config differs from {cfg.train.init_from}/config.yaml; fine-tuning keeps the "
                         f"source's model (drop the model.* keys)")
    run = RunDir.of(cfg)
    tok_path = find_tokenizer(RunDir.at(cfg.train.init_from), src_cfg)
    if f.method == "sft":
        train_c, val_c = _conversations(cfg)
        task = sft_task(cfg, tokenizer, tok_path, train_c, val_c,
                        replay_shards=_replay_shards(cfg) if f.replay else None)
    else:
        train_p, val_p = _pairs(cfg, model, tokenizer, run)
        train_e, counts = encode_pairs(tokenizer, train_p, max_len(cfg), f.overlong)
        val_e, _ = encode_pairs(tokenizer, val_p, max_len(cfg), f.overlong)
        log(f"{f.method}: {counts['pairs']:,} pairs ({counts['truncated']} truncated, {counts['skipped']} skipped "
            f"over finetune.max_len={max_len(cfg)}), {len(val_e):,} held out")
        ref = None
        if f.method == "dpo":
            key = str(find_checkpoint(cfg.train.init_from)[1].resolve())
            ref = reference_logps(model, train_e + val_e, tokenizer.pad_id, cfg.train.batch_size, run, key)
        task = pair_task(cfg, tok_path, tokenizer.pad_id, train_e, val_e, ref,
                         replay_shards=_replay_shards(cfg) if f.replay else None)
    del model
    # After the data is read (a bad file is refused before anything is written), before the training writes.
    _copy_held_out(Path(cfg.train.init_from), run)
    result = train(cfg, resume=resume, force=force, progress=progress, task=task)
    if f.method != "sft":
        from slmforge.post.plots import plot_preferences

        plot_preferences(run.metrics, run.root / "preferences.png")
    return result


def _copy_held_out(source: Path, run: RunDir) -> None:
    """The source run's held-out documents (following its own init_from chain), for ``eval ... data=procedural``."""
    for split in ("validation", "test"):
        found = _find_data(source, split)
        if found is not None and not run.split_data(split).is_file():
            run.split_data(split).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(found, run.split_data(split))


def _replay_shards(cfg: RunConfig) -> Path:
    """The pre-training shards of the run this one descends from (``finetune.replay``)."""
    found = _find_data(Path(cfg.train.init_from), "train", shards=cfg.data.shards_dir)
    if found is None:
        raise ValueError(f"finetune.replay={cfg.finetune.replay}: no pre-training shards (shards/train) in "
                         f"{cfg.train.init_from} or the runs it was trained from; set finetune.replay=0")
    return found


def _find_data(source: Path, split: str, depth: int = 8, shards: str | None = None) -> Path | None:
    """``split``'s documents (or, given ``shards``, its token shards) in ``source`` or the run it was trained from,
    following ``train.init_from``."""
    for _ in range(depth):
        path = (RunDir.at(source, shards=shards).split_shards(split) if shards is not None
                else RunDir.at(source).split_data(split))
        if path.exists():
            return path
        if not (source / "config.yaml").is_file():
            return None
        parent = load_config(source / "config.yaml").train.init_from
        if not parent:
            return None
        source = Path(parent)
    return None


def _conversations(cfg: RunConfig) -> tuple[list, list]:
    f = cfg.finetune
    train_c, val_c = [], []
    for entry in f.data:
        if entry == PROCEDURAL:
            train_c += procedural_problems(cfg, f.num_examples, "train")
            val_c += procedural_problems(cfg, max(f.num_examples // 20, 20), "validation")
        else:
            convs = sft_source(entry)
            if not f.val_data:
                cut = int(len(convs) * (1 - f.val_fraction))
                train_c, val_c = train_c + convs[:cut], val_c + convs[cut:]
            else:
                train_c += convs
    for entry in f.val_data:
        val_c += read_conversations(entry)
    if not val_c:
        raise ValueError("finetune: no held-out conversations; give finetune.val_data or a val_fraction above 0")
    return train_c, val_c


def sft_source(entry: str) -> list[list[dict]]:
    """The conversations of one ``finetune.data`` entry that is not "procedural": synthesizer output, GSM8K's
    train split (question -> its worked solution, ``<<expr=result>>`` annotations kept for the calculator) or a
    ``messages`` file."""
    if entry.startswith(SYNTH_PREFIX):
        return synth_conversations(entry[len(SYNTH_PREFIX):])
    if entry.startswith(GSM8K_PREFIX):
        path = entry[len(GSM8K_PREFIX):]
        if not path.endswith(".jsonl") or path.endswith("test.jsonl"):
            raise ValueError(f"finetune.data: {entry!r}: give GSM8K's train split as JSONL (question, answer per "
                             f"line); its test split is what eval gsm8k scores")
        return [[{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}]
                for p in load_problems(path, "train")]
    return read_conversations(entry)


def procedural_problems(cfg: RunConfig, num: int, split: str) -> list[list[dict]]:
    """``procedural_conversations`` of ``finetune.families`` in ``split`` of the base run's corpus. With
    ``data.sources`` a family keeps the split of the first procedural source that holds it (the source's keys
    merged over the top-level ones, as the corpus stage builds it), so its held-out problems stay held out."""
    families = list(dict.fromkeys(cfg.finetune.families))
    if not cfg.data.sources:
        return procedural_conversations(families, num, cfg.data.seed, split, corpus=cfg.data)
    corpora = {n: d for n, d in source_configs(cfg).items() if d.source == "procedural"}
    groups: dict[str | None, list[int]] = {}  # source (None: in no source) -> indices of its families
    for i, name in enumerate(families):
        groups.setdefault(next((n for n, d in corpora.items() if name in d.families), None), []).append(i)
    out = []
    for source, members in groups.items():
        d = corpora[source] if source is not None else cfg.data
        need = sum(num // len(families) + (i < num % len(families)) for i in members)
        out += procedural_conversations([families[i] for i in members], need, d.seed, split, corpus=d)
    if len(groups) > 1:
        random.Random(f"slmforge.post.sources:{cfg.data.seed}:{split}").shuffle(out)
    return out


def _pairs(cfg: RunConfig, model, tokenizer, run: RunDir) -> tuple[list[Pair], list[Pair]]:
    f = cfg.finetune
    pairs: list[Pair] = []
    for entry in f.data:
        if entry == VERIFIED:
            pairs += _verified(cfg, model, tokenizer, run)
        elif entry.startswith(HH_PREFIX):
            found, counts = hh_rlhf_pairs(entry[len(HH_PREFIX):], limit=f.num_examples)
            log(f"{f.method}: HH-RLHF {counts}")
            pairs += found
        else:
            pairs += read_pairs(entry)
    if f.val_data:
        return pairs, [p for entry in f.val_data for p in read_pairs(entry)]
    train_p, val_p = split_pairs(pairs, f.val_fraction, cfg.data.seed)
    if not val_p:
        raise ValueError(f"finetune.val_fraction={f.val_fraction}: no pair held out of {len(pairs)}; raise it or give "
                         f"finetune.val_data")
    return train_p, val_p


def _verified(cfg: RunConfig, model, tokenizer, run: RunDir) -> list[Pair]:
    f = cfg.finetune
    out = run.root / "pairs" / "verified.jsonl"
    if out.is_file():  # a resumed run: the pairs were sampled (deterministically) before it was stopped
        log(f"{f.method}: reusing {out}")
        return read_pairs(out)
    problems = [problem(c[-2]["content"], c[-1]["content"]) for c in procedural_problems(cfg, f.num_examples, "train")]
    counts = verified_pairs(model, tokenizer, problems, f.samples_per_problem, f.sample_temperature,
                            f.max_new_tokens, cfg.train.seed, out, batch_size=f.sample_batch_size)
    log(f"{f.method}: verified pairs {counts}")
    return read_pairs(out)


def post_done(cfg: RunConfig) -> bool:
    """Every post stage of ``cfg`` has trained to its max_steps (a stage's config reads the folder of the one before
    it, so the walk stops at the first unfinished one)."""
    source, name = RunDir.of(cfg).root, cfg.name
    for stage in cfg.post:
        if not _finished(RunDir.at(source), 0):
            return False
        this = stage_config(source, stage, name)
        if not _finished(RunDir.of(this), this.train.max_steps):
            return False
        source, name = RunDir.of(this).root, this.name
    return True


def _finished(run: RunDir, steps: int) -> bool:
    return run.train_result.is_file() and json.loads(run.train_result.read_text())["steps"] >= steps


def run_post_stages(cfg: RunConfig) -> list[dict]:
    """``slmforge run``'s post stages, after its own training: ``post_chain`` from the run folder."""
    return post_chain(RunDir.of(cfg).root, cfg.post, cfg.name)


def post_chain(source: str | Path, stages: list[PostConfig], name: str = "") -> list[dict]:
    """Run ``stages`` one after the other, the first from ``source`` (a trained run or a Hugging Face folder), each
    into its own folder (trained, resumed or skipped when finished), each from the one before
    (``slmforge post RECIPE SOURCE``)."""
    if not stages:
        raise ValueError("post: the recipe has no post stages (a `post:` list of {method, data, ...})")
    results, source, name = [], Path(source), name or Path(source).name
    for stage in stages:
        this = stage_config(source, stage, name)
        if _finished(RunDir.of(this), this.train.max_steps):
            log(f"post: {this.name}: already finished")
        else:
            log(f"post: {stage.method} {this.train.max_steps} steps -> {RunDir.of(this).root}")
            post_train(this, resume=True)
        results.append({"method": stage.method, "run_dir": str(RunDir.of(this).root)})
        source, name = RunDir.of(this).root, this.name
    return results
