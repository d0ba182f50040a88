"""Tiny sweeps end to end: forecast and mix write JSON + PNG, a rerun skips finished runs, a changed config
in a finished folder is refused, and the YAML recipes load."""

import json
import sys
from pathlib import Path

import pytest

from slmforge.config import load, merge
from slmforge.science import ForecastConfig, MixConfig, forecast, mix

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import assert_png_drawn, saved_figure, tiny_run_config  # noqa: E402

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def two_source_base(out_dir):
    cfg = tiny_run_config(out_dir)
    return merge(cfg, {"sample_prompts": [], "data": {
        "num_train_docs": 200, "num_val_docs": 20, "num_test_docs": 20,
        "sources": {"math": {"families": ["arithmetic"]}, "story": {"families": ["narrative"]}}}})


def forecast_config(tmp_path, **kw):
    return ForecastConfig(name="fc", out_dir=str(tmp_path), base=two_source_base(tmp_path),
                          scales=[{"d_model": 16}, {"d_model": 24}, {"d_model": 32}], target={"d_model": 48},
                          eval_batches=4, bootstrap=30, **kw)


def _lines_starting(axes: dict, prefix: str) -> list:
    return [xy for label, xy in axes["lines"].items() if label.startswith(prefix)]


def test_forecast_sweep_writes_report_and_skips_finished_runs(tmp_path, monkeypatch, saved_figures):
    result = forecast(forecast_config(tmp_path))
    sweep = tmp_path / "fc"
    saved = json.loads((sweep / "forecast.json").read_text())
    # The plot shows the runs, both fits with their bands, and the target's actual loss from forecast.json.
    assert_png_drawn(sweep / "forecast.png")
    (ax,) = saved_figure(saved_figures, "forecast.png")["axes"]
    assert ax["lines"]["fitted runs"] == ([p["num_params"] for p in saved["points"]],
                                          [p["val_loss"] for p in saved["points"]])
    (actual,) = _lines_starting(ax, "actual (")
    assert actual == ([saved["target"]["num_params"]], [saved["target"]["actual"]])
    for prefix in ("E + A N^-a", "B N^-b"):
        ((xs, ys),) = _lines_starting(ax, prefix)
        assert min(xs) <= saved["points"][0]["num_params"] and max(xs) >= saved["target"]["num_params"]
        assert all(b < a for a, b in zip(ys, ys[1:]))  # loss falls with size
    assert ax["collections"] >= 2 and ax["xlabel"].startswith("parameters N")
    assert [p["num_params"] for p in saved["points"]] == sorted(p["num_params"] for p in saved["points"])
    t = saved["target"]
    assert t["power_law"]["relative_error"] == pytest.approx((t["power_law"]["predicted"] - t["actual"]) / t["actual"])
    lo, hi = t["power_law"]["band_5_95"]
    assert lo <= hi
    assert {p["tokens"] for p in saved["points"]} == {8 * 4 * 32}  # equal tokens for every size
    assert result["target"]["actual"] == t["actual"]

    import slmforge.pipeline

    def fail(cfg):
        raise AssertionError(f"{cfg.name} was trained again")

    monkeypatch.setattr(slmforge.pipeline, "run", fail)
    again = forecast(forecast_config(tmp_path))
    assert again["target"] == result["target"]
    with pytest.raises(ValueError, match="different config"):
        changed = forecast_config(tmp_path)
        forecast(merge(changed, {"base": {"train": {"lr_peak": 1e-3}}}))


