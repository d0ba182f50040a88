"""``mix(cfg)``: proxy runs at several mixture ratios, a fitted mixture law, and the mixture it predicts is best.

The law is the additive law of Shukor et al. 2025, "Scaling Laws for Optimal Data Mixtures" (arXiv 2507.09404),
at one model size N and token budget D, where its A/N^alpha + B/D^beta terms are constants folded into E::

    L(h) = E + 1 / sum_j C_j * h_j ** gamma_j        h on the simplex (one weight per source), C_j, gamma_j > 0

Why this law and not RegMix's regression (Liu et al. 2024, arXiv 2407.01492): RegMix fits a free-form regressor
(LightGBM) to hundreds of tiny runs; a CPU sweep has 6-10 runs, too few for that. The law has 2k+1 parameters
(k+2 with ``shared_exponent``), and its 1/sum form gives diminishing returns per source, so the optimum can lie
inside the simplex, as measured mixture curves do. It also carries to larger N and D in the paper, which a
regressor over proportions does not.

The target is the mean validation loss over ``cfg.target`` sources (each source's own validation shards, equal
weight). As in the paper, a law is fitted per target domain (each source's loss depends mostly on its own share,
which one law of the mean cannot follow); the target is the mean of the fitted laws. Fitting:
``scipy.optimize.least_squares`` in (E, log C, log gamma) from several random starts. The optimum: the minimum
of the fitted target on a simplex grid of step ``1 / resolution``, each share kept within the range the sweep
measured (``extrapolate=true`` searches the whole simplex; corners the sweep never saw are where the law is
least reliable). Shapes: R runs, k sources;
``h`` is (R, k), ``loss`` is (R,).

Too few mixtures for the law ("three proxies, choose the best"): the law is fitted only when R distinct mixtures
leave a degree of freedom (R >= parameters + 1, ``design``); otherwise ``mix`` chooses the measured mixture with
the lowest target loss, and ``result["design"]`` says which. Either way the chosen mixture, by source name, is
``result["predicted_optimum"]["mixture"]``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slmforge.config import RunConfig
from slmforge.corpus import shard_dirs
from slmforge.metrics import tokens_per_step
from slmforge.runs import atomic_path, write_json
from slmforge.science.sweep import mean_and_stderr, run_sweep, share_data, with_run
from slmforge.tokens.mixture import SourceWeight, Stage


@dataclass
class MixConfig:
    name: str = "mix"
    out_dir: str = "runs"
    base: RunConfig = field(default_factory=RunConfig)  # every proxy run: model, train, data.sources
    ratios: list[list[float]] = field(default_factory=list)  # one weight per data.sources entry, in order
    target: list[str] = field(default_factory=list)  # sources whose validation loss is the target; [] = all
    shared_exponent: bool = False  # one gamma for all sources (k+2 parameters instead of 2k+1)
    validate: bool = True  # also train the predicted optimum; and it and the best grid point on fresh seeds
    eval_batches: int = 20  # validation batches per source and run
    seeds: int = 1  # runs per mixture (model and data-order seeds shifted by 0..seeds-1); losses are their mean
    resolution: int = 100  # simplex grid step 1/resolution when optimising the law
    extrapolate: bool = False  # search the whole simplex, not just each share's range in `ratios`
    seed: int = 0  # fitting restarts


# ---------------------------------------------------------------- the law


def law(h: np.ndarray, E: float, C: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """(R,) losses of (R, k) mixtures."""
    return E + 1.0 / (C * np.power(h, gamma)).sum(axis=-1)


def _unpack(theta: np.ndarray, k: int, shared: bool):
    gamma = np.exp(theta[1 + k :]) if not shared else np.full(k, math.exp(theta[1 + k]))
    return theta[0], np.exp(theta[1 : 1 + k]), gamma


def fit_law(h: np.ndarray, loss: np.ndarray, shared_exponent: bool = False, restarts: int = 8,
            seed: int = 0) -> dict:
    """Least-squares fit of ``law``; returns E, C, gamma (lists) and the rmse of the fit."""
    from scipy.optimize import least_squares

    h, loss = np.asarray(h, np.float64), np.asarray(loss, np.float64)
    k = h.shape[1]
    num_params = k + 2 if shared_exponent else 2 * k + 1
    if len(loss) < num_params:
        raise ValueError(f"the mixture law has {num_params} parameters but there are only {len(loss)} runs: add "
                         f"ratios{'' if shared_exponent else ' or set shared_exponent=true'}")
    rng = np.random.default_rng(seed)

    def residual(theta):
        return law(h, *_unpack(theta, k, shared_exponent)) - loss

    best = None
    for _ in range(restarts):
        theta0 = np.concatenate([[rng.uniform(0, 0.9 * loss.min())], rng.uniform(-2, 2, k),
                                 rng.uniform(-2, 0.5, 1 if shared_exponent else k)])
        # log C and log gamma are boxed so that a flat direction cannot run off to overflow.
        # E is a loss floor: at least 0 and below every measured loss. C and gamma are boxed (gamma in
        # [0.05, 3]) so that a flat direction of a small, noisy sweep cannot run off to a degenerate law.
        lo = np.concatenate([[0.0], np.full(k, -8.0), np.full(num_params - 1 - k, -3.0)])
        hi = np.concatenate([[loss.min()], np.full(k, 8.0), np.full(num_params - 1 - k, 1.1)])
        res = least_squares(residual, theta0, bounds=(lo, hi), max_nfev=100 * num_params)
        if best is None or res.cost < best.cost:
            best = res
    E, C, gamma = _unpack(best.x, k, shared_exponent)
    return {"E": float(E), "C": C.tolist(), "gamma": gamma.tolist(),
            "rmse": float(np.sqrt(np.mean(best.fun ** 2)))}


def predict(fit: dict, h: np.ndarray) -> np.ndarray:
    return law(np.atleast_2d(np.asarray(h, np.float64)), fit["E"], np.asarray(fit["C"]), np.asarray(fit["gamma"]))


def simplex_grid(k: int, resolution: int) -> np.ndarray:
    """All (M, k) mixtures whose weights are multiples of 1/resolution."""
    points = [c for c in itertools.product(range(resolution + 1), repeat=k - 1) if sum(c) <= resolution]
    grid = np.array([[*c, resolution - sum(c)] for c in points], np.float64)
    return grid / resolution


def fit_target(h: np.ndarray, losses: dict[str, np.ndarray], shared_exponent: bool = False, restarts: int = 8,
               seed: int = 0) -> dict:
    """One law per target source; the target loss is their mean (``predict_target``)."""
    return {"per_source": {name: fit_law(h, loss, shared_exponent, restarts, seed) for name, loss in losses.items()}}


def predict_target(fit: dict, h: np.ndarray) -> np.ndarray:
    return np.mean([predict(f, h) for f in fit["per_source"].values()], axis=0)


def optimise(fit: dict, k: int, resolution: int = 100, lo: np.ndarray | None = None,
             hi: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The fitted target's minimum over the simplex grid, each share within [lo, hi]: (mixture (k,), loss)."""
    grid = simplex_grid(k, resolution)
    eps = 0.5 / resolution
    if lo is not None:
        grid = grid[((grid >= lo - eps) & (grid <= hi + eps)).all(axis=1)]
    pred = predict_target(fit, grid)
    i = int(np.argmin(pred))
    return grid[i], float(pred[i])


