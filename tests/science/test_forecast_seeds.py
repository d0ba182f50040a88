"""Forecast over seeds: every seed trains every size and the target in its own folders, the summary is the mean
and spread of the per-seed errors, and the recommended law is chosen from the scales alone."""

import json
from pathlib import Path

import numpy as np
import pytest

from slmforge.plan import count_params
from slmforge.science import ForecastConfig, forecast
from slmforge.science import scaling
from slmforge.science.scaling import holdout_errors, power_law, recommend
from slmforge.science.sweep import SweepRun
from tests.science.test_mix_three import two_source_base

TRUTH = {"E": 1.5, "A": 30.0, "alpha": 0.3}
SCALES = [{"d_model": 16}, {"d_model": 24}, {"d_model": 32}, {"d_model": 40}]


def test_points_on_the_saturating_law_recommend_it_with_no_holdout_error():
    n = np.array([2e5, 4e5, 9e5, 2e6])
    losses = [power_law(n, TRUTH), power_law(n, {**TRUTH, "E": 1.6})]  # two seeds
    rec = recommend(n, losses)
    assert rec["law"] == "power_law"
    assert rec["holdout_errors"]["power_law"] == pytest.approx(0, abs=2e-3)
    assert rec["holdout_errors"]["loglog"] > 10 * rec["holdout_errors"]["power_law"]
    per_seed = [holdout_errors(n, loss) for loss in losses]
    assert rec["holdout_errors"]["loglog"] == pytest.approx(np.mean([e["loglog"] for e in per_seed]))
    assert "target's loss was not used" in rec["why"]


def test_a_straight_log_log_line_is_predicted_by_both_and_three_scales_give_no_recommendation():
    n = np.array([2e5, 4e5, 9e5, 2e6])
    rec = recommend(n, [30 * n ** -0.2])
    assert max(rec["holdout_errors"].values()) < 1e-3  # the saturating law finds E = 0
    none = recommend(n[:3], [30 * n[:3] ** -0.2])
    assert none["law"] is None and none["holdout_errors"] == {} and "4 or more scales" in none["why"]


def _fake_sweep(monkeypatch, trained: list, target_shift: float = 0.0):
    """Runs without training: the loss is TRUTH at the model's non-embedding size, plus 0.01 * seed * d_model / 16
    so that seeds differ; the target's (d_model 64) is shifted by ``target_shift`` too."""
    def run_sweep(configs, val, eval_batches):
        out = []
        for cfg in configs:
            n = count_params(cfg.model).non_embedding
            loss = power_law(n, TRUTH) + 0.01 * cfg.train.seed * cfg.model.d_model / 16
            loss += target_shift if cfg.model.d_model == 64 else 0.0
            trained.append((cfg.name, cfg.train.seed))
            out.append(SweepRun(cfg, {"train": {"tokens": 256}}, {"validation": [loss - 0.01, loss + 0.01]}, False))
        return out

    monkeypatch.setattr(scaling, "share_data", lambda base, sweep_dir: base)
    monkeypatch.setattr(scaling, "shard_dirs", lambda base: {"validation": Path("v")})
    monkeypatch.setattr(scaling, "run_sweep", run_sweep)


def _config(tmp_path, name, **kw):
    return ForecastConfig(name=name, out_dir=str(tmp_path), base=two_source_base(tmp_path), scales=SCALES,
                          target={"d_model": 64}, eval_batches=2, bootstrap=20, **kw)


def test_seeds_train_in_their_own_folders_and_the_summary_is_their_mean(tmp_path, monkeypatch):
    trained = []
    _fake_sweep(monkeypatch, trained)
    result = forecast(_config(tmp_path, "fs", seeds=3))
    sizes = ["d16_l2", "d24_l2", "d32_l2", "d40_l2", "d64_l2"]
    assert sorted(trained) == sorted((f"{d}_s{s}", s) for d in sizes for s in range(3))
    assert [s["seed"] for s in result["seeds"]] == [0, 1, 2]
    assert [s["target"]["run"] for s in result["seeds"]] == ["d64_l2_s0", "d64_l2_s1", "d64_l2_s2"]
    summary = result["over_seeds"]
    for law in ("power_law", "loglog"):
        errors = [s["target"][law]["relative_error"] for s in result["seeds"]]
        assert errors[0] != errors[1]
        assert summary[law]["relative_error_mean"] == pytest.approx(np.mean(errors))
        assert summary[law]["relative_error_std"] == pytest.approx(np.std(errors, ddof=1))
        assert summary[law]["abs_relative_error_mean"] == pytest.approx(np.mean(np.abs(errors)))
        # The single-seed keys are seed 0's, with the bootstrap band.
        assert result["target"][law]["relative_error"] == errors[0]
        assert result["target"][law]["predicted"] == result["seeds"][0]["target"][law]["predicted"]
        assert len(result["target"][law]["band_5_95"]) == 2
    assert summary["actual"]["mean"] == pytest.approx(np.mean([s["target"]["actual"] for s in result["seeds"]]))
    assert result["recommended"]["law"] == "power_law"
    saved = json.loads((tmp_path / "fs" / "forecast.json").read_text())
    assert saved["over_seeds"] == summary and saved["recommended"] == result["recommended"]


