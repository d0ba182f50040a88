"""Data subcommands: synth, tokenizer, tokenize, dedup, filter."""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass, field

from slmforge.cli.common import config_args, load_args, split_items
from slmforge.config import TextSplit, check_min, dump_yaml
from slmforge.curate.executor import ExecutorName


@dataclass
class TokenizerConfig:
    """``slmforge tokenizer FILES... out=tok.json``: train a byte-level BPE on text/JSONL/Parquet files."""

    inputs: list[str] = field(default_factory=list)  # files or globs; positional items fill it
    out: str = ""  # tokenizer.json path (or its folder)
    vocab_size: int = 8192
    text_field: str = "text"  # JSONL/Parquet field holding the text
    text_split: TextSplit = "file"  # how plain-text files split into documents
    split_digits: bool = True  # every digit its own token (false: plain GPT-2 byte-level BPE)

    def validate(self, prefix: str = "") -> None:
        _require_inputs_and_out(self, prefix)
        check_min(self, prefix, 1, "vocab_size")


@dataclass
class TokenizeConfig:
    """``slmforge tokenize FILES... tokenizer=tok.json out=shards/train``: write token shards."""

    inputs: list[str] = field(default_factory=list)  # files or globs; positional items fill it
    out: str = ""  # shard folder
    tokenizer: str = ""  # tokenizer.json
    num_workers: int = 2  # tokenizer processes
    text_field: str = "text"
    text_split: TextSplit = "file"
    executor: ExecutorName = "local"  # ray: batches of documents encoded as Ray tasks (same shards)
    ray_address: str = ""  # executor=ray: empty starts a local Ray cluster; auto or HOST:PORT joins a running one
    ray_num_cpus: int = 0  # CPUs of a new local Ray cluster; 0 = all

    def validate(self, prefix: str = "") -> None:
        _require_inputs_and_out(self, prefix)
        if not self.tokenizer:
            raise ValueError(f"{prefix}tokenizer is required: give tokenizer=PATH/tokenizer.json")
        check_min(self, prefix, 1, "num_workers")


def _require_inputs_and_out(cfg, prefix: str) -> None:
    if not cfg.inputs:
        raise ValueError(f"{prefix}inputs is empty: give text/JSONL/Parquet files or globs")
    if not cfg.out:
        raise ValueError(f"{prefix}out is required: give out=PATH")


def _with_inputs(args):
    """The config of tokenizer/tokenize: positional items that are not ``key=value`` are its ``inputs``."""
    inputs, overrides = split_items(args.items)
    return load_args(args, overrides + ([f"inputs={json.dumps(inputs)}"] if inputs else []))


def cmd_synth(args) -> None:
    from slmforge.curate.documents import write_jsonl
    from slmforge.synth.jobs import load_job, preview, synthesize
    from slmforge.synth.procedural import build_corpus

    if args.job:
        job = load_job(args.job, args.overrides)
        if job.teacher.api_key:  # printed and saved configs mask it, but a shell history or a job file keeps it
            print("slmforge synth: note: teacher.api_key is masked in printed and saved configs; better give the key "
                  "with teacher.api_key_env=VAR or teacher.api_key_file=PATH", file=sys.stderr)
        if args.dry_run:
            return print(preview(job))
        summary = synthesize(job)
        print(json.dumps(summary, indent=2))
        if not summary["complete"]:
            raise SystemExit(1)
        return
    if not args.out:
        raise ValueError("give --job JOB.yaml (a teacher job) or --out FOLDER (the procedural corpus)")
    d = load_args(args).data
    corpus = build_corpus(d.families, d.num_train_docs, d.num_val_docs, d.num_test_docs, d.seed)
    for split, docs in corpus.items():
        path = f"{args.out}/{split}.jsonl"
        print(f"{split}: {write_jsonl(path, docs)} documents -> {path}")


def cmd_tokenizer(args) -> None:
    from slmforge.curate.documents import ReadStats, checked, read_documents
    from slmforge.tokens.tokenizer import train_tokenizer

    cfg, stats = _with_inputs(args), ReadStats()
    docs = read_documents(cfg.inputs, text_field=cfg.text_field, text_split=cfg.text_split, stats=stats)
    texts = (d.text for d in checked(docs, stats, "tokenizer", cfg.inputs, cfg.text_field))
    tok = train_tokenizer(texts, cfg.vocab_size, cfg.out, split_digits=cfg.split_digits)
    print(f"trained {tok.vocab_size} tokens -> {cfg.out}")