def leave_one_out(h: np.ndarray, losses: dict[str, np.ndarray], shared_exponent: bool,
                  seed: int = 0) -> list[float | None]:
    """Each run's target loss predicted by the laws fitted to the others (None when too few runs are left)."""
    out = []
    for i in range(len(h)):
        keep = np.arange(len(h)) != i
        try:
            fit = fit_target(h[keep], {n: l[keep] for n, l in losses.items()}, shared_exponent, 4, seed)
        except ValueError:
            out.append(None)
            continue
        out.append(float(predict_target(fit, h[i])[0]))
    return out


# ---------------------------------------------------------------- the experiment


def _label(h: np.ndarray) -> str:
    return "-".join(f"{round(100 * x):d}" for x in h)


def mix_run(base: RunConfig, sweep_dir: Path, names: list[str], h: np.ndarray, prefix: str,
            seed: int = 0) -> RunConfig:
    """``base`` trained on one single-stage mixture ``h`` for its whole budget (max_steps x tokens per step).

    ``seed`` > 0 shifts the model's and the mixture's seeds (run ``<prefix>_<mix>_s<seed>``).
    """
    tokens = base.train.max_steps * tokens_per_step(base)
    stage = Stage(name="mix", tokens=tokens,
                  weights=[SourceWeight(n, float(w)) for n, w in zip(names, h) if w > 0])
    mixture = dataclasses.replace(base.data.mixture, sources=[], stages=[stage], seed=base.data.mixture.seed + seed)
    cfg = with_run(base, sweep_dir, f"{prefix}_{_label(h)}" + (f"_s{seed}" if seed else ""))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mixture=mixture),
                               train=dataclasses.replace(cfg.train, anneal_stage="", seed=base.train.seed + seed))


