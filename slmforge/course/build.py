"""``run_main(cfg)``: the main build, every stage of the course in one run folder, resumable stage by stage.

Stages, in order (``STAGES``): plan (the schedule this recipe costs on GPUs), synth (the synthesizer's job, its
kept records one of the data sources), data (corpus, curation, one tokenizer and the shards of every source,
built once in <build>/shared and read by every later run), mix (the proxies, one per mixture, and the mixture
chosen), scaling (the size ladder and the target, all on the same fixed token subset with the chosen mixture, and
the forecast of the target from the ladder), target (the target pre-trained with WSD on the chosen mixture, its
last ``anneal_fraction`` on the anneal mix while the learning rate decays, beside the same run without the anneal
mix for the anneal gain), post (SFT, ORPO, ... from the annealed target), evals (held-out procedural math for
every model, needles, bits per byte) and report.

Each stage writes <build>/stages/<name>.json when it finishes; a rerun reads those and goes on with the first
stage that has none, and every stage below reuses its own finished runs (sweeps skip finished runs, training
resumes from its last checkpoint). A recipe changed after stages finished is refused (``--force`` starts over).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from slmforge.config import CurateConfig, RunConfig, dump_yaml, merge
from slmforge.corpus import curation_summary, shard_dirs
from slmforge.course.config import MainConfig
from slmforge.log import log
from slmforge.metrics import tokens_per_step
from slmforge.runs import RunDir, write_json, write_text
from slmforge.science.sweep import SHARED, share_data


def build_dir(cfg: MainConfig) -> Path:
    return Path(cfg.out_dir) / cfg.name


# ---------------------------------------------------------------- the data every run shares


def with_synth(cfg: MainConfig, results: dict) -> RunConfig:
    """``cfg.base`` with the synthesizer's kept records as the ``synth_source`` entry (JSONL files, text field)."""
    base = cfg.base
    if not cfg.synth:
        return base
    paths = results["synth"]["paths"]
    entry = {**base.data.sources.get(cfg.synth_source, {}), "source": "files", "paths": paths, "text_field": "text"}
    return merge(base, {"data": {"sources": {**base.data.sources, cfg.synth_source: entry}}}, "synth")


def shared_base(cfg: MainConfig, results: dict) -> RunConfig:
    """The base every run after the data stage starts from: <build>/shared's tokenizer and shards, curation off
    (the shards hold the curated documents already)."""
    base = with_synth(cfg, results)
    data = dataclasses.replace(base.data, tokenizer=results["data"]["tokenizer"],
                               shards_dir=results["data"]["shards_dir"])
    return dataclasses.replace(base, data=data, curate=CurateConfig())


def single_stage(base: RunConfig, weights: dict[str, float], tokens: int, name: str = "stable") -> RunConfig:
    """``base`` training on one fixed mixture (``weights`` by source) for ``tokens`` and after."""
    stage = {"name": name, "tokens": tokens, "weights": [{"source": s, "weight": w} for s, w in weights.items()]}
    return merge(base, {"data": {"mixture": {"stages": [stage]}}}, "main")


def problems_path(cfg: MainConfig, results: dict) -> Path:
    """The held-out procedural problems: the test split of ``evals.gsm8k_source`` in <build>/shared."""
    path = RunDir.at(build_dir(cfg) / SHARED).split_data(f"{cfg.evals.gsm8k_source}/test")
    if not path.exists():
        raise ValueError(f"evals.gsm8k_source={cfg.evals.gsm8k_source!r}: no test split at {path}; name the "
                         f"base.data.sources entry that holds arithmetic")
    return path


# ---------------------------------------------------------------- stages


def stage_plan(cfg: MainConfig, results: dict) -> dict:
    from slmforge.course.schedule import main_schedule

    return main_schedule(cfg)


