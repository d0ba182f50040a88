"""``forecast(cfg)``: train one architecture at several sizes on the same tokens, fit L(N), forecast a bigger one.

Two fits of the validation loss against the parameter count N (Kaplan et al. 2020, arXiv 2001.08361, at a fixed
token budget; the E term as in Chinchilla, Hoffmann et al. 2022, arXiv 2203.15556):

    saturating   L(N) = E + A * N^-alpha      (E: the loss no size removes at this token budget)
    log-log      L(N) = B * N^-beta           (a straight line in log-log axes; E = 0)

The saturating fit needs no optimiser: for a fixed E, log(L - E) is linear in log N, so a grid over E in
[0, min L) with a least-squares line for each (numpy only) finds the best E, refined once on a finer grid.

Uncertainty: a bootstrap. Each replicate resamples every run's evaluation batches (the loss of each is a mean
of per-batch losses) and, with more points than parameters, the fit's residuals; it refits and forecasts. The
band is the replicates' 5-95% range. It covers evaluation noise and, given enough sizes, misfit, not the seed
noise of training. ``seeds`` > 1 measures that: every size and the target are trained again at train.seed + s
(same tokens), both laws are fitted per seed, and ``result["over_seeds"]`` gives the mean and standard deviation
of each law's forecast and error. N counts non-embedding parameters by default (Kaplan's choice, which keeps
small models on one line); ``params=total`` counts all.

Which law to believe is chosen without the target (``recommend``): each law is fitted to all scales but the
largest and scored on it, averaged over seeds. With 4 scales the held-out fit has 3 points: a least-squares fit
for the 2-parameter line, an exact one for the 3-parameter saturating law; with 3 scales there is no
recommendation (the saturating law would have 2 points).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slmforge.config import RunConfig, merge
from slmforge.corpus import shard_dirs
from slmforge.plan import count_params
from slmforge.runs import atomic_path, write_json
from slmforge.science.sweep import run_sweep, share_data, with_run


@dataclass
class ForecastConfig:
    name: str = "forecast"
    out_dir: str = "runs"
    base: RunConfig = field(default_factory=RunConfig)  # every run: data, train (equal tokens), model defaults
    scales: list[dict[str, Any]] = field(default_factory=list)  # model keys per fitted size, e.g. {d_model: 64}
    target: dict[str, Any] = field(default_factory=dict)  # model keys of the size to forecast
    train_target: bool = True  # also train the target and report forecast vs actual
    params: str = "non_embedding"  # N: "non_embedding" or "total" parameters
    eval_batches: int = 50  # validation batches scored per run (bootstrap resamples them)
    bootstrap: int = 1000
    seed: int = 0  # bootstrap resampling
    seeds: int = 1  # training seeds (base.train.seed + 0 .. seeds-1); run folders get _s<seed> when > 1


# ---------------------------------------------------------------- fits


def fit_loglog(n: np.ndarray, loss: np.ndarray) -> dict:
    """L = B * N^-beta by least squares in log-log space."""
    slope, intercept = np.polyfit(np.log(n), np.log(loss), 1)
    return {"B": float(np.exp(intercept)), "beta": float(-slope)}


def _line_fit(log_n: np.ndarray, loss: np.ndarray, E: np.ndarray):
    """For each E (G,), the least-squares line log(L - E) = log A - alpha log N; returns (log A, alpha, sse)."""
    y = np.log(loss[None, :] - E[:, None])  # (G, P)
    x = log_n - log_n.mean()
    slope = (y * x).sum(1) / (x * x).sum()
    log_a = y.mean(1) - slope * log_n.mean()
    pred = E[:, None] + np.exp(log_a[:, None] + slope[:, None] * log_n[None, :])
    return log_a, -slope, ((pred - loss[None, :]) ** 2).sum(1)


def fit_power_law(n: np.ndarray, loss: np.ndarray, grid_size: int = 2000) -> dict:
    """L = E + A * N^-alpha with 0 <= E < min L: a grid over E, then a finer grid around the best E."""
    n, loss = np.asarray(n, np.float64), np.asarray(loss, np.float64)
    log_n, top = np.log(n), loss.min()
    E = top * (1 - np.geomspace(1, 1e-6, grid_size))  # dense near min L, where the fit bends most
    E = np.concatenate([[0.0], E[1:]])
    for _ in range(2):
        log_a, alpha, sse = _line_fit(log_n, loss, E)
        i = int(np.argmin(sse))
        lo, hi = E[max(i - 1, 0)], E[min(i + 1, len(E) - 1)]
        best = {"E": float(E[i]), "A": float(np.exp(log_a[i])), "alpha": float(alpha[i]), "sse": float(sse[i])}
        E = np.linspace(lo, hi, grid_size)
    return best


def power_law(n, fit: dict) -> np.ndarray:
    return fit["E"] + fit["A"] * np.power(np.asarray(n, np.float64), -fit["alpha"])


def loglog(n, fit: dict) -> np.ndarray:
    return fit["B"] * np.power(np.asarray(n, np.float64), -fit["beta"])


def bootstrap(n: np.ndarray, batch_losses: list[np.ndarray], n_eval: np.ndarray, replicates: int,
              seed: int = 0) -> dict[str, np.ndarray]:
    """(replicates, len(n_eval)) forecasts of both fits over ``n_eval``; see the module docstring."""
    rng = np.random.default_rng(seed)
    loss = np.array([b.mean() for b in batch_losses])
    fit = fit_power_law(n, loss)
    residuals = loss - power_law(n, fit) if len(n) > 3 else np.zeros_like(loss)
    out = {"power_law": [], "loglog": []}
    for _ in range(replicates):
        sample = np.array([rng.choice(b, len(b)).mean() for b in batch_losses])
        sample = sample + rng.choice(residuals, len(n))
        out["power_law"].append(power_law(n_eval, fit_power_law(n, sample, grid_size=400)))
        out["loglog"].append(loglog(n_eval, fit_loglog(n, sample)))
    return {k: np.array(v) for k, v in out.items()}


# ---------------------------------------------------------------- which law, and the spread over seeds


LAWS = {"power_law": (fit_power_law, power_law), "loglog": (fit_loglog, loglog)}


def holdout_errors(n: np.ndarray, loss: np.ndarray) -> dict[str, float]:
    """Each law fitted without the largest scale, scored on it: |predicted - measured| / measured."""
    n, loss = np.asarray(n, np.float64), np.asarray(loss, np.float64)
    top = int(np.argmax(n))
    keep = np.arange(len(n)) != top
    return {key: float(abs(f(n[top], fit(n[keep], loss[keep])) - loss[top]) / loss[top])
            for key, (fit, f) in LAWS.items()}


def recommend(n: np.ndarray, losses: list[np.ndarray]) -> dict:
    """The law to trust for the forecast, chosen from the fitted scales alone (one loss array per seed).

    Leave the largest scale out, fit each law on the rest, predict it: the law with the lower error there,
    averaged over seeds, wins (a tie goes to the 2-parameter line). The held-out fit of the 3-parameter
    saturating law needs 3 points, so this takes 4 or more scales; with 4 it passes exactly through the 3
    smaller ones while the line is a least-squares fit. The target's loss is never looked at.
    """
    if len(n) < 4:
        return {"law": None, "why": f"leave-one-out needs 4 or more scales; with {len(n)} the saturating law "
                                    f"would be fitted to {len(n) - 1} points, fewer than its 3 parameters",
                "holdout_errors": {}}
    errors = {key: float(np.mean([holdout_errors(n, loss)[key] for loss in losses])) for key in LAWS}
    law, other = sorted(("loglog", "power_law"), key=lambda k: errors[k])  # stable: a tie keeps loglog
    why = (f"fitted on the {len(n) - 1} smaller scales, {law} predicts the largest ({int(max(n)):,} parameters) "
           f"within {100 * errors[law]:.2f}% ({other}: {100 * errors[other]:.2f}%), averaged over "
           f"{len(losses)} seed(s); the target's loss was not used")
    return {"law": law, "why": why, "holdout_errors": errors}


def over_seeds(per_seed: list[dict]) -> dict:
    """Each law's forecast and relative error (signed and absolute) over seeds: mean and sample std."""
    def stats(values) -> tuple[float, float]:
        v = np.asarray(values, np.float64)
        return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else 0.0)

    out = {"seeds": [s["seed"] for s in per_seed]}
    for key in LAWS:
        t = [s["target"][key] for s in per_seed]
        out[key] = dict(zip(("predicted_mean", "predicted_std"), stats([x["predicted"] for x in t])))
        if "relative_error" in t[0]:
            errors = [x["relative_error"] for x in t]
            out[key].update(zip(("relative_error_mean", "relative_error_std"), stats(errors)))
            out[key].update(zip(("abs_relative_error_mean", "abs_relative_error_std"), stats(np.abs(errors))))
    if "actual" in per_seed[0]["target"]:
        out["actual"] = dict(zip(("mean", "std"), stats([s["target"]["actual"] for s in per_seed])))
    return out


