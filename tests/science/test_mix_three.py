"""Three proxies, choose the best: a sweep with too few mixtures for the law picks the best measured one, and
says so; with enough mixtures the law is fitted as before."""

import json
from pathlib import Path

import pytest

from slmforge.config import merge
from slmforge.science import MixConfig, mix
from slmforge.science import mixture_law
from slmforge.science.mixture_law import design
from slmforge.science.sweep import SweepRun
from tests.conftest import assert_png_drawn, saved_figure, tiny_run_config


def two_source_base(out_dir):
    return merge(tiny_run_config(out_dir), {"sample_prompts": [], "data": {
        "num_train_docs": 200, "num_val_docs": 20, "num_test_docs": 20,
        "sources": {"math": {"families": ["arithmetic"]}, "story": {"families": ["narrative"]}}}})


@pytest.mark.parametrize("runs,k,shared,params,chosen", [
    (3, 2, True, 4, "best_of_measured"),
    (4, 2, True, 4, "best_of_measured"),  # an exact fit: no degree of freedom left
    (5, 2, True, 4, "fitted_law"),
    (5, 2, False, 5, "best_of_measured"),
    (6, 2, False, 5, "fitted_law"),
    (3, 3, True, 5, "best_of_measured"),
    (8, 3, True, 5, "fitted_law"),
    (7, 3, False, 7, "best_of_measured"),
])
def test_design_fits_the_law_only_with_a_degree_of_freedom_left(runs, k, shared, params, chosen):
    d = design(runs, k, shared)
    assert (d["design"], d["measured_mixtures"], d["law_parameters"]) == (chosen, runs, params)
    assert d["design_note"].startswith(f"{runs} measured mixtures")


def test_design_note_says_why():
    assert design(3, 2, True)["design_note"] == ("3 measured mixtures cannot fit the 4-parameter law with a degree "
                                                 "of freedom left (it needs 5); chose the best measured mixture")


def _fake_sweep(monkeypatch, trained: list[str]):
    """Runs without training: each source's loss falls with its own share, so the mean is lowest at 50-50;
    seed s adds 0.01 * s. ``trained`` collects the run names."""
    def run_sweep(configs, eval_shards, eval_batches):
        out = []
        for cfg in configs:
            share = {w.source: w.weight for w in cfg.data.mixture.stages[0].weights}
            noise = 0.01 * cfg.train.seed
            losses = {n: [1.0 + 0.5 / (0.2 + share.get(n, 0.0)) + noise] for n in eval_shards}
            trained.append(cfg.name)
            out.append(SweepRun(cfg, {}, losses, skipped=False))
        return out

    monkeypatch.setattr(mixture_law, "share_data", lambda base, sweep_dir: base)
    monkeypatch.setattr(mixture_law, "shard_dirs", lambda base: {"math/validation": Path("m"),
                                                                 "story/validation": Path("s")})
    monkeypatch.setattr(mixture_law, "run_sweep", run_sweep)


def test_three_mixtures_choose_the_lowest_loss_and_train_nothing_more(tmp_path, monkeypatch):
    trained = []
    _fake_sweep(monkeypatch, trained)
    cfg = MixConfig(name="three", out_dir=str(tmp_path), base=two_source_base(tmp_path),
                    ratios=[[0.8, 0.2], [0.5, 0.5], [0.2, 0.8]], seeds=2, validate=True)
    result = mix(cfg)
    assert result["design"] == "best_of_measured" and result["fit"] is None
    assert result["predicted_optimum"]["mixture"] == {"math": 0.5, "story": 0.5}
    # Target: the mean over sources of 1 + 0.5 / 0.7, and over seeds 0 and 1 of the 0.01 * seed shift.
    assert result["predicted_optimum"]["measured_loss"] == pytest.approx(1 + 0.5 / 0.7 + 0.005)
    assert result["best_grid"]["mixture"] == result["predicted_optimum"]["mixture"]
    # validate=true trains no predicted optimum and no fresh seeds in this design, and says so.
    assert sorted(trained) == sorted(f"mix_{m}_s{s}".replace("_s0", "") for m in ("80-20", "50-50", "20-80")
                                     for s in (0, 1))
    assert result["validation"].startswith("skipped")
    assert "fresh_seeds" not in result


def test_enough_mixtures_still_fit_the_law(tmp_path, monkeypatch):
    trained = []
    _fake_sweep(monkeypatch, trained)
    cfg = MixConfig(name="five", out_dir=str(tmp_path), base=two_source_base(tmp_path), shared_exponent=True,
                    ratios=[[0.8, 0.2], [0.6, 0.4], [0.5, 0.5], [0.4, 0.6], [0.2, 0.8]], validate=False)
    result = mix(cfg)
    assert (result["design"], result["measured_mixtures"], result["law_parameters"]) == ("fitted_law", 5, 4)
    assert set(result["fit"]["per_source"]) == {"math", "story"}
    opt = result["predicted_optimum"]
    assert opt["mixture"]["math"] == pytest.approx(0.5, abs=0.02)  # the symmetric losses' minimum
    assert opt["predicted_loss"] == pytest.approx(1 + 0.5 / 0.7, abs=0.01)
    assert len(trained) == 5 and "validation" not in result


def test_three_proxies_end_to_end(tmp_path, saved_figures):
    cfg = MixConfig(name="mx3", out_dir=str(tmp_path), base=two_source_base(tmp_path),
                    ratios=[[0.8, 0.2], [0.5, 0.5], [0.2, 0.8]], eval_batches=3)
    result = mix(cfg)
    sweep = tmp_path / "mx3"
    saved = json.loads((sweep / "mix.json").read_text())
    assert {k: v for k, v in result.items() if k != "plot"} == saved
    assert (saved["design"], saved["measured_mixtures"], saved["law_parameters"]) == ("best_of_measured", 3, 5)
    losses = [p["target_loss"] for p in saved["points"]]
    best = losses.index(min(losses))
    assert saved["predicted_optimum"]["mixture"] == saved["points"][best]["mixture"]
    assert saved["predicted_optimum"]["measured_loss"] == min(losses)
    for p in saved["points"]:  # real validation losses of trained runs, the mean over both sources
        assert p["target_loss"] == pytest.approx(sum(p["per_source"].values()) / 2) and p["target_loss"] > 0
    runs = sorted(d.name for d in sweep.iterdir() if d.is_dir() and d.name != "shared")
    assert runs == ["mix_20-80", "mix_50-50", "mix_80-20"]  # the 3 proxies and nothing else
    assert_png_drawn(sweep / "mix.png")
    (ax,) = saved_figure(saved_figures, "mix.png")["axes"]
    assert ax["lines"]["measured mixtures (mean over seeds)"] == ([0.0, 1.0, 2.0], losses)
    assert ax["lines"]["chosen: lowest target loss"] == ([float(best)], [min(losses)])