def cmd_tokenize(args) -> None:
    from slmforge.curate.documents import ReadStats, checked, read_documents
    from slmforge.curate.executor import executor
    from slmforge.tokens.shards import tokenize_to_shards

    cfg, stats = _with_inputs(args), ReadStats()
    docs = read_documents(cfg.inputs, cfg.text_field, cfg.text_split, stats=stats)
    # No documents is an error (naming the files) before the shards are moved into place: old ones stay intact.
    texts = (d.text for d in checked(docs, stats, "tokenize", cfg.inputs, cfg.text_field))
    with executor(cfg, "tokenize") as ex:  # Ray tasks get the batches from here: no shared file system needed
        map_batches = functools.partial(ex.map, in_cwd=False) if ex.remote else None
        meta = tokenize_to_shards(texts, cfg.tokenizer, cfg.out, num_workers=cfg.num_workers, map_batches=map_batches)
    print(f"{meta['num_tokens']:,} tokens from {meta['num_docs']:,} documents -> {cfg.out} "
          f"({stats.num_empty_skipped} empty documents skipped)")


def cmd_dedup(args) -> None:
    from slmforge.curate.dedup import bands_of, check_config, dedup

    cfg = load_args(args)
    if args.dry_run:
        check_config(cfg)
        return print(dump_yaml(cfg) + "# LSH: %d bands x %d rows" % bands_of(cfg))
    dedup(cfg, args.stage, args.shard_index, args.num_shards)


def cmd_filter(args) -> None:
    from slmforge.curate.filters import filter_corpus

    cfg = load_args(args)
    if args.dry_run:
        return print(dump_yaml(cfg))
    report = filter_corpus(cfg, args.shard_index, args.num_shards)
    print(f"filter: removed {report['num_removed']:,} documents: {report['removed']}")


def register(sub) -> None:
    p = sub.add_parser("synth", help="a teacher job (--job: any OpenAI-compatible endpoint, or the offline "
                                     "procedural teacher), or the procedural corpus as JSONL splits (--out)")
    config_args(p, "slmforge.config:RunConfig", dry_run=True)
    p.add_argument("--job", default=None, help="job YAML (e.g. recipes/synth_math.yaml); key=value items then set the "
                                               "job's keys (teacher.name=procedural, num_samples=...; --dry-run "
                                               "shows them all); without --job, the run keys below (data.*)")
    p.add_argument("--out", default=None, help="output folder of the procedural corpus")
    p.set_defaults(fn=cmd_synth)

    for name, fn, cls, what in (("tokenizer", cmd_tokenizer, TokenizerConfig, "train a byte-level BPE tokenizer"),
                                ("tokenize", cmd_tokenize, TokenizeConfig, "write token shards")):
        p = sub.add_parser(name, help=what)
        p.add_argument("items", nargs="*", metavar="FILE or key=value", help="input files or globs, and config keys")
        config_args(p, cls, aliases=True, overrides=False)
        p.set_defaults(fn=fn, overrides=[])

    for name, fn, cls, what in (
            ("dedup", cmd_dedup, "slmforge.curate.dedup:DedupConfig",
             "remove exact and near-duplicate documents (MinHash LSH)"),
            ("filter", cmd_filter, "slmforge.curate.filters:FilterConfig",
             "Gopher quality rules and n-gram decontamination")):
        p = sub.add_parser(name, help=what)
        config_args(p, cls, dry_run=True)
        p.add_argument("--shard-index", type=int, default=None, help="run this shard only (a job-array task)")
        p.add_argument("--num-shards", type=int, default=None,
                       help="shards of the input (default 1; with executor=ray, one per CPU of the Ray cluster)")
        if name == "dedup":
            p.add_argument("--stage", default="all", choices=["all", "signatures", "clusters", "write"],
                           help="as a job array: signatures per shard, clusters once, then write per shard")
        p.set_defaults(fn=fn)