def test_mix_sweep_fits_predicts_and_validates(tmp_path, saved_figures):
    cfg = MixConfig(name="mx", out_dir=str(tmp_path), base=two_source_base(tmp_path),
                    ratios=[[0.8, 0.2], [0.6, 0.4], [0.5, 0.5], [0.4, 0.6], [0.2, 0.8]], shared_exponent=True,
                    eval_batches=3, seeds=2)
    result = mix(cfg)
    sweep = tmp_path / "mx"
    saved = json.loads((sweep / "mix.json").read_text())
    # Left: the law over the share of math, the runs and the optimum; right: predicted vs measured.
    assert_png_drawn(sweep / "mix.png")
    law_ax, fit_ax = saved_figure(saved_figures, "mix.png")["axes"]
    opt = saved["predicted_optimum"]
    assert law_ax["lines"]["proxy runs"] == ([p["mixture"]["math"] for p in saved["points"]],
                                             [p["target_loss"] for p in saved["points"]])
    assert law_ax["lines"]["predicted optimum"] == ([opt["mixture"]["math"]], [opt["predicted_loss"]])
    xs, ys = law_ax["lines"]["fitted law"]
    assert (xs[0], xs[-1], len(xs)) == (0.0, 1.0, 201)
    # The optimum is searched where the sweep measured (saved["search"]); the curve is drawn over the whole range.
    lo, hi = saved["search"]["min"]["math"], saved["search"]["max"]["math"]
    inside = [y for x, y in zip(xs, ys) if lo - 1e-9 <= x <= hi + 1e-9]
    assert min(inside) == pytest.approx(opt["predicted_loss"], abs=1e-3) and min(ys) <= opt["predicted_loss"]
    assert fit_ax["lines"]["fit (in sample)"] == ([p["target_loss"] for p in saved["points"]],
                                                  [p["predicted"] for p in saved["points"]])
    assert len(saved["points"]) == 5 and saved["sources"] == ["math", "story"]
    # 5 mixtures leave one degree of freedom to the 4-parameter law (shared exponent, 2 sources): it is fitted.
    assert (saved["design"], saved["measured_mixtures"], saved["law_parameters"]) == ("fitted_law", 5, 4)
    opt = saved["predicted_optimum"]
    assert sum(opt["mixture"].values()) == pytest.approx(1.0)
    assert opt["measured"]["runs"][0].startswith("optimum_") and opt["measured"]["runs"][1].endswith("_s1")
    fresh = saved["fresh_seeds"]  # optimum and best grid point again, on seeds 2 and 3 that no other run used
    assert fresh["seeds"] == [2, 3]
    # One fresh run per distinct mixture: the optimum may land on the best grid point itself.
    distinct = 1 if opt["mixture"] == saved["best_grid"]["mixture"] else 2
    assert sum(d.name.startswith("fresh_") and d.name.endswith("_s3") for d in sweep.iterdir()) == distinct
    assert fresh["gain_vs_best_grid"] == pytest.approx(fresh["best_grid"] - fresh["predicted_optimum"])
    for p in saved["points"]:  # the target: the sources' mean validation loss, averaged over the seeds
        assert p["target_loss"] == pytest.approx(sum(p["per_source"].values()) / 2)
        assert p["target_loss"] == pytest.approx(sum(p["target_loss_per_seed"]) / 2)
        assert p["target_loss_per_seed"][0] != p["target_loss_per_seed"][1]
    seed1 = json.loads((sweep / p["runs"][1] / "sweep.json").read_text())["config"]
    assert seed1["train"]["seed"] == 1 and seed1["data"]["mixture"]["seed"] == 1
    assert set(saved["fit"]["per_source"]) == {"math", "story"} and result["fit"] == saved["fit"]
    with pytest.raises(ValueError, match="ratios\\[1\\]"):
        mix(MixConfig(name="bad", out_dir=str(tmp_path), base=cfg.base, ratios=[[1, 1], [1], [1, 2]]))


@pytest.mark.parametrize("name,cls", [("mix_cpu.yaml", MixConfig), ("forecast_cpu.yaml", ForecastConfig)])
def test_science_recipes_load(name, cls):
    cfg = load(cls, RECIPES / name, ["base.train.max_steps=7"])
    assert cfg.base.train.max_steps == 7
    with pytest.raises(ValueError, match="unknown key"):
        load(cls, RECIPES / name, ["base.train.max_stepz=7"])


def test_anneal_recipe_aligns_its_decay():
    from slmforge.config import load_config as load_run_config
    from slmforge.train.schedule import anneal_aligned

    cfg = load_run_config(RECIPES / "anneal_cpu.yaml")
    stable = cfg.data.mixture.stages[0].tokens // (cfg.train.batch_size * cfg.data.seq_len)
    assert round(anneal_aligned(cfg).decay_fraction * cfg.train.max_steps) == cfg.train.max_steps - stable


def test_forecast_command_runs_a_recipe(tmp_path, capsys):
    from slmforge.cli import main
    from slmforge.config import dump_yaml

    recipe = tmp_path / "fc.yaml"
    recipe.write_text(dump_yaml(forecast_config(tmp_path, train_target=False)))
    assert main(["forecast", "--config", str(recipe), "bootstrap=10"]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{\n"):])  # after the runs' progress lines
    assert printed["plot"].endswith("forecast.png") and printed["target"]["power_law"]["predicted"] > 0
    assert main(["mix", "--config", str(recipe)]) == 2  # a forecast recipe is not a mix recipe: a clear error
