"""Post-training subcommands: sft, orpo, dpo (a new run folder from a trained run) and post (a recipe's chain)."""

from __future__ import annotations

import argparse

from slmforge.cli.common import dry_run, run_flags

WHAT = {"sft": "supervised fine-tuning on conversations (loss on assistant tokens, packed with document masking)",
        "orpo": "ORPO on preference pairs: NLL on chosen + beta * odds-ratio term, no reference model",
        "dpo": "DPO on preference pairs against the frozen starting model (its log-probs cached once)"}


def cmd_post(args) -> None:
    from slmforge.cli.train import format_result
    from slmforge.post.run import finetune_config, post_train

    cfg = finetune_config(args.run_dir, args.command, args.overrides)
    if args.dry_run:
        return dry_run(cfg)
    print(format_result(post_train(cfg, resume=args.resume, force=args.force)))


def cmd_post_chain(args) -> None:
    from slmforge.config import load_config
    from slmforge.post.run import post_chain

    cfg = load_config(args.recipe, args.overrides)
    for result in post_chain(args.source, cfg.post):
        print(f"{result['method']}: {result['run_dir']}")


def register(sub) -> None:
    p = sub.add_parser("post", help="a recipe's post stages (sft, orpo, dpo) in a chain from a trained run or a "
                       "Hugging Face folder", description="Run the `post:` list of RECIPE from SOURCE, each stage "
                       "into its own run folder (<source>_sft, <source>_sft_orpo, ...), each from the one before; "
                       "finished stages are skipped and a stopped one resumes.")
    p.add_argument("recipe", help="a YAML file with a `post:` list (e.g. recipes/post_gpu.yaml)")
    p.add_argument("source", help="the trained run folder or Hugging Face model folder to start from")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe keys, e.g. post=[...]")
    p.set_defaults(fn=cmd_post_chain, config_cls="slmforge.config:PostConfig")

    for name, what in WHAT.items():
        p = sub.add_parser(name, help=what, formatter_class=argparse.RawDescriptionHelpFormatter,
                           description=f"{what}.\n\nKeys: data=... (files; sft: 'procedural'; orpo/dpo: 'verified', "
                           f"'hh-rlhf:<path>'), beta, packing, max_len, overlong, val_data, val_fraction, "
                           f"num_examples, and any run key (train.max_steps=..., name=...). The new run is "
                           f"<RUN>_{name} beside RUN.")
        p.add_argument("run_dir", help="the trained run folder (or a Hugging Face model folder) to start from")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="data=..., beta=..., train.* keys, name=...")
        run_flags(p, dry_run=True)
        p.set_defaults(fn=cmd_post, config_cls="slmforge.config:PostConfig")