def stage_synth(cfg: MainConfig, results: dict) -> dict:
    from slmforge.synth.jobs import SynthJob, synthesize

    job = merge(SynthJob(name=f"{cfg.name}-synth", out_dir=str(build_dir(cfg) / "synth")), cfg.synth, "synth")
    summary = synthesize(job)
    folder = Path(summary.get("clean", {}).get("clean_dir") or Path(summary["out_dir"]) / "shards")
    paths = sorted(str(p) for p in folder.rglob("*.jsonl"))
    if not paths:
        raise ValueError(f"synth: the job kept no records in {folder}")
    keep = ("planned", "written", "rejected", "total_written", "total_rejected", "seconds", "clean", "model")
    return {**{k: summary[k] for k in keep if k in summary}, "paths": paths, "folder": str(folder)}


def stage_data(cfg: MainConfig, results: dict) -> dict:
    base = with_synth(cfg, results)
    shared = share_data(base, build_dir(cfg))  # builds <build>/shared: corpus, curation, tokenizer, shards
    built = dataclasses.replace(base, name=SHARED, out_dir=str(build_dir(cfg)))
    tokens = {}
    for key, folder in shard_dirs(built).items():
        meta = json.loads((folder / "meta.json").read_text())
        tokens[key] = {"tokens": meta["num_tokens"], "documents": meta["num_docs"], "bytes": meta["num_bytes"]}
    return {"tokenizer": shared.data.tokenizer, "shards_dir": shared.data.shards_dir, "shards": tokens,
            "curation": curation_summary(built) if any(dataclasses.astuple(base.curate)[:3]) else {}}


def stage_mix(cfg: MainConfig, results: dict) -> dict:
    from slmforge.science.mixture_law import MixConfig, mix

    p = cfg.proxy
    base = merge(shared_base(cfg, results), {"model": p.model, "train": {"max_steps": p.steps}}, "proxy")
    out = mix(MixConfig(name="mix", out_dir=str(build_dir(cfg)), base=base, ratios=p.mixtures, target=p.target,
                        seeds=p.seeds, validate=False))
    chosen = out["predicted_optimum"]["mixture"]
    return {"chosen": chosen, "design": out["design"], "note": out.get("design_note", ""),
            "points": [{"mixture": q["mixture"], "target_loss": q["target_loss"]} for q in out["points"]],
            "tokens_per_run": out["tokens_per_run"], "plot": out.get("plot")}


def scaling_train(cfg: MainConfig) -> dict:
    """The train keys of every scaling run and the target's forecast run over ``base.train``."""
    s = cfg.scaling
    return {"max_steps": s.steps, **({"batch_size": s.batch_size} if s.batch_size else {})}


def stage_scaling(cfg: MainConfig, results: dict) -> dict:
    from slmforge.science.scaling import ForecastConfig, forecast

    s = cfg.scaling
    base = merge(shared_base(cfg, results), {"train": scaling_train(cfg)}, "scaling")
    base = single_stage(base, results["mix"]["chosen"], s.steps * tokens_per_step(base))
    out = forecast(ForecastConfig(name="scaling", out_dir=str(build_dir(cfg)), base=base, scales=s.scales,
                                  target=cfg.target.model, train_target=True, params=s.params, seeds=s.seeds))
    keep = ("points", "fit", "target", "seeds", "over_seeds", "seed_mean", "recommended", "plot")
    return {k: out[k] for k in keep if k in out}


def target_config(cfg: MainConfig, results: dict) -> RunConfig:
    """The target's pre-training run: the chosen mixture, then the anneal mix over the last ``anneal_fraction``."""
    t = cfg.target
    base = merge(shared_base(cfg, results), {"name": "target", "out_dir": str(build_dir(cfg)), "model": t.model,
                                             "train": {"max_steps": t.steps}}, "target")
    total = t.steps * tokens_per_step(base)
    anneal_steps = max(1, round(t.steps * t.anneal_fraction))
    stable = (t.steps - anneal_steps) * tokens_per_step(base)
    chosen = results["mix"]["chosen"]
    if not t.anneal_weights:
        return single_stage(base, chosen, total)
    weights = {name: t.anneal_weights.get(name, 0.0) for name in chosen}
    stages = [{"name": "stable", "tokens": stable, "weights": [{"source": k, "weight": v} for k, v in chosen.items()]},
              {"name": "anneal", "tokens": total - stable,
               "weights": [{"source": k, "weight": v} for k, v in weights.items()]}]
    return merge(base, {"data": {"mixture": {"stages": stages}},
                        "train": {"schedule": "wsd", "anneal_stage": "anneal",
                                  "decay_fraction": anneal_steps / t.steps}}, "target")


