"""``slmforge flex merge|optout|report``: FlexOlmo experts stacked into one MoE, opted out, measured.

FlexOlmo (Shi et al. 2025, arXiv 2507.07024, sec. 3.2-3.3): the merged model keeps the base's attention, embeddings
and FFN (the anchor expert) and adds every expert's FFN per layer behind one router whose rows are the experts'
router embeddings, concatenated; nothing is trained after the merge. A source opts out by deleting its expert and
its router row (``without_sources``): no retraining, and no trace of its data is left in the weights. A merged or
opted-out model is an ordinary run folder (``model.ffn=flexmoe``, ``model.flexmoe.sources``; one checkpoint), so
``generate``, ``chat``, ``serve`` and ``eval`` load it as any other; ``flex.json`` says what it was made of.

``flex_report`` scores every domain (the public one: the base run's held-out documents; each source: its expert
run's) with the base, each expert alone (its 2-expert training model), the merged model and the merged model with
each source opted out: loss per token, and fact accuracy where an expert run holds probes (``eval/facts.py``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from slmforge.checkpoint import find_tokenizer, load_for_inference, write_checkpoint
from slmforge.config import RunConfig, load_config
from slmforge.eval.facts import fact_accuracy
from slmforge.eval.perplexity import stream_nats
from slmforge.log import log
from slmforge.model.flexmoe import FlexMoE
from slmforge.model.lm import LM
from slmforge.post.flex import (EXPERT_KEYS, FLEX_JSON, QUESTIONS, anchor_weights, base_config, ffn_prefixes,
                                held_out_docs, read_questions)
from slmforge.runs import RunDir, save_config, write_json, write_text

PUBLIC = "public"


def flex_merge(base: str | Path, experts: list[str | Path], name: str = "", top_k: int = 2) -> Path:
    """Base + experts -> a new run folder (<base>_flex beside the base, or ``name``); returns its path."""
    base = Path(base)
    base_cfg = base_config(base)
    model, _, _ = load_for_inference(base)
    base_sd = model.state_dict()
    sources, expert_sds, routing = [], [], set()
    for e in map(Path, experts):
        source, sd = _expert(e, base, base_sd)
        if source in sources:
            raise ValueError(f"{e}: a second expert of source {source!r}; merge one expert per source")
        sources.append(source)
        expert_sds.append(sd)
        flex = load_config(e / "config.yaml").model.flexmoe
        routing.add((flex.router_input, flex.context_prior))
    if len(routing) > 1:  # an expert learned the tokens its router input sent it: the merge keeps that input
        raise ValueError(f"experts trained with different router inputs (router_input, context_prior): {routing}")
    keys = [f"model.flexmoe.router_input={r}" for r, _ in routing] + [f"model.flexmoe.context_prior={k}"
                                                                     for _, k in routing]
    cfg = load_config(base / "config.yaml", [f"name={name or base.name + '_flex'}", f"out_dir={base.parent}",
                                             "model.ffn=flexmoe", f"model.flexmoe.sources={','.join(sources)}",
                                             f"model.flexmoe.top_k={top_k}", "train.init_from=", "post=[]",
                                             *keys])
    info = {"kind": "merged", "base": str(base), "experts": {s: str(e) for s, e in zip(sources, experts)},
            "opted_out": []}
    log(f"flex: merging {len(sources)} expert(s) into {base}: {', '.join(sources) or '(none)'}")
    return write_flex_run(cfg, merged_weights(base_sd, expert_sds), find_tokenizer(RunDir.at(base), base_cfg), info)


def _expert(run: Path, base: Path, base_sd: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """An expert run's source and weights, checked to be trained from ``base`` (its base weights unchanged)."""
    info = _flex_info(run, "expert")
    model, _, _ = load_for_inference(run)
    sd = model.state_dict()
    for key, value in anchor_weights(base_sd).items():
        if key not in sd or not torch.equal(sd[key], value):
            raise ValueError(f"{run}: not trained from {base} (its {key} differs from the base's); train the expert "
                             f"with `slmforge flex train {base} source={info['source']} ...`")
    return info["source"], sd