def seed_mean(per_seed: list[dict], n: np.ndarray) -> dict:
    """Both laws fitted once to every scale's loss averaged over the seeds, the target forecast from that fit (and
    compared with the target's seed-mean loss): repeats averaged before the fit, not after it.

    A law of 3 parameters through 4 points has one degree of freedom, so one seed's noise at the largest scale
    moves the extrapolation by several percent; the seed mean cuts that noise by sqrt(seeds) before the fit sees it.
    """
    loss = np.mean([[p["val_loss"] for p in e["points"]] for e in per_seed], axis=0)
    n_target = per_seed[0]["target"]["num_params"]
    out = {"seeds": len(per_seed), "val_loss": [float(x) for x in loss], "fit": {}, "target": {}}
    actual = [e["target"]["actual"] for e in per_seed if "actual" in e["target"]]
    if len(actual) == len(per_seed):
        out["target"]["actual"] = float(np.mean(actual))
    for key, (fit, f) in LAWS.items():
        out["fit"][key] = fit(n, loss)
        predicted = float(f(n_target, out["fit"][key]))
        out["target"][key] = {"predicted": predicted}
        if "actual" in out["target"]:
            out["target"][key]["relative_error"] = (predicted - out["target"]["actual"]) / out["target"]["actual"]
    return out