def _check(cfg: MixConfig, names: list[str]) -> np.ndarray:
    if len(names) < 2:
        raise ValueError(f"mix: base.data.sources names {len(names)} source(s); a mixture needs 2 or more")
    if len(cfg.ratios) < 3:
        raise ValueError(f"mix: ratios has {len(cfg.ratios)} mixtures; give at least 3")
    for i, r in enumerate(cfg.ratios):
        if len(r) != len(names) or min(r) < 0 or sum(r) <= 0:
            raise ValueError(f"mix: ratios[{i}]={r}: expected {len(names)} weights >= 0 (one per source: "
                             f"{', '.join(names)}) with a positive sum")
    for t in cfg.target:
        if t not in names:
            raise ValueError(f"mix: target {t!r} is not a source; sources: {', '.join(names)}")
    h = np.asarray(cfg.ratios, np.float64)
    return h / h.sum(axis=1, keepdims=True)


def design(runs: int, k: int, shared_exponent: bool) -> dict:
    """Which design ``runs`` distinct measured mixtures of ``k`` sources allow: the fitted law or the best of them.

    The law is fitted only when at least one degree of freedom is left (runs >= parameters + 1). With runs ==
    parameters it passes through every run exactly: each run's noise becomes the law's shape, its rmse is 0 and
    its leave-one-out fits are underdetermined, so nothing would tell a real optimum from an artefact.
    """
    params = k + 2 if shared_exponent else 2 * k + 1
    if runs >= params + 1:
        return {"design": "fitted_law", "measured_mixtures": runs, "law_parameters": params,
                "design_note": f"{runs} measured mixtures fit the {params}-parameter law with "
                               f"{runs - params} degree(s) of freedom left"}
    return {"design": "best_of_measured", "measured_mixtures": runs, "law_parameters": params,
            "design_note": f"{runs} measured mixtures cannot fit the {params}-parameter law with a degree of "
                           f"freedom left (it needs {params + 1}); chose the best measured mixture"}