def merged_weights(base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The base's weights with every FFN as the anchor, the experts' FFNs and router rows stacked in order."""
    out = anchor_weights(base)
    for ffn in ffn_prefixes(base):
        w13, w2 = base[f"{ffn}.w13.weight"], base[f"{ffn}.w2.weight"]  # (2H, C), (C, H)
        empty = {"w13": w13.new_zeros(0, *w13.t().shape), "w2": w2.new_zeros(0, *w2.t().shape),
                 "router_experts": w13.new_zeros(0, w13.shape[1]), "router_experts_bias": w13.new_zeros(0)}
        for key, none in empty.items():
            out[f"{ffn}.{key}"] = torch.cat([sd[f"{ffn}.{key}"] for sd in experts]) if experts else none
        for key, none in (("router_anchor", w13.new_zeros(1, w13.shape[1])), ("router_anchor_bias", w13.new_zeros(1)),
                          ("router_prior", w13.new_zeros(1, w13.shape[1]))):
            rows = [sd[f"{ffn}.{key}"] for sd in experts]
            # Every expert saw the same public row unless they were given different public data: then the mean.
            same = all(torch.equal(r, rows[0]) for r in rows)
            out[f"{ffn}.{key}"] = (rows[0] if same else torch.stack(rows).mean(0)) if rows else none
    return out


def without_sources(weights: dict[str, torch.Tensor], cfg: RunConfig, drop: list[str],
                    where: str = "") -> tuple[dict[str, torch.Tensor], RunConfig]:
    """A merged model's weights and config with the experts of ``drop`` removed (their FFNs and router rows)."""
    sources = [s.strip() for s in cfg.model.flexmoe.sources.split(",") if s.strip()]
    for s in drop:
        if s not in sources:
            raise ValueError(f"{where or 'model'}: no source {s!r} to opt out; its sources: "
                             f"{', '.join(sources) or '(none)'}")
    keep = [i for i, s in enumerate(sources) if s not in drop]
    out = dict(weights)
    for key, value in weights.items():
        if key.rsplit(".", 1)[-1] in EXPERT_KEYS and ".ffn." in key and ".anchor." not in key:
            out[key] = value[keep].clone()
    flex = dataclasses.replace(cfg.model.flexmoe, sources=",".join(sources[i] for i in keep))
    return out, dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, flexmoe=flex))


def flex_optout(merged: str | Path, drop: list[str], name: str = "") -> Path:
    """A new run folder: ``merged`` without the experts of ``drop`` (<merged>_without_<source>, or ``name``)."""
    merged = Path(merged)
    info = _flex_info(merged, "merged")
    if not drop:
        raise ValueError("source= is empty: name the source(s) to opt out, e.g. source=law")
    model, _, cfg = load_for_inference(merged)
    weights, cfg = without_sources(model.state_dict(), cfg, drop, str(merged))
    cfg = dataclasses.replace(cfg, name=name or f"{merged.name}_without_{'_'.join(drop)}", out_dir=str(merged.parent))
    info = {**info, "opted_out": [*info["opted_out"], *drop], "from": str(merged),
            "experts": {s: e for s, e in info["experts"].items() if s not in drop}}
    log(f"flex: {merged} without {', '.join(drop)}")
    return write_flex_run(cfg, weights, find_tokenizer(RunDir.at(merged), cfg), info)