# ---------------------------------------------------------------- the experiment


def _num_params(model_cfg, which: str) -> int:
    if which not in ("non_embedding", "total"):
        raise ValueError(f"forecast: params={which!r}: choose 'non_embedding' or 'total'")
    return getattr(count_params(model_cfg), which)


def _check(cfg: ForecastConfig) -> None:
    if len(cfg.scales) < 3:
        raise ValueError(f"forecast: scales has {len(cfg.scales)} sizes; a 3-parameter law needs at least 3")
    if not cfg.target:
        raise ValueError("forecast: target is empty; give the model keys of the size to forecast (target: {...})")
    if cfg.seeds < 1:
        raise ValueError(f"forecast: seeds={cfg.seeds}: give 1 or more")


def forecast(cfg: ForecastConfig) -> dict:
    """Train each scale on the same tokens at every seed, fit both laws per seed, forecast the target (and train
    it to check); the band, the plot and ``result["target"]`` are seed 0's, the spread over seeds is separate."""
    _check(cfg)
    sweep_dir = Path(cfg.out_dir) / cfg.name
    base = share_data(cfg.base, sweep_dir)
    val = {"validation": shard_dirs(base)["validation"]}
    models = [merge(base.model, s, f"forecast.scales[{i}]") for i, s in enumerate(cfg.scales)]
    target_model = merge(base.model, cfg.target, "forecast.target")
    n = np.array([_num_params(m, cfg.params) for m in models], np.float64)
    n_target = _num_params(target_model, cfg.params)
    if len(set(n)) < len(n):
        raise ValueError(f"forecast: two scales have the same parameter count ({n.astype(int).tolist()})")

    def run(m, s: int) -> RunConfig:
        # Only the seed changes (model init and data order); one seed keeps the folder names of earlier sweeps.
        name = f"d{m.d_model}_l{m.num_layers}" + (f"_s{s}" if cfg.seeds > 1 else "")
        return with_run(base, sweep_dir, name, model=dataclasses.asdict(m), train={"seed": base.train.seed + s})

    per_seed, batches = [], []
    for s in range(cfg.seeds):
        entry, batch_losses = _one_seed(cfg, [run(m, s) for m in models], run(target_model, s), val, n, n_target)
        per_seed.append(entry)
        batches.append(batch_losses)
    n_eval = np.geomspace(n.min() / 1.5, max(n_target, n.max()) * 1.5, 60)
    boot = bootstrap(n, batches[0], np.append(n_eval, n_target), cfg.bootstrap, cfg.seed)
    first = per_seed[0]
    result = {"params": cfg.params, "points": first["points"], "fit": first["fit"],
              "target": {**first["target"], **{key: dict(first["target"][key]) for key in LAWS}}}
    for key in LAWS:
        lo, hi = np.quantile(boot[key][:, -1], [0.05, 0.95])
        result["target"][key]["band_5_95"] = [float(lo), float(hi)]
    result.update(seeds=per_seed, over_seeds=over_seeds(per_seed),
                  recommended=recommend(n, [np.array([p["val_loss"] for p in e["points"]]) for e in per_seed]))
    if cfg.seeds > 1:
        result["seed_mean"] = seed_mean(per_seed, n)
    write_json(sweep_dir / "forecast.json", result)
    plot_forecast(result, n_eval, boot, sweep_dir / "forecast.png")
    result["plot"] = str(sweep_dir / "forecast.png")
    return result