def mix(cfg: MixConfig) -> dict:
    """Train one proxy per ratio; fit the law and predict the best mixture (and train it), or, with too few
    ratios for the law (``design``), choose the best measured one. JSON + PNG in the sweep."""
    names = list(cfg.base.data.sources)
    h = _check(cfg, names)
    target = cfg.target or names
    sweep_dir = Path(cfg.out_dir) / cfg.name
    base = share_data(cfg.base, sweep_dir)
    shards = shard_dirs(base)
    eval_shards = {n: shards[f"{n}/validation"] for n in names}

    def measure(mixtures: np.ndarray, prefix: str, first_seed: int = 0) -> list[dict]:
        """Train every mixture at seeds first_seed .. first_seed + seeds - 1; per mixture, the seed-mean losses."""
        seeds = range(first_seed, first_seed + cfg.seeds)
        runs = run_sweep([mix_run(base, sweep_dir, names, x, prefix, s) for x in mixtures for s in seeds],
                         eval_shards, cfg.eval_batches)
        out = []
        for i, x in enumerate(mixtures):
            group = runs[i * cfg.seeds : (i + 1) * cfg.seeds]
            per_seed = [{n: mean_and_stderr(r.eval_losses[n])[0] for n in names} for r in group]
            per_source = {n: float(np.mean([p[n] for p in per_seed])) for n in names}
            out.append({"mixture": dict(zip(names, x.tolist())), "runs": [r.cfg.name for r in group],
                        "per_source": per_source, "target_loss": float(np.mean([per_source[n] for n in target])),
                        "target_loss_per_seed": [float(np.mean([p[n] for n in target])) for p in per_seed]})
        return out

    points = measure(h, "mix")
    loss = np.array([p["target_loss"] for p in points])
    best = int(np.argmin(loss))
    # Distinct mixtures: a repeated ratio (or [1, 1] beside [2, 2]) tells the law nothing new about its shape.
    result = {**design(len(np.unique(h.round(9), axis=0)), len(names), cfg.shared_exponent),
              "sources": names, "target": target, "fit": None, "points": points,
              "tokens_per_run": base.train.max_steps * tokens_per_step(base), "seeds": cfg.seeds,
              "best_grid": {"mixture": points[best]["mixture"], "target_loss": float(loss[best])}}
    if result["design"] == "fitted_law":
        losses = {n: np.array([p["per_source"][n] for p in points]) for n in target}
        fit, h_opt = _fitted_law(cfg, result, h, losses, measure)
    else:
        # The chosen mixture is a measured run, so there is no prediction to validate; its loss is still the
        # minimum of noisy measurements (biased low), which more seeds per mixture shrink.
        result["predicted_optimum"] = {"mixture": points[best]["mixture"], "measured": points[best],
                                       "measured_loss": float(loss[best])}
        if cfg.validate:
            result["validation"] = ("skipped: in the best_of_measured design the chosen mixture is a measured "
                                    "run; no predicted optimum to train")
    write_json(sweep_dir / "mix.json", result)
    if result["design"] == "fitted_law":
        plot_mix(result, h, loss, fit, h_opt, sweep_dir / "mix.png")
    else:
        plot_measured(result, sweep_dir / "mix.png")
    result["plot"] = str(sweep_dir / "mix.png")
    return result


def _fitted_law(cfg: MixConfig, result: dict, h: np.ndarray, losses: dict[str, np.ndarray],
                measure) -> tuple[dict, np.ndarray]:
    """The fitted-law design: fit, optimise within the measured range, validate; fills ``result``."""
    names, points = result["sources"], result["points"]
    loss = np.array([p["target_loss"] for p in points])
    fit = fit_target(h, losses, cfg.shared_exponent, seed=cfg.seed)
    for p, pred, loo in zip(points, predict_target(fit, h), leave_one_out(h, losses, cfg.shared_exponent, cfg.seed)):
        p.update(predicted=float(pred), predicted_leave_one_out=loo)
    # The law is trusted only where it was measured: each share stays within the range the sweep covered.
    lo, hi = (None, None) if cfg.extrapolate else (h.min(axis=0), h.max(axis=0))
    h_opt, loss_opt = optimise(fit, len(names), cfg.resolution, lo, hi)
    best = int(np.argmin(loss))
    result.update({
        "law": "L_i(h) = E_i + 1 / sum_j C_ij h_j^gamma_ij per target source i, target = mean_i L_i "
               "(arXiv 2507.09404, additive law at fixed N, D)",
        "search": "whole simplex" if cfg.extrapolate else {"min": dict(zip(names, lo.tolist())),
                                                           "max": dict(zip(names, hi.tolist()))},
        "fit": fit,
        "predicted_optimum": {"mixture": dict(zip(names, h_opt.tolist())), "predicted_loss": loss_opt},
    })
    if cfg.validate:
        (check,) = measure(h_opt[None], "optimum")
        result["predicted_optimum"].update(measured=check, measured_loss=check["target_loss"],
                                           gain_vs_best_grid=float(loss[best] - check["target_loss"]))
        # The best grid point is the minimum of noisy measurements, so its loss is biased low (the winner's
        # curse). Both retrained on seeds no run above used give the unbiased comparison.
        opt_fresh, best_fresh = measure(np.stack([h_opt, h[best]]), "fresh", first_seed=cfg.seeds)
        result["fresh_seeds"] = {
            "seeds": list(range(cfg.seeds, 2 * cfg.seeds)), "predicted_optimum": opt_fresh["target_loss"],
            "best_grid": best_fresh["target_loss"],
            "gain_vs_best_grid": float(best_fresh["target_loss"] - opt_fresh["target_loss"])}
    return fit, h_opt


