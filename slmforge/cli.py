"""Command line: one subcommand per stage. Handlers only parse, merge the config and call the API."""

from __future__ import annotations

import argparse
import os
import sys

from slmforge.config import dump_yaml, load_config, merge, parse_overrides


def _config_args(p: argparse.ArgumentParser, recipe_positional: bool = False) -> None:
    if recipe_positional:
        p.add_argument("recipe", nargs="?", default=None, help="recipe YAML (e.g. recipes/tiny_cpu.yaml)")
    else:
        p.add_argument("--config", dest="recipe", default=None, help="recipe YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=100 model.d_model=64")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and planned counts, then exit")


def _load(args):
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        recipe, overrides = None, [recipe, *overrides]  # `slmforge run key=value ...` with no recipe
    return load_config(recipe, overrides)


def _dry_run(cfg) -> None:
    from slmforge.plan import count_params, flops_per_token

    pc = count_params(cfg.model)
    t = cfg.train
    tokens = t.max_steps * t.batch_size * t.grad_accum * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.data.seq_len)["train"] * tokens
    print(dump_yaml(cfg))
    print(f"# parameters: {pc.total:,} total, {pc.non_embedding:,} non-embedding")
    print(f"# tokens: {tokens:,}; training FLOPs: {flops:.3e}")


def cmd_plan(args) -> None:
    from slmforge.plan import PlanConfig, format_plan, format_presets, plan

    if args.presets:
        print(format_presets())
        return
    print(format_plan(plan(merge(PlanConfig(), parse_overrides(args.overrides), where="plan"))))


def cmd_synth(args) -> None:
    from slmforge.data.documents import write_jsonl
    from slmforge.data.synth.procedural import build_corpus

    d = _load(args).data
    corpus = build_corpus(d.families, d.num_train_docs, d.num_val_docs, d.num_test_docs, d.seed)
    for split, docs in corpus.items():
        path = f"{args.out}/{split}.jsonl"
        print(f"{split}: {write_jsonl(path, docs)} documents -> {path}")


def cmd_tokenizer(args) -> None:
    from slmforge.data.documents import read_documents
    from slmforge.data.tokenizer import train_tokenizer

    texts = (d.text for d in read_documents(args.inputs, text_field=args.text_field, text_split=args.text_split))
    tok = train_tokenizer(texts, args.vocab_size, args.out)
    print(f"trained {tok.vocab_size} tokens -> {args.out}")


def cmd_tokenize(args) -> None:
    from slmforge.data.documents import ReadStats, read_documents
    from slmforge.data.shards import tokenize_to_shards

    stats = ReadStats()
    texts = (d.text for d in read_documents(args.inputs, args.text_field, args.text_split, stats=stats))
    meta = tokenize_to_shards(texts, args.tokenizer, args.out, num_workers=args.workers)
    print(f"{meta['num_tokens']:,} tokens from {meta['num_docs']:,} documents -> {args.out} "
          f"({stats.num_empty_skipped} empty documents skipped)")


def cmd_train(args) -> None:
    from slmforge.train.loop import train

    from slmforge.train.distributed import shutdown

    cfg = _load(args)
    if args.dry_run:
        return _dry_run(cfg)
    result = train(cfg, resume=args.resume)
    shutdown()
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        print(result)


def cmd_run(args) -> None:
    from slmforge.pipeline import run

    cfg = _load(args)
    if args.dry_run:
        return _dry_run(cfg)
    run(cfg)


def cmd_generate(args) -> None:
    from slmforge.serve.generate import stream_text
    from slmforge.train.checkpoint import load_for_inference

    model, tok, _ = load_for_inference(args.checkpoint)
    for piece in stream_text(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                             args.top_p, stop=args.stop, seed=args.seed):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args) -> None:
    from slmforge.serve.chat import chat
    from slmforge.train.checkpoint import load_for_inference

    model, tok, _ = load_for_inference(args.checkpoint)
    chat(model, tok, system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature)


def cmd_export(args) -> None:
    from slmforge.serve.hf import export_hf

    print(f"LlamaForCausalLM folder -> {export_hf(args.checkpoint, args.out)}")


def cmd_import(args) -> None:
    from slmforge.serve.hf import import_hf_run

    print(f"run folder -> {import_hf_run(args.folder, args.out)}")


def cmd_eval_gsm8k(args) -> None:
    from slmforge.eval.gsm8k import GSM8KConfig, evaluate

    summary = evaluate(args.run_dir, merge(GSM8KConfig(), parse_overrides(args.overrides), where="eval gsm8k"))
    for name, m in summary["metrics"].items():
        print(f"{name}: exact_match {m['exact_match']:.4f} ({summary['num_problems']} problems)")


def cmd_eval_ppl(args) -> None:
    from pathlib import Path

    from slmforge.eval.perplexity import PerplexityConfig, evaluate

    # key=value items that are not files are overrides (`slmforge eval ppl RUN a.txt b.txt stride=128`).
    over = [a for a in args.files if "=" in a and not Path(a).exists()]
    cfg = merge(PerplexityConfig(), parse_overrides(over), where="eval ppl")
    result = evaluate(args.run_dir, [f for f in args.files if f not in over], cfg)
    for name, m in {**result["files"], "total": result["total"]}.items():
        print(f"{name}: loss {m['loss']:.4f}, perplexity {m['perplexity']:.2f}, bits/byte {m['bits_per_byte']:.4f}")