def stage_target(cfg: MainConfig, results: dict) -> dict:
    from slmforge.eval.gsm8k import GSM8KConfig
    from slmforge.science.anneal import anneal_ablation
    from slmforge.science.sweep import run_sweep

    run = target_config(cfg, results)
    if cfg.target.anneal_weights and cfg.target.ablation:
        gsm = GSM8KConfig(num_fewshot=0, limit=cfg.evals.gsm8k_limit, max_new_tokens=cfg.evals.max_new_tokens)
        out = anneal_ablation(run, gsm, problems=problems_path(cfg, results))
        root = RunDir.at(build_dir(cfg) / "target" / "anneal").root
        return {"run_dir": str(root), "ablation": out, "report": _report(root)}
    target = dataclasses.replace(run, out_dir=str(build_dir(cfg) / "target"), name="anneal")
    val = {"validation": shard_dirs(target)["validation"]}
    (r,) = run_sweep([target], val)
    return {"run_dir": str(RunDir.of(r.cfg).root), "ablation": None, "report": r.report}


def _report(root: Path) -> dict:
    return json.loads(RunDir.at(root).report_json.read_text())


def stage_post(cfg: MainConfig, results: dict) -> dict:
    from slmforge.post.run import post_chain

    if not cfg.post:
        return {"runs": []}
    return {"runs": post_chain(results["target"]["run_dir"], cfg.post, "target")}


def stage_evals(cfg: MainConfig, results: dict) -> dict:
    from slmforge.course.evals import evaluate_all

    return evaluate_all(cfg, results, problems_path(cfg, results))


def stage_report(cfg: MainConfig, results: dict) -> dict:
    from slmforge.course.report import write_report

    return write_report(cfg, build_dir(cfg), results)


Stage = tuple[str, Callable[[MainConfig, dict], dict]]
STAGES: list[Stage] = [("plan", stage_plan), ("synth", stage_synth), ("data", stage_data), ("mix", stage_mix),
                       ("scaling", stage_scaling), ("target", stage_target), ("post", stage_post),
                       ("evals", stage_evals), ("report", stage_report)]


# ---------------------------------------------------------------- the walk


def check_recipe(cfg: MainConfig, root: Path, force: bool) -> None:
    """A build folder made by another recipe is refused (``force``: deleted first)."""
    saved = root / "config.yaml"
    if not saved.exists():
        return
    if saved.read_text() == dump_yaml(cfg):
        return
    if force:
        log(f"main: --force: deleting {root} (its recipe changed)")
        shutil.rmtree(root)
        return
    raise ValueError(f"{saved}: this build folder was made by a different recipe; rerun with --force to start "
                     f"over, or give another name=")


def run_main(cfg: MainConfig, force: bool = False) -> dict:
    """Walk ``STAGES`` in <out_dir>/<name>; returns every stage's result (the report's numbers included)."""
    root = build_dir(cfg)
    check_recipe(cfg, root, force)
    root.mkdir(parents=True, exist_ok=True)
    write_text(root / "config.yaml", dump_yaml(cfg))
    results: dict[str, Any] = {}
    for i, (name, fn) in enumerate(STAGES):
        marker = root / "stages" / f"{name}.json"
        if marker.exists() and name != "report":
            log(f"main: [{i + 1}/{len(STAGES)}] {name}: finished earlier, reusing")
            results[name] = json.loads(marker.read_text())
            continue
        if name == "synth" and not cfg.synth:
            results[name] = {"skipped": "no synth section"}
            continue
        log(f"main: [{i + 1}/{len(STAGES)}] {name}")
        t0 = time.perf_counter()
        out = fn(cfg, results)
        out["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(marker, out)
        results[name] = out
    return results
