"""FlexOlmo subcommands (``slmforge flex train|merge|optout|report``): experts per data source on a frozen public
base, merged into one MoE, a source opted out with no retraining, the per-domain report (``post/flex*.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from slmforge.cli.common import config_args, dry_run, load_args, run_flags, split_items


@dataclass
class FlexMergeConfig:
    name: str = ""  # the merged run's folder name beside the base; "" = <base>_flex
    top_k: int = 2  # experts per token (the anchor among the candidates); 0 = all


@dataclass
class FlexOptoutConfig:
    source: list[str] = field(default_factory=list)  # the source(s) whose experts are removed
    name: str = ""  # the new run's folder name beside MERGED; "" = <merged>_without_<source>


@dataclass
class FlexReportConfig:
    max_docs: int = 200  # held-out documents scored per domain


def cmd_flex_train(args) -> None:
    from slmforge.cli.train import format_result
    from slmforge.post.flex import flex_configs, flex_train

    flex, cfg = flex_configs(args.base, args.overrides)
    if args.dry_run:
        return dry_run(cfg)
    print(format_result(flex_train(args.base, flex, cfg, resume=args.resume, force=args.force)))


def cmd_flex_merge(args) -> None:
    from slmforge.post.flex_merge import flex_merge

    experts, overrides = split_items(args.items)
    cfg = load_args(args, overrides)
    print(flex_merge(args.base, experts, cfg.name, cfg.top_k))


def cmd_flex_optout(args) -> None:
    from slmforge.post.flex_merge import flex_optout

    cfg = load_args(args)
    print(flex_optout(args.merged, cfg.source, cfg.name))


def cmd_flex_report(args) -> None:
    from slmforge.post.flex_merge import flex_report, markdown

    print(markdown(flex_report(args.merged, load_args(args).max_docs)), end="")


def register(sub) -> None:
    group = sub.add_parser("flex", help="FlexOlmo: experts per private data source on a frozen base, merged into "
                           "one MoE, opt-out at inference").add_subparsers(dest="action", required=True)
    p = group.add_parser("train", help="train one source's expert FFNs, the base frozen as the anchor expert",
                         description="Train source=NAME's expert on data=PATH only; the new run is <BASE>_<NAME>. "
                         "Other keys are run keys (train.max_steps=..., name=...).")
    p.add_argument("base", help="the public base run folder (a dense model trained by `slmforge run`/`train`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="source=..., data=..., train.* keys, name=...")
    run_flags(p, dry_run=True)
    p.set_defaults(fn=cmd_flex_train, config_cls="slmforge.post.flex:FlexTrainConfig")

    p = group.add_parser("merge", help="merge the base and expert runs into one MoE run folder")
    p.add_argument("base", help="the base run folder the experts were trained from")
    p.add_argument("items", nargs="*", metavar="EXPERT or key=value", help="expert run folders, then name=...")
    config_args(p, FlexMergeConfig, recipe=None, overrides=False)
    p.set_defaults(fn=cmd_flex_merge, overrides=[])

    p = group.add_parser("optout", help="a merged run without a source's expert (no retraining)")
    p.add_argument("merged", help="a run folder made by `slmforge flex merge`")
    config_args(p, FlexOptoutConfig, recipe=None)
    p.set_defaults(fn=cmd_flex_optout)

    p = group.add_parser("report", help="per-domain loss and fact accuracy: base, experts, merged, opted out")
    p.add_argument("merged", help="a run folder made by `slmforge flex merge`")
    config_args(p, FlexReportConfig, recipe=None)
    p.set_defaults(fn=cmd_flex_report)