def _stage_config(cls, args):
    """A data stage's own config dataclass: defaults < --config YAML (a flat mapping) < key=value overrides."""
    import yaml

    raw = {}
    if args.recipe:
        try:
            with open(args.recipe) as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{args.recipe}: not valid YAML: {exc}") from None
    return merge(merge(cls(), raw, where=args.recipe or cls.__name__), parse_overrides(args.overrides), "override")


def cmd_dedup(args) -> None:
    from slmforge.data.dedup import DedupConfig, bands_of, check_config, dedup

    cfg = _stage_config(DedupConfig, args)
    if args.dry_run:
        check_config(cfg)
        return print(dump_yaml(cfg) + "# LSH: %d bands x %d rows" % bands_of(cfg))
    dedup(cfg, args.stage, args.shard_index, args.num_shards)


def cmd_filter(args) -> None:
    from slmforge.data.filters import FilterConfig, filter_corpus

    cfg = _stage_config(FilterConfig, args)
    if args.dry_run:
        return print(dump_yaml(cfg))
    report = filter_corpus(cfg, args.shard_index, args.num_shards)
    print(f"filter: removed {report['num_removed']:,} documents: {report['removed']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slmforge", description="Build small language models end to end.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="compute-optimal size, FLOPs, time and memory for a budget")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. gpu_hours=100 gpu=h100 num_gpus=8")
    p.add_argument("--presets", action="store_true", help="list the model presets with exact parameter counts")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("run", help="data -> tokenizer -> shards -> train -> eval -> samples -> report")
    _config_args(p, recipe_positional=True)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("train", help="train on existing token shards (data.shards_dir)")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("synth", help="write the procedural corpus (no teacher needed) as JSONL splits")
    _config_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(fn=cmd_synth)

    for name, fn, what in (("tokenizer", cmd_tokenizer, "train a byte-level BPE tokenizer"),
                           ("tokenize", cmd_tokenize, "write token shards")):
        p = sub.add_parser(name, help=what)
        p.add_argument("inputs", nargs="+", help="text/JSONL/Parquet files or globs")
        p.add_argument("--out", required=True, help="tokenizer.json path" if name == "tokenizer" else "shard folder")
        p.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text")
        p.add_argument("--text-split", default="file", choices=["file", "blank_line", "line"],
                       help="how plain-text files split into documents")
        if name == "tokenizer":
            p.add_argument("--vocab-size", type=int, default=8192)
        else:
            p.add_argument("--tokenizer", required=True, help="tokenizer.json")
            p.add_argument("--workers", type=int, default=2, help="tokenizer processes")
        p.set_defaults(fn=fn)

    for name, fn in (("generate", cmd_generate), ("chat", cmd_chat)):
        p = sub.add_parser(name, help=f"{name} with a trained model (run folder or checkpoint folder)")
        p.add_argument("checkpoint")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.7)
        if name == "generate":
            p.add_argument("--prompt", required=True)
            p.add_argument("--top-k", type=int, default=50)
            p.add_argument("--top-p", type=float, default=0.95)
            p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
            p.add_argument("--seed", type=int, default=None)
        else:
            p.add_argument("--system", default="", help="system prompt")
        p.set_defaults(fn=fn)

    p = sub.add_parser("export", help="write a run (attention-only) as a Hugging Face LlamaForCausalLM folder")
    p.add_argument("checkpoint", help="run folder or checkpoint folder")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("import", help="turn a Hugging Face Llama folder (e.g. SmolLM2) into a run folder")
    p.add_argument("folder", help="folder with config.json, *.safetensors and tokenizer.json")
    p.add_argument("--out", required=True, help="run folder to write")
    p.set_defaults(fn=cmd_import)

    kinds = sub.add_parser("eval", help="evaluate a run: gsm8k (lm-eval's gsm8k scoring) or ppl (bits per byte)")
    kinds = kinds.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser("gsm8k", help="GSM8K or the run's procedural arithmetic (data=procedural), n-shot CoT")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. limit=100 maj_k=8 data=procedural")
    p.set_defaults(fn=cmd_eval_gsm8k)
    p = kinds.add_parser("ppl", help="loss, perplexity and bits per byte on text files (strided windows)")
    p.add_argument("run_dir")
    p.add_argument("files", nargs="+", metavar="FILE or key=value", help="text files, then e.g. stride=128")
    p.set_defaults(fn=cmd_eval_ppl)

    for name, fn, what in (("dedup", cmd_dedup, "remove exact and near-duplicate documents (MinHash LSH)"),
                           ("filter", cmd_filter, "Gopher quality rules and n-gram decontamination")):
        p = sub.add_parser(name, help=what)
        _config_args(p)
        p.add_argument("--shard-index", type=int, default=None, help="run this shard only (a job-array task)")
        p.add_argument("--num-shards", type=int, default=1)
        if name == "dedup":
            p.add_argument("--stage", default="all", choices=["all", "signatures", "clusters", "write"],
                           help="as a job array: signatures per shard, clusters once, then write per shard")
        p.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, OSError) as exc:
        print(f"slmforge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