def plot_mix(result: dict, h: np.ndarray, loss: np.ndarray, fit: dict, h_opt: np.ndarray, path: Path) -> None:
    """Left: the fitted law over the mixtures (a line for 2 sources, a triangle for 3), the runs and the choice.
    Right: predicted vs measured target loss (in-sample and leave-one-out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, k = result["sources"], h.shape[1]
    opt = result["predicted_optimum"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    if k == 2:
        x = np.linspace(0, 1, 201)
        ax.plot(x, predict_target(fit, np.stack([x, 1 - x], 1)), label="fitted law")
        ax.plot(h[:, 0], loss, "o", label="proxy runs")
        ax.plot(h_opt[0], opt["predicted_loss"], "*", ms=15, label="predicted optimum")
        if "measured_loss" in opt:
            ax.plot(h_opt[0], opt["measured_loss"], "x", ms=10, mew=2, label="optimum, measured")
        ax.set(xlabel=f"share of {names[0]} (rest: {names[1]})", ylabel="target loss (nats/token)")
        ax.legend()
    elif k == 3:
        def xy(p):
            p = np.atleast_2d(p)
            return p[:, 1] + p[:, 2] / 2, p[:, 2] * math.sqrt(3) / 2

        def point(p):
            return tuple(float(v[0]) for v in xy(p))

        grid = simplex_grid(3, 60)
        pred = predict_target(fit, grid)
        top = np.quantile(pred, 0.9)  # clip the steep corners so the colours show the interior
        cs = ax.tricontourf(*xy(grid), np.minimum(pred, top), levels=20, cmap="viridis")
        fig.colorbar(cs, ax=ax, label="fitted target loss")
        ax.scatter(*xy(h), c="white", edgecolors="k", zorder=3, label="proxy runs")
        for p, l in zip(h, loss):
            ax.annotate(f"{l:.3f}", point(p), textcoords="offset points", xytext=(4, 4), fontsize=7, color="w")
        ax.plot(*xy(h_opt), "r*", ms=15, label=f"predicted optimum {_label(h_opt)}")
        for corner, name in zip(np.eye(3), names):
            ax.annotate(name, point(corner), ha="center", va="bottom" if corner[2] else "top", fontsize=9)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.legend(loc="upper right", fontsize=7)
    pts = result["points"]
    measured = [p["target_loss"] for p in pts]
    bx.plot(measured, [p["predicted"] for p in pts], "o", label="fit (in sample)")
    loo = [(m, p["predicted_leave_one_out"]) for m, p in zip(measured, pts) if p["predicted_leave_one_out"]]
    if loo:
        bx.plot(*zip(*loo), "s", mfc="none", label="leave one out")
    if "measured_loss" in opt:
        bx.plot(opt["measured_loss"], opt["predicted_loss"], "r*", ms=13, label="predicted optimum")
    lims = [min(measured + [opt["predicted_loss"]]) - 0.02, max(measured) + 0.02]
    bx.plot(lims, lims, "k--", lw=0.8)
    bx.set(xlabel="measured target loss", ylabel="predicted target loss", title="mixture law fit")
    bx.legend(fontsize=8)
    fig.suptitle(f"Mixture law over {', '.join(names)} (target: {', '.join(result['target'])})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_measured(result: dict, path: Path) -> None:
    """The best-of-measured design: each mixture's target loss (and its seeds), the chosen one starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, chosen = result["points"], result["predicted_optimum"]
    x = np.arange(len(pts))
    fig, ax = plt.subplots(figsize=(1.2 * len(pts) + 3, 4.5))
    ax.plot(x, [p["target_loss"] for p in pts], "o", ms=9, label="measured mixtures (mean over seeds)")
    if result["seeds"] > 1:
        ax.plot(*zip(*[(i, s) for i, p in enumerate(pts) for s in p["target_loss_per_seed"]]), "k.",
                label="one seed")
    i = next(i for i, p in enumerate(pts) if p["mixture"] == chosen["mixture"])
    ax.plot([i], [chosen["measured_loss"]], "r*", ms=16, label="chosen: lowest target loss")
    ax.set_xticks(x, [_label(np.array(list(p["mixture"].values()))) for p in pts])
    ax.set(xlabel=f"mixture, % of {', '.join(result['sources'])}", ylabel="target loss (nats/token)",
           title=f"Best of {len(pts)} measured mixtures (too few for the mixture law)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