def _one_seed(cfg: ForecastConfig, scale_runs: list[RunConfig], target_run: RunConfig, val: dict,
              n: np.ndarray, n_target: int) -> tuple[dict, list[np.ndarray]]:
    """One seed's scales trained and fitted, the target forecast (and trained); with each scale's batch losses."""
    runs = run_sweep(scale_runs, val, cfg.eval_batches)
    batch_losses = [np.array(r.eval_losses["validation"]) for r in runs]
    loss = np.array([b.mean() for b in batch_losses])
    fits = {key: fit(n, loss) for key, (fit, _) in LAWS.items()}
    entry = {"seed": target_run.train.seed,
             "points": [{"run": r.cfg.name, "num_params": int(x), "val_loss": float(l),
                         "tokens": r.report["train"]["tokens"]} for r, x, l in zip(runs, n, loss)],
             "fit": fits, "target": {"run": target_run.name, "num_params": int(n_target)},
             "holdout_errors": holdout_errors(n, loss) if len(n) >= 4 else {}}
    for key, (_, f) in LAWS.items():
        entry["target"][key] = {"predicted": float(f(n_target, fits[key]))}
    if cfg.train_target:
        (t,) = run_sweep([target_run], val, cfg.eval_batches)
        actual = float(np.mean(t.eval_losses["validation"]))
        entry["target"]["actual"] = actual
        for key in LAWS:
            entry["target"][key]["relative_error"] = (entry["target"][key]["predicted"] - actual) / actual
    return entry, batch_losses


def plot_forecast(result: dict, n_eval: np.ndarray, boot: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, f, colour in (("power_law", power_law, "C0"), ("loglog", loglog, "C1")):
        fit = result["fit"][key]
        label = (f"E + A N^-a: E={fit['E']:.3f}, a={fit['alpha']:.3f}" if key == "power_law"
                 else f"B N^-b: b={fit['beta']:.3f}")
        ax.plot(n_eval, f(n_eval, fit), color=colour, label=label)
        lo, hi = np.quantile(boot[key][:, :-1], [0.05, 0.95], axis=0)
        ax.fill_between(n_eval, lo, hi, color=colour, alpha=0.2)
    pts = result["points"]
    ax.plot([p["num_params"] for p in pts], [p["val_loss"] for p in pts], "ko", label="fitted runs")
    t = result["target"]
    pred = t["power_law"]
    ax.errorbar([t["num_params"]], [pred["predicted"]], yerr=[[pred["predicted"] - pred["band_5_95"][0]],
                [pred["band_5_95"][1] - pred["predicted"]]], fmt="s", color="C0", capsize=4, label="forecast")
    if "actual" in t:
        ax.plot([t["num_params"]], [t["actual"]], "r*", ms=14,
                label=f"actual ({100 * pred['relative_error']:+.2f}% error)")
    ax.set(xscale="log", yscale="log", xlabel=f"parameters N ({result['params'].replace('_', '-')})",
           ylabel="validation loss (nats/token)", title="Loss vs size at equal tokens, 5-95% bootstrap band")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