def test_the_recommendation_ignores_the_target(tmp_path, monkeypatch):
    results = []
    for shift in (0.0, 0.5):
        _fake_sweep(monkeypatch, [], target_shift=shift)
        results.append(forecast(_config(tmp_path, f"shift{shift}", seeds=2)))
    low, high = results
    assert high["target"]["actual"] == pytest.approx(low["target"]["actual"] + 0.5)
    assert high["over_seeds"]["power_law"] != low["over_seeds"]["power_law"]
    assert high["recommended"] == low["recommended"]


def test_seeds_end_to_end(tmp_path):
    cfg = ForecastConfig(name="fc2", out_dir=str(tmp_path), base=two_source_base(tmp_path),
                         scales=[{"d_model": 16}, {"d_model": 24}, {"d_model": 32}], target={"d_model": 48},
                         eval_batches=2, bootstrap=10, seeds=2)
    result = forecast(cfg)
    sweep = tmp_path / "fc2"
    for s in (0, 1):
        for d in (16, 24, 32, 48):
            saved = json.loads((sweep / f"d{d}_l2_s{s}" / "sweep.json").read_text())["config"]
            assert saved["train"]["seed"] == cfg.base.train.seed + s
            assert saved["data"] == json.loads((sweep / f"d{d}_l2_s0" / "sweep.json").read_text())["config"]["data"]
    losses = [[p["val_loss"] for p in s["points"]] for s in result["seeds"]]
    assert losses[0] != losses[1]  # another seed, another model
    errors = [s["target"]["loglog"]["relative_error"] for s in result["seeds"]]
    assert result["over_seeds"]["loglog"]["relative_error_mean"] == pytest.approx(np.mean(errors))
    assert result["recommended"]["law"] is None  # 3 scales: no leave-one-out for the 3-parameter law


def test_the_seed_mean_fit_averages_before_fitting(tmp_path, monkeypatch):
    """Noise of opposite sign at the largest scale in two seeds: each seed's forecast misses, one high and one low;
    fitted once to the seed means (the truth), the law forecasts the target's mean loss."""
    def run_sweep(configs, val, eval_batches):
        out = []
        for cfg in configs:
            loss = power_law(count_params(cfg.model).non_embedding, TRUTH)
            if cfg.model.d_model == 40:
                loss += 0.03 if cfg.train.seed == 0 else -0.03
            out.append(SweepRun(cfg, {"train": {"tokens": 256}}, {"validation": [loss, loss]}, False))
        return out

    _fake_sweep(monkeypatch, [])
    monkeypatch.setattr(scaling, "run_sweep", run_sweep)
    result = forecast(_config(tmp_path, "sm", seeds=2))
    per_seed = [s["target"]["power_law"]["relative_error"] for s in result["seeds"]]
    assert per_seed[0] > 0.005 and per_seed[1] < -0.005
    pooled = result["seed_mean"]
    assert pooled["seeds"] == 2
    assert pooled["val_loss"] == pytest.approx(np.mean([[p["val_loss"] for p in s["points"]]
                                                        for s in result["seeds"]], axis=0).tolist())
    assert pooled["target"]["actual"] == pytest.approx(result["over_seeds"]["actual"]["mean"])
    assert abs(pooled["target"]["power_law"]["relative_error"]) < 2e-3
    assert abs(pooled["target"]["loglog"]["relative_error"]) > 0.01  # the line cannot bend with the law
    one = forecast(_config(tmp_path, "one", seeds=1))
    assert "seed_mean" not in one
