"""The main build's report: report.json (every stage's numbers) and report.md (one page a person reads)."""

from __future__ import annotations

from pathlib import Path

from slmforge.course.config import MainConfig
from slmforge.runs import write_json, write_text


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def data_lines(results: dict) -> list[str]:
    lines = ["## Data", ""]
    synth = results.get("synth", {})
    if "written" in synth or "total_written" in synth:
        lines.append(f"- synthesizer: {synth.get('total_written', synth.get('written'))} records kept, "
                     f"{synth.get('total_rejected', synth.get('rejected', 0))} rejected ({synth.get('model', '')})")
        for step, counts in (synth.get("clean") or {}).items():
            if isinstance(counts, dict):
                lines.append(f"  - {step}: {counts.get('num_removed', 0)} of {counts.get('num_docs', 0)} removed")
    for stage, per_key in results["data"].get("curation", {}).items():
        for key, c in per_key.items():
            why = ", ".join(f"{reason} {n:,}" for reason, n in c["removed"].items() if n)
            lines.append(f"- {stage}, {key}: kept {c['num_kept']:,} of {c['num_docs']:,}, removed "
                         f"{c['num_removed']:,}" + (f" ({why})" if why else ""))
    lines += ["", "| shards | tokens | documents |", "|---|---:|---:|"]
    for key, s in results["data"]["shards"].items():
        lines.append(f"| {key} | {s['tokens']:,} | {s['documents']:,} |")
    return lines + [""]


def mix_lines(results: dict) -> list[str]:
    m = results["mix"]
    lines = ["## Mixture", "", f"Design: {m['design']}. {m.get('note', '')}".rstrip(), "",
             "| proxy mixture | target loss |", "|---|---:|"]
    for p in m["points"]:
        lines.append(f"| {', '.join(f'{k} {v:.2f}' for k, v in p['mixture'].items())} | {p['target_loss']:.4f} |")
    lines += ["", f"Chosen: {', '.join(f'{k} {v:.2f}' for k, v in m['chosen'].items())}", ""]
    return lines


def forecast_lines(results: dict) -> list[str]:
    s = results["scaling"]
    lines = ["## Forecast", "", "| run | parameters | validation loss |", "|---|---:|---:|"]
    for p in s["points"]:
        lines.append(f"| {p['run']} | {p['num_params']:,} | {p['val_loss']:.4f} |")
    t = s["target"]
    lines += ["", f"Target {t['run']} ({t['num_params']:,} parameters) on the same tokens: actual "
              f"{_num(t.get('actual'))}", "", "| law | forecast | error (seed 0) | error over seeds (mean ± sd) |",
              "|---|---:|---:|---:|"]
    over = s.get("over_seeds", {})
    for law in ("power_law", "loglog"):
        o = over.get(law, {})
        spread = f"{_pct(o.get('relative_error_mean'))} ± {_pct(o.get('relative_error_std'))}" if o else "-"
        lines.append(f"| {law} | {t[law]['predicted']:.4f} | {_pct(t[law].get('relative_error'))} | {spread} |")
    pooled = s.get("seed_mean")
    if pooled and "actual" in pooled["target"]:
        lines += ["", f"Fitted once to each size's mean over the {pooled['seeds']} seeds (the target's mean: "
                      f"{pooled['target']['actual']:.4f}): "
                  + "; ".join(f"{law} {pooled['target'][law]['predicted']:.4f} "
                              f"({_pct(pooled['target'][law]['relative_error'])})" for law in ("power_law", "loglog"))]
    rec = s.get("recommended")
    if rec:
        lines += ["", f"Recommended law: **{rec['law']}** ({rec.get('why', '')})"]
    return lines + [""]


def target_lines(results: dict) -> list[str]:
    t = results["target"]
    lines = ["## Target and anneal", ""]
    ab = t.get("ablation")
    if ab:
        d = ab["difference_anneal_minus_constant"]
        lines.append("Anneal gain (anneal minus the same run without the anneal mix): validation loss "
                     + ", ".join(f"{k} {v:+.4f}" for k, v in d["val_loss"].items())
                     + "; held-out math accuracy " + ", ".join(f"{k} {100 * v:+.1f} pts"
                                                              for k, v in d["arithmetic_accuracy"].items()))
    ev = t["report"]["eval"]
    lines.append(f"Target validation loss {_num(ev.get('validation', {}).get('loss'))}, "
                 f"test {_num(ev.get('test', {}).get('loss'))}")
    return lines + [""]


def eval_lines(results: dict) -> list[str]:
    e = results["evals"]
    lines = ["## Evaluations", "", "| model | held-out math accuracy | problems | chat |", "|---|---:|---:|---|"]
    for name, row in e["math"].items():
        lines.append(f"| {name} | {_pct(row['accuracy'])} | {row['problems']} | {'yes' if row['chat'] else 'no'} |")
    for method, g in e["post_gains"].items():
        lines.append(f"\n{method}: {100 * g['vs_previous']:+.1f} pts over the stage before, "
                     f"{100 * g['vs_target']:+.1f} over the target")
    niah = e["niah"]
    lines.append("")
    lines.append("Needle recall: " + (niah["skipped"] if "skipped" in niah else
                                      ", ".join(f"{n} tokens {_pct(r)}" for n, r in niah["recall"].items())))
    lines.append("Bits per byte: " + ", ".join(f"{k} {v:.4f}" for k, v in e["bits_per_byte"].items()))
    return lines + [""]


def time_lines(results: dict) -> list[str]:
    rows = [(name, r.get("seconds")) for name, r in results.items() if isinstance(r, dict)]
    total = sum(s for _, s in rows if s)
    return ["## Time", "", "| stage | seconds |", "|---|---:|",
            *(f"| {n} | {s:,.0f} |" for n, s in rows if s is not None), f"| total | {total:,.0f} |", ""]


def write_report(cfg: MainConfig, root: Path, results: dict) -> dict:
    plan = results["plan"]
    lines = [f"# Main build `{cfg.name}`", "",
             f"Plan: {plan['totals']['flops']:.3e} training FLOPs, {plan['totals']['gpu_hours']:,.2f} GPU-hours on "
             f"{cfg.plan.gpu} at MFU {cfg.plan.mfu:.0%} (stage by stage: `slmforge plan --config RECIPE`).", ""]
    for part in (data_lines, mix_lines, forecast_lines, target_lines, eval_lines, time_lines):
        lines += part(results)
    numbers = {k: v for k, v in results.items() if k != "report"}
    write_json(root / "report.json", numbers)
    write_text(root / "report.md", "\n".join(lines))
    return {"report_md": str(root / "report.md"), "report_json": str(root / "report.json")}
