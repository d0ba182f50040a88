"""Data subcommands: synth, tokenizer, tokenize, dedup, filter."""

from __future__ import annotations

import json

from slmforge.cli.common import config_args, load, stage_config
from slmforge.config import dump_yaml


def cmd_synth(args) -> None:
    from slmforge.curate.documents import write_jsonl
    from slmforge.synth.jobs import load_job, preview, synthesize
    from slmforge.synth.procedural import build_corpus

    if args.job:
        job = load_job(args.job, args.overrides)
        if args.dry_run:
            return print(preview(job))
        summary = synthesize(job)
        print(json.dumps(summary, indent=2))
        if not summary["complete"]:
            raise SystemExit(1)
        return
    if not args.out:
        raise ValueError("give --job JOB.yaml (a teacher job) or --out FOLDER (the procedural corpus)")
    d = load(args).data
    corpus = build_corpus(d.families, d.num_train_docs, d.num_val_docs, d.num_test_docs, d.seed)
    for split, docs in corpus.items():
        path = f"{args.out}/{split}.jsonl"
        print(f"{split}: {write_jsonl(path, docs)} documents -> {path}")


def cmd_tokenizer(args) -> None:
    from slmforge.curate.documents import read_documents
    from slmforge.tokens.tokenizer import train_tokenizer

    texts = (d.text for d in read_documents(args.inputs, text_field=args.text_field, text_split=args.text_split))
    tok = train_tokenizer(texts, args.vocab_size, args.out)
    print(f"trained {tok.vocab_size} tokens -> {args.out}")


def cmd_tokenize(args) -> None:
    from slmforge.curate.documents import ReadStats, read_documents
    from slmforge.tokens.shards import tokenize_to_shards

    stats = ReadStats()
    texts = (d.text for d in read_documents(args.inputs, args.text_field, args.text_split, stats=stats))
    meta = tokenize_to_shards(texts, args.tokenizer, args.out, num_workers=args.workers)
    print(f"{meta['num_tokens']:,} tokens from {meta['num_docs']:,} documents -> {args.out} "
          f"({stats.num_empty_skipped} empty documents skipped)")


def cmd_dedup(args) -> None:
    from slmforge.curate.dedup import DedupConfig, bands_of, check_config, dedup

    cfg = stage_config(DedupConfig, args)
    if args.dry_run:
        check_config(cfg)
        return print(dump_yaml(cfg) + "# LSH: %d bands x %d rows" % bands_of(cfg))
    dedup(cfg, args.stage, args.shard_index, args.num_shards)


def cmd_filter(args) -> None:
    from slmforge.curate.filters import FilterConfig, filter_corpus

    cfg = stage_config(FilterConfig, args)
    if args.dry_run:
        return print(dump_yaml(cfg))
    report = filter_corpus(cfg, args.shard_index, args.num_shards)
    print(f"filter: removed {report['num_removed']:,} documents: {report['removed']}")


def register(sub) -> None:
    p = sub.add_parser("synth", help="a teacher job (--job: any OpenAI-compatible endpoint, or the offline "
                                     "procedural teacher), or the procedural corpus as JSONL splits (--out)")
    config_args(p)
    p.add_argument("--job", default=None, help="job YAML (e.g. recipes/synth_math.yaml); key=value override its keys")
    p.add_argument("--out", default=None, help="output folder of the procedural corpus")
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

    for name, fn, what in (("dedup", cmd_dedup, "remove exact and near-duplicate documents (MinHash LSH)"),
                           ("filter", cmd_filter, "Gopher quality rules and n-gram decontamination")):
        p = sub.add_parser(name, help=what)
        config_args(p)
        p.add_argument("--shard-index", type=int, default=None, help="run this shard only (a job-array task)")
        p.add_argument("--num-shards", type=int, default=1)
        if name == "dedup":
            p.add_argument("--stage", default="all", choices=["all", "signatures", "clusters", "write"],
                           help="as a job array: signatures per shard, clusters once, then write per shard")
        p.set_defaults(fn=fn)