def write_flex_run(cfg: RunConfig, weights: dict[str, torch.Tensor], tokenizer: Path, info: dict) -> Path:
    """A run folder of one checkpoint (step 0): config.yaml, tokenizer.json, flex.json; refused if it exists."""
    run = RunDir.of(cfg)
    if run.root.exists() and any(run.root.iterdir()):
        raise ValueError(f"{run.root} already exists; give another name=... or delete it")
    model = LM(cfg.model)
    model.load_state_dict(weights)  # every key and shape checked: a model the config cannot load is never written
    write_checkpoint(run.checkpoints, 0, model.state_dict(), {"step": 0, "flex": info},
                     tied=cfg.model.tie_embeddings)
    save_config(run.root, cfg)
    if not run.tokenizer.exists():  # data.tokenizer may name the source's own file
        shutil.copyfile(tokenizer, run.tokenizer)
    write_json(run.root / FLEX_JSON, info)
    return run.root


def _flex_info(run: Path, kind: str) -> dict:
    path = run / FLEX_JSON
    if not path.is_file():
        made = "slmforge flex train" if kind == "expert" else "slmforge flex merge"
        raise ValueError(f"{run}: no {FLEX_JSON}, so not a FlexOlmo {kind} run; give one made by `{made}`")
    info = json.loads(path.read_text())
    if info.get("kind") != kind:
        raise ValueError(f"{run}: a FlexOlmo {info.get('kind')} run, expected a {kind} run")
    return info


def flex_report(merged: str | Path, max_docs: int = 200, batch_size: int = 8) -> dict:
    """Loss and fact accuracy per domain for base, each expert alone, merged and merged minus each source; writes
    report.json and report.md into ``merged``."""
    merged = Path(merged)
    info = _flex_info(merged, "merged")
    experts = {s: Path(e) for s, e in info["experts"].items()}
    domains = {PUBLIC: held_out_docs(Path(info["base"]))[:max_docs]}
    domains.update({s: held_out_docs(e)[:max_docs] for s, e in experts.items()})
    probes = {s: read_questions(e / QUESTIONS) for s, e in experts.items() if (e / QUESTIONS).is_file()}
    model, tokenizer, cfg = load_for_inference(merged)
    seq_len = cfg.data.seq_len

    def score(m) -> dict:
        out = {}
        for d, texts in domains.items():
            ids = [i for t in texts for i in [tokenizer.eos_id] + tokenizer.encode(t)]
            nats, count = stream_nats(m, ids, seq_len, seq_len, batch_size)
            out[d] = {"loss": nats / max(count, 1)}
            if d in probes:
                out[d]["fact_accuracy"] = _accuracy(m, tokenizer, probes[d])
        return out

    rows = {"base": score(load_for_inference(info["base"])[0]), "merged": score(model)}
    routing = routing_shares(model, tokenizer, domains, seq_len)
    for s, e in experts.items():
        rows[f"expert:{s}"] = score(load_for_inference(e)[0])
        weights, cut_cfg = without_sources(model.state_dict(), cfg, [s])
        cut = LM(cut_cfg.model)
        cut.load_state_dict(weights)
        rows[f"without:{s}"] = score(cut.eval())
    report = {"merged": str(merged), "base": info["base"], "sources": list(experts), "opted_out": info["opted_out"],
              "top_k": cfg.model.flexmoe.top_k, "domains": list(domains), "scores": rows,
              "table": table_rows(rows, list(domains)), "routing": routing}
    run = RunDir.at(merged)
    write_json(run.report_json, report)
    write_text(run.report_md, markdown(report))
    return report


