"""Fits on synthetic data recover the parameters they were made with."""

import numpy as np
import pytest

from slmforge.science.mixture_law import fit_law, fit_target, law, optimise, predict, predict_target, simplex_grid
from slmforge.science.scaling import bootstrap, fit_loglog, fit_power_law, loglog, power_law
from tests.conftest import assert_png_drawn, saved_figure


def test_power_law_recovers_parameters():
    n = np.array([5e5, 1e6, 2e6, 4e6, 8e6])
    truth = {"E": 1.7, "A": 40.0, "alpha": 0.3}
    fit = fit_power_law(n, power_law(n, truth))
    assert fit["E"] == pytest.approx(1.7, abs=2e-3)
    assert fit["alpha"] == pytest.approx(0.3, rel=1e-2)
    assert power_law(1.6e7, fit) == pytest.approx(power_law(1.6e7, truth), rel=1e-4)


def test_power_law_through_three_points_is_exact():
    n = np.array([4e5, 1e6, 2.4e6])
    truth = {"E": 2.2, "A": 9.0, "alpha": 0.21}
    fit = fit_power_law(n, power_law(n, truth))
    assert np.sqrt(fit["sse"]) < 1e-5
    assert power_law(4e6, fit) == pytest.approx(power_law(4e6, truth), rel=2e-3)


def test_power_law_without_a_floor_gives_e_zero():
    n = np.array([1e5, 1e6, 1e7])
    fit = fit_power_law(n, 30 * n ** -0.2)
    assert fit["E"] == pytest.approx(0.0, abs=1e-3)
    line = fit_loglog(n, 30 * n ** -0.2)
    assert line["beta"] == pytest.approx(0.2) and line["B"] == pytest.approx(30)
    assert loglog(1e8, line) == pytest.approx(30 * 1e8 ** -0.2)


def test_bootstrap_band_covers_the_truth_and_shrinks_with_less_noise():
    rng = np.random.default_rng(0)
    n = np.array([5e5, 1e6, 2e6, 4e6])
    truth = {"E": 1.5, "A": 30.0, "alpha": 0.3}

    def width(noise):
        batches = [power_law(x, truth) + noise * rng.standard_normal(40) for x in n]
        boot = bootstrap(n, batches, np.array([8e6]), replicates=200)
        lo, hi = np.quantile(boot["power_law"][:, 0], [0.01, 0.99])
        assert lo - 0.05 < power_law(8e6, truth) < hi + 0.05
        return hi - lo

    assert width(0.01) < width(0.1)


def test_mixture_law_recovers_a_known_optimum():
    E, C, gamma = 2.0, np.array([1.0, 3.0, 2.0]), np.array([0.5, 0.3, 0.8])
    rng = np.random.default_rng(1)
    h = rng.dirichlet(np.ones(3), 12)
    fit = fit_law(h, law(h, E, C, gamma), seed=0)
    assert fit["rmse"] < 1e-4
    grid = simplex_grid(3, 100)
    true_best = grid[np.argmin(law(grid, E, C, gamma))]
    h_opt, loss_opt = optimise({"per_source": {"target": fit}}, 3, 100)
    assert np.abs(h_opt - true_best).max() <= 0.02
    assert loss_opt == pytest.approx(law(true_best[None], E, C, gamma)[0], abs=1e-3)
    assert predict(fit, h[:2]) == pytest.approx(law(h[:2], E, C, gamma), abs=1e-3)


def test_mixture_law_needs_enough_runs():
    h = np.array([[0.2, 0.8], [0.5, 0.5], [0.8, 0.2]])
    with pytest.raises(ValueError, match="shared_exponent"):
        fit_law(h, np.array([3.0, 2.9, 3.1]))


def test_simplex_grid_covers_the_simplex():
    grid = simplex_grid(3, 10)
    assert len(grid) == 66  # C(12, 2)
    assert np.allclose(grid.sum(1), 1) and grid.min() >= 0


def test_three_source_plot(tmp_path, saved_figures):
    from slmforge.science.mixture_law import plot_mix

    h = np.array([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6], [0.4, 0.3, 0.3], [0.1, 0.1, 0.8]])
    loss = law(h, 2.0, np.array([1.0, 2.0, 3.0]), np.full(3, 0.5))
    fit = {"per_source": {"a": {"E": 2.0, "C": [1.0, 2.0, 3.0], "gamma": [0.5] * 3}}}
    h_opt, loss_opt = optimise(fit, 3, 50)
    points = [{"target_loss": float(x), "predicted": float(x), "predicted_leave_one_out": None} for x in loss]
    result = {"sources": ["a", "b", "c"], "target": ["a", "b", "c"], "points": points,
              "predicted_optimum": {"predicted_loss": loss_opt, "measured_loss": loss_opt + 0.01}}
    plot_mix(result, h, loss, fit, h_opt, tmp_path / "mix.png")
    assert_png_drawn(tmp_path / "mix.png", min_coloured=5_000)  # the filled triangle
    axes = saved_figure(saved_figures, "mix.png")["axes"]
    triangle, (fit_ax,) = axes[0], [ax for ax in axes if ax["title"] == "mixture law fit"]  # and a colour bar
    assert triangle["collections"] >= 2  # the contour fill and the runs
    # Each run's loss is written at its point, and the three corners are named.
    assert triangle["texts"] == [f"{x:.3f}" for x in loss] + ["a", "b", "c"]
    ((x, y),) = [xy for label, xy in triangle["lines"].items() if label.startswith("predicted optimum")]
    assert x == [pytest.approx(h_opt[1] + h_opt[2] / 2)] and y == [pytest.approx(h_opt[2] * 3 ** 0.5 / 2)]
    assert fit_ax["lines"]["fit (in sample)"] == (list(map(float, loss)), list(map(float, loss)))
    assert fit_ax["lines"]["predicted optimum"] == ([loss_opt + 0.01], [loss_opt])


def test_target_is_the_mean_of_per_source_laws_and_the_search_stays_in_range():
    rng = np.random.default_rng(2)
    h = rng.dirichlet(np.ones(2), 6)
    # Each source's loss falls with its own share: the mean is lowest inside the simplex.
    truth = {"a": (1.0, np.array([2.0, 0.1]), np.array([0.7, 0.7])),
             "b": (0.5, np.array([0.1, 1.0]), np.array([0.5, 0.5]))}
    losses = {n: law(h, *p) for n, p in truth.items()}
    fit = fit_target(h, losses, shared_exponent=True)
    grid = simplex_grid(2, 100)
    mean = (law(grid, *truth["a"]) + law(grid, *truth["b"])) / 2
    assert predict_target(fit, grid) == pytest.approx(mean, abs=2e-3)
    h_opt, _ = optimise(fit, 2, 100)
    assert abs(h_opt[0] - grid[np.argmin(mean)][0]) <= 0.02
    h_box, _ = optimise(fit, 2, 100, lo=np.array([0.0, 0.0]), hi=np.array([0.2, 1.0]))
    assert h_box[0] == pytest.approx(min(0.2, grid[np.argmin(mean)][0]))
