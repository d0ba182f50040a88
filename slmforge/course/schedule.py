"""The main build's schedule: every training stage of a recipe priced on GPUs (``slmforge plan RECIPE``).

The stages are read from the recipe itself, so the plan and the run cannot disagree: the proxies (one run per
mixture and seed), the scaling ladder and the target's forecast run (on the fixed subset, once per seed), the
target's pre-training (twice with the anneal ablation), then each post stage. ORPO and DPO train on a chosen and
a rejected reply per example (2 passes; DPO also runs the frozen reference forward, 8/3); their verified pairs are sampled first, which costs forward passes only
(1/3 of a training pass per token: 2 of training's 6 FLOPs per parameter). The arithmetic is
``plan_schedule.schedule``; the target's loss before anything is trained is Chinchilla's estimate (Hoffmann et al.
2022), replaced in the build's report by the forecast the scaling ladder fits.
"""

from __future__ import annotations

from slmforge.config import ModelConfig, merge
from slmforge.course.config import MainConfig
from slmforge.metrics import tokens_per_step
from slmforge.plan import chinchilla_loss, count_params
from slmforge.plan_schedule import StagePlan, format_schedule, schedule


def _model(cfg: MainConfig, keys: dict, where: str) -> ModelConfig:
    return merge(cfg.base.model, keys, where)


def stage_plans(cfg: MainConfig) -> list[StagePlan]:
    base, mb = cfg.base, cfg.plan.micro_batch_size
    seq = base.data.seq_len
    per_step = tokens_per_step(base)

    def plan(name: str, model: ModelConfig, steps: int, runs: int = 1, passes: float = 1.0,
             step_tokens: int = per_step) -> StagePlan:
        return StagePlan(name=name, model=model, tokens=steps * step_tokens, runs=runs, seq_len=seq,
                         micro_batch_size=mb, passes=passes, global_batch_tokens=step_tokens)

    p, s, t = cfg.proxy, cfg.scaling, cfg.target
    subset = per_step * s.batch_size // base.train.batch_size if s.batch_size else per_step  # the ladder's step
    target = _model(cfg, t.model, "target.model")
    out = [plan("proxy mixtures", _model(cfg, p.model, "proxy.model"), p.steps, len(p.mixtures) * p.seeds)]
    for i, keys in enumerate(s.scales):
        m = _model(cfg, keys, f"scaling.scales[{i}]")
        out.append(plan(f"scaling d{m.d_model} l{m.num_layers}", m, s.steps, s.seeds, step_tokens=subset))
    out.append(plan("target on the subset (forecast check)", target, s.steps, s.seeds, step_tokens=subset))
    ablation = bool(t.anneal_weights) and t.ablation
    out.append(plan("target pre-training + anneal" + (" (and no-anneal control)" if ablation else ""), target,
                    t.steps, 2 if ablation else 1))
    for stage in cfg.post:
        out.extend(_post_plans(stage, target, mb))
    return out


def _post_plans(stage, model: ModelConfig, mb: int) -> list[StagePlan]:
    train = stage.train
    steps, batch = int(train.get("max_steps", 300)), int(train.get("batch_size", 16))
    length = stage.max_len or model.max_seq_len
    passes = {"orpo": 2.0, "dpo": 8 / 3}.get(stage.method, 1.0)
    rows = [StagePlan(name=stage.method, model=model, tokens=steps * batch * length, seq_len=length,
                      micro_batch_size=mb, passes=passes, global_batch_tokens=batch * length)]
    if "verified" in stage.data:
        sampled = stage.num_examples * stage.samples_per_problem * stage.max_new_tokens
        rows.insert(0, StagePlan(name=f"{stage.method} pair sampling", model=model, tokens=sampled, seq_len=length,
                                 micro_batch_size=mb, passes=1 / 3))
    return rows


def main_schedule(cfg: MainConfig) -> dict:
    """The schedule (``plan_schedule.schedule``) with the budget check and the target's prior loss estimate."""
    g = cfg.plan
    out = schedule(stage_plans(cfg), gpu=g.gpu, gpu_counts=tuple(g.gpu_counts), mfu=g.mfu, fsdp=g.fsdp)
    target = _model(cfg, cfg.target.model, "target.model")
    tokens = cfg.target.steps * tokens_per_step(cfg.base)
    out["target"] = {"params": count_params(target).total, "tokens": tokens,
                     "chinchilla_loss": chinchilla_loss(count_params(target).total, tokens)}
    if g.budget_gpu_hours > 0:
        used = out["totals"]["gpu_hours"]
        out["budget"] = {"gpu_hours": g.budget_gpu_hours, "planned_gpu_hours": used,
                         "within": used <= g.budget_gpu_hours}
    return out


def format_main_schedule(result: dict) -> str:
    lines = [format_schedule(result), ""]
    t = result["target"]
    lines.append(f"target: {t['params']:,} parameters, {t['tokens']:,} tokens; loss before any run (Chinchilla's "
                 f"fit, Hoffmann et al. 2022, for their data and tokenizer): {t['chinchilla_loss']:.3f}; the build's "
                 f"report replaces it with the scaling ladder's forecast")
    if "budget" in result:
        b = result["budget"]
        lines.append(f"budget: {b['planned_gpu_hours']:,.1f} of {b['gpu_hours']:,.1f} GPU-hours stated: "
                     + ("within" if b["within"] else "OVER the budget"))
    return "\n".join(lines)
