"""The anneal stage: the mixture switches exactly at the stage boundary, the WSD decay starts there, the loop
evaluates there, and a multi-source recipe runs end to end through ``pipeline.run``."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from slmforge.config import merge
from slmforge.train.schedule import anneal_aligned, lr_at

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_run_config  # noqa: E402

STEPS, BOUNDARY = 12, 8  # 8 stable steps, then 4 anneal steps
TOKENS_PER_STEP = 4 * 32  # train.batch_size x data.seq_len of tiny_run_config


def anneal_config(out_dir, name="anneal", **train):
    cfg = tiny_run_config(out_dir, name=name, max_steps=STEPS, anneal_stage="anneal", eval_every=100, **train)
    return merge(cfg, {"sample_prompts": [], "data": {
        "num_train_docs": 200, "num_val_docs": 20, "num_test_docs": 20,
        "sources": {"math": {"families": ["arithmetic"]}, "story": {"families": ["narrative"]}},
        "mixture": {"stages": [
            {"name": "stable", "tokens": BOUNDARY * TOKENS_PER_STEP,
             "weights": [{"source": "math", "weight": 0.25}, {"source": "story", "weight": 0.75}]},
            {"name": "anneal", "tokens": (STEPS - BOUNDARY) * TOKENS_PER_STEP,
             "weights": [{"source": "math", "weight": 1.0}]}]}}})


def test_decay_starts_at_the_anneal_stage(tmp_path):
    cfg = anneal_config(tmp_path)
    t = anneal_aligned(cfg)
    lrs = [lr_at(step, t) for step in range(STEPS)]
    peak = cfg.train.lr_peak
    assert lrs[BOUNDARY - 1] == peak and lrs[BOUNDARY] < peak  # the decay's first step is the stage's first
    assert lrs[-1] == pytest.approx(peak * cfg.train.lr_min_ratio)
    # A budget that is not a whole number of steps: the decay starts at the first step made only of anneal rows.
    odd = dataclasses.replace(cfg.data.mixture.stages[0], tokens=BOUNDARY * TOKENS_PER_STEP - 5)
    cfg_odd = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, mixture=dataclasses.replace(cfg.data.mixture, stages=[odd, cfg.data.mixture.stages[1]])))
    assert lr_at(BOUNDARY - 1, anneal_aligned(cfg_odd)) == peak > lr_at(BOUNDARY, anneal_aligned(cfg_odd))


def test_anneal_stage_errors_name_the_key(tmp_path):
    cfg = anneal_config(tmp_path)
    with pytest.raises(ValueError, match="no such data.mixture stage"):
        anneal_aligned(merge(cfg, {"train": {"anneal_stage": "cooldown"}}))
    with pytest.raises(ValueError, match="schedule=wsd"):
        anneal_aligned(merge(cfg, {"train": {"schedule": "cosine"}}))


def test_pipeline_runs_a_mixture_with_an_anneal_stage(tmp_path):
    from slmforge.pipeline import run
    from slmforge.runs import MetricsLog

    cfg = anneal_config(tmp_path)
    report = run(cfg)
    data = tmp_path / "anneal" / "data"
    for name in ("math", "story"):  # each source built on its own, with one shared tokenizer
        assert (data / name / "train.jsonl").exists()
        meta = json.loads((tmp_path / "anneal" / "shards" / name / "train" / "meta.json").read_text())
        assert meta["num_tokens"] > 0
    records = MetricsLog(tmp_path / "anneal" / "metrics.jsonl").read()
    assert [r["stage"] for r in records] == ["stable"] * BOUNDARY + ["anneal"] * (STEPS - BOUNDARY)
    # The mix switches exactly at the boundary: the stable stage's rows stop at its budget, and the anneal
    # stage draws math only.
    realised = records[-1]["mixture_tokens"]
    assert sum(realised["stable"].values()) == BOUNDARY * TOKENS_PER_STEP
    assert realised["anneal"] == {"math": (STEPS - BOUNDARY) * TOKENS_PER_STEP, "story": 0}
    assert realised["stable"]["story"] == 3 * realised["stable"]["math"]
    # The LR decays from the boundary on, and the loop evaluated the last stable step.
    lrs = [r["lr"] for r in records]
    assert lrs[BOUNDARY - 1] == cfg.train.lr_peak > lrs[BOUNDARY] > lrs[-1]
    assert "val_loss" in records[BOUNDARY - 1] and "val_loss" not in records[BOUNDARY - 2]
    stable, anneal = report["stages"]
    assert (stable["first_step"], stable["last_step"], anneal["first_step"]) == (1, BOUNDARY, BOUNDARY + 1)
    assert anneal["val_loss_start"] == stable["val_loss_end"] == records[BOUNDARY - 1]["val_loss"]
    assert anneal["val_loss_end"] == records[-1]["val_loss"]
    assert "| anneal |" in (tmp_path / "anneal" / "report.md").read_text()


def test_anneal_ablation_compares_with_the_constant_mix(tmp_path):
    from slmforge.eval.gsm8k import GSM8KConfig
    from slmforge.science import anneal_ablation

    out = anneal_ablation(anneal_config(tmp_path, name="abl"), GSM8KConfig(num_fewshot=0, limit=3, max_new_tokens=8),
                          eval_batches=2)
    assert set(out["anneal"]["val_loss"]) == {"validation", "math/validation", "story/validation"}
    assert out["anneal"]["arithmetic_problems"] == 3
    control = json.loads((tmp_path / "abl" / "constant" / "sweep.json").read_text())["config"]
    stable, anneal = control["data"]["mixture"]["stages"]
    assert anneal["weights"] == stable["weights"] and anneal["tokens"] == (STEPS - BOUNDARY) * TOKENS_PER_STEP
    diff = out["difference_anneal_minus_constant"]["val_loss"]["math/validation"]
    math = {run: out[run]["val_loss"]["math/validation"] for run in ("anneal", "constant")}
    assert diff == pytest.approx(math["anneal"] - math["constant"])
    assert (tmp_path / "abl" / "anneal.json").exists()


def fraction_config(out_dir, name="fractions", **train):
    """anneal_config with its budgets as shares of the run: 8/12 stable, 4/12 anneal."""
    cfg = anneal_config(out_dir, name=name, **train)
    stages = [dataclasses.replace(s, tokens=0, fraction=f) for s, f in zip(cfg.data.mixture.stages, (2 / 3, 1 / 3))]
    return dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, mixture=dataclasses.replace(cfg.data.mixture, stages=stages)))


def test_fraction_budgets_follow_the_run_length(tmp_path):
    from slmforge.train.schedule import stage_budgets

    cfg = fraction_config(tmp_path)
    assert [s.tokens for s in stage_budgets(cfg).data.mixture.stages] == [BOUNDARY * TOKENS_PER_STEP,
                                                                          (STEPS - BOUNDARY) * TOKENS_PER_STEP]
    assert lr_at(BOUNDARY - 1, anneal_aligned(stage_budgets(cfg))) == cfg.train.lr_peak > lr_at(
        BOUNDARY, anneal_aligned(stage_budgets(cfg)))
    # Three times the steps: the decay still starts two thirds of the way, where token budgets would be refused.
    long = merge(cfg, {"train": {"max_steps": 3 * STEPS}})
    assert [s.tokens for s in stage_budgets(long).data.mixture.stages] == [3 * BOUNDARY * TOKENS_PER_STEP,
                                                                           3 * (STEPS - BOUNDARY) * TOKENS_PER_STEP]
    assert round(anneal_aligned(stage_budgets(long)).decay_fraction * 3 * STEPS) == 3 * (STEPS - BOUNDARY)
    short = merge(anneal_config(tmp_path), {"train": {"max_steps": BOUNDARY - 2}})
    with pytest.raises(ValueError, match="outside the stable phase"):
        anneal_aligned(stage_budgets(short))
    # Token budgets pass through unchanged (the same object: nothing to resolve).
    tokens_cfg = anneal_config(tmp_path)
    assert stage_budgets(tokens_cfg) is tokens_cfg


@pytest.mark.parametrize("stage, message", [
    ({"tokens": 100, "fraction": 0.5}, "tokens or fraction, not both"),
    ({"fraction": 1.5}, r"fraction=1.5: expected a share of the run in \(0, 1\]"),
    ({"fraction": -0.2}, "fraction=-0.2"),
    ({}, "expected a positive token budget"),
])
def test_bad_fraction_stages_name_the_key(tmp_path, stage, message):
    from slmforge.config.run import MixtureConfig

    mix = MixtureConfig(sources=[{"name": "a", "shards": "x"}],
                        stages=[{"name": "only", "weights": [{"source": "a", "weight": 1}], **stage}])
    with pytest.raises(ValueError, match=r"stages\[0\] \('only'\)"):
        mix.budgeted(1000).validate()
    with pytest.raises(ValueError, match=message):
        mix.budgeted(1000).validate()


def test_fraction_stages_train_exactly_as_their_token_budgets(tmp_path):
    """The same run with fractions and with the token budgets they resolve to: identical losses and stages; the
    run folder's config keeps the fractions (a rerun of the recipe is not a changed config)."""
    from slmforge.pipeline import run
    from slmforge.runs import MetricsLog

    run(fraction_config(tmp_path))
    run(anneal_config(tmp_path, name="tokens"))
    a, b = (MetricsLog(tmp_path / n / "metrics.jsonl").read() for n in ("fractions", "tokens"))
    assert [(r["loss"], r["stage"], r["lr"]) for r in a] == [(r["loss"], r["stage"], r["lr"]) for r in b]
    assert "fraction: 0.6666" in (tmp_path / "fractions" / "config.yaml").read_text()
    assert run(fraction_config(tmp_path))["train"]["steps"] == STEPS  # the rerun reuses every stage