@torch.no_grad()
def routing_shares(model, tokenizer, domains: dict[str, list[str]], seq_len: int) -> dict[str, dict[str, float]]:
    """Per domain, the share of its tokens' gate weight each expert of the merged ``model`` gets, averaged over
    tokens and layers (each token's top-k gates sum to 1): ``public`` is the anchor, then the sources. Routing that
    separates the domains puts most of a source's share on its own expert and public's on the anchor."""
    layers = [m for m in model.modules() if isinstance(m, FlexMoE)]
    names = [PUBLIC, *(layers[0].sources if layers else [])]
    mass = {"sum": torch.zeros(len(names), dtype=torch.float64)}

    def add(module, args, output):
        chosen, weights = module.route(args[0])
        mass["sum"] += torch.zeros(len(names), dtype=torch.float64).index_add_(
            0, chosen.flatten().cpu(), weights.flatten().double().cpu())

    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(add) for m in layers if m.sources]
    out = {}
    try:
        for d, texts in domains.items():
            mass["sum"].zero_()
            ids = [i for t in texts for i in [tokenizer.eos_id] + tokenizer.encode(t)]
            device = next(model.parameters()).device
            for start in range(0, len(ids), seq_len):
                model(torch.tensor(ids[start : start + seq_len], device=device)[None])
            total = mass["sum"].sum()
            out[d] = {n: float(v / total) if total else float(n == PUBLIC) for n, v in zip(names, mass["sum"])}
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return out


def _accuracy(model, tokenizer, questions: list[dict]) -> float:
    choices = {q["answer"]: q["candidates"] for q in questions if "candidates" in q}
    return fact_accuracy(model, tokenizer, [(q["prompt"], q["answer"]) for q in questions],
                         choices=(lambda a: choices[a]) if choices else None)


def table_rows(rows: dict, domains: list[str]) -> list[dict]:
    """The issue's one table: per domain, base / expert alone / merged / merged without that source."""
    out = []
    for d in domains:
        row = {"domain": d}
        for label, key in (("base", "base"), ("expert", f"expert:{d}"), ("merged", "merged"),
                           ("opted_out", f"without:{d}")):
            for metric in ("loss", "fact_accuracy"):
                value = rows.get(key, {}).get(d, {}).get(metric)
                if value is not None:
                    row[f"{label}_{metric}"] = value
        # What opting d out does to the other domains' facts: the largest change of their accuracy.
        cut = rows.get(f"without:{d}", {})
        moved = [abs(cut[o]["fact_accuracy"] - rows["merged"][o]["fact_accuracy"]) for o in domains
                 if o != d and "fact_accuracy" in cut.get(o, {})]
        if moved:
            row["opted_out_others_max_acc_change"] = max(moved)
        out.append(row)
    return out


def markdown(report: dict) -> str:
    cols = [("base", "base"), ("expert", "expert alone"), ("merged", "merged"), ("opted_out", "merged, opted out")]
    lines = [f"# FlexOlmo merge: {report['merged']}", "",
             f"Base {report['base']}; sources: {', '.join(report['sources']) or '(none)'}; top_k "
             f"{report['top_k']}; opted out before: {', '.join(report['opted_out']) or 'none'}.", "",
             "| domain | " + " | ".join(f"{name} loss | {name} acc" for _, name in cols) + " | others' acc change |",
             "|---|" + "---|---|" * len(cols) + "---|"]
    for row in report["table"]:
        cells = [_fmt(row.get(f"{key}_{m}")) for key, _ in cols for m in ("loss", "fact_accuracy")]
        cells.append(_fmt(row.get("opted_out_others_max_acc_change")))
        lines.append(f"| {row['domain']} | " + " | ".join(cells) + " |")
    lines += ["", "Loss: nats per token on the domain's held-out documents. Acc: fact-question accuracy (the true "
              "value ranked first among its attribute's values). Opted out: the merged model without that domain's "
              "expert (no retraining); others' acc change: the largest change of another domain's accuracy when "
              "this one is opted out."]
    routing = report.get("routing", {})
    experts = next(iter(routing.values()), {})
    if experts:
        lines += ["", "Routing in the merged model: the share of each domain's gate weight per expert (public: the "
                  "anchor, the base's FFN), over tokens and layers.", "",
                  "| domain | " + " | ".join(experts) + " |", "|---|" + "---|" * len(experts)]
        lines += [f"| {d} | " + " | ".join(f"{100 * share[e]:.1f}%" for e in experts) + " |"
                  for d, share in routing.items()]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"
