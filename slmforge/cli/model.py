"""Subcommands that use a trained model: generate, chat, serve, export, import, eval.

The first positional argument is the run folder (or a checkpoint folder); everything else is ``key=value``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

from slmforge.cli.common import config_args, load_args, split_items
from slmforge.config import check_min


@dataclass
class GenerateConfig:
    """``slmforge generate RUN prompt="Question: Tom" stop=Question: temperature=0``."""

    prompt: str = ""  # required; kept verbatim (not read as YAML)
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 50
    top_p: float = 0.95
    stop: list[str] = field(default_factory=list)  # stop strings, never printed: stop=Question: or stop=[a, b]
    seed: int | None = None
    tools: str = ""  # calculator: evaluate <<expr= in decoding (GSM8K's calculator); "" = off

    def validate(self, prefix: str = "") -> None:
        if not self.prompt:
            raise ValueError(f'{prefix}prompt is required: give prompt="..."')
        _check_tools(self, prefix)
        check_min(self, prefix, 1, "max_new_tokens")
        check_min(self, prefix, 0, "temperature top_k")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{prefix}top_p={self.top_p}: expected a fraction in (0, 1]")


@dataclass
class ChatConfig:
    system: str = ""  # system prompt
    max_new_tokens: int = 128
    temperature: float = 0.7
    tools: str = ""  # calculator: evaluate <<expr= in decoding (GSM8K's calculator); "" = off

    def validate(self, prefix: str = "") -> None:
        check_min(self, prefix, 1, "max_new_tokens")
        check_min(self, prefix, 0, "temperature")
        _check_tools(self, prefix)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # address to bind (loopback only by default)
    port: int = 8000
    api_key: str = ""  # require this bearer key; "" = $SLMFORGE_API_KEY, else none
    model_name: str = ""  # the name clients ask for; "" = the run's name
    max_batch: int = 8  # requests decoded together in one batch
    max_body_bytes: int = 1_000_000  # larger request bodies get 413 before they are read
    max_queue: int = 64  # requests waiting for the model beyond this get 429 with Retry-After
    request_timeout_s: float = 60.0  # an answer ends here with finish_reason "length" and the text so far
    max_stop: int = 4  # stop strings per request (400 beyond)
    max_stop_chars: int = 64  # characters per stop string (400 beyond)
    tools: str = ""  # calculator: evaluate <<expr= in every answer (GSM8K's calculator); "" = off
    batching: Literal["continuous", "static"] = "continuous"  # continuous: requests join the running batch

    def validate(self, prefix: str = "") -> None:
        check_min(self, prefix, 1, "max_batch max_body_bytes max_queue max_stop max_stop_chars")
        _check_tools(self, prefix)
        if not self.request_timeout_s > 0:
            raise ValueError(f"{prefix}request_timeout_s={self.request_timeout_s}: expected seconds > 0")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"{prefix}port={self.port}: expected a TCP port, 0-65535")


def _check_tools(cfg, prefix: str) -> None:
    from slmforge.serve.tools import check_tools

    check_tools(cfg.tools, prefix)


@dataclass
class FolderConfig:
    """export and import: where to write."""

    out: str = ""  # output folder (required)

    def validate(self, prefix: str = "") -> None:
        if not self.out:
            raise ValueError(f"{prefix}out is required: give out=FOLDER")


def cmd_generate(args) -> None:
    from slmforge.checkpoint import load_for_inference
    from slmforge.serve.generate import stream_text

    cfg = load_args(args)
    model, tok, _ = load_for_inference(args.checkpoint)
    context = model.cfg.max_seq_len  # stream_text refuses max_new_tokens >= context (a one-line error)
    num_prompt = 1 + len(tok.encode(cfg.prompt))  # EOS, then the prompt (stream_text's new_document)
    if num_prompt + cfg.max_new_tokens > context > cfg.max_new_tokens:
        print(f"note: the prompt ({num_prompt} tokens) + max_new_tokens={cfg.max_new_tokens} exceed the context "
              f"length {context}; only the prompt's last {context - cfg.max_new_tokens} tokens are used",
              file=sys.stderr)
    for piece in stream_text(model, tok, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                             stop=cfg.stop, seed=cfg.seed, tools=cfg.tools):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args) -> None:
    from slmforge.checkpoint import load_for_inference
    from slmforge.serve.chat import chat

    cfg = load_args(args)
    model, tok, _ = load_for_inference(args.checkpoint)
    chat(model, tok, system=cfg.system, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
         tools=cfg.tools)


def cmd_serve(args) -> None:
    from slmforge.serve.server import serve

    cfg = load_args(args)
    serve(args.checkpoint, host=cfg.host, port=cfg.port, api_key=cfg.api_key or None,
          model_name=cfg.model_name or None, max_batch=cfg.max_batch, max_body_bytes=cfg.max_body_bytes,
          max_queue=cfg.max_queue, request_timeout_s=cfg.request_timeout_s, max_stop=cfg.max_stop,
          max_stop_chars=cfg.max_stop_chars, tools=cfg.tools, batching=cfg.batching)


def cmd_export(args) -> None:
    from slmforge.serve.hf import export_hf

    print(f"LlamaForCausalLM folder -> {export_hf(args.checkpoint, load_args(args).out)}")


def cmd_import(args) -> None:
    from slmforge.serve.hf import import_hf_run

    print(f"run folder -> {import_hf_run(args.checkpoint, load_args(args).out)}")


def cmd_eval_gsm8k(args) -> None:
    from slmforge.eval.gsm8k import evaluate
    from slmforge.eval.strata import format_strata

    summary = evaluate(args.run_dir, load_args(args))
    for name, m in summary["metrics"].items():
        print(f"{name}: exact_match {m['exact_match']:.4f} ({summary['num_problems']} problems)")
    if summary["num_problems"]:
        print("\n".join(format_strata(summary["strata"])))


def cmd_eval_ppl(args) -> None:
    from slmforge.eval.perplexity import evaluate

    # key=value items that are not files are overrides (`slmforge eval ppl RUN a.txt b.txt stride=128`).
    files, overrides = split_items(args.items)
    result = evaluate(args.run_dir, files, load_args(args, overrides))
    for name, m in {**result["files"], "total": result["total"]}.items():
        print(f"{name}: loss {m['loss']:.4f}, perplexity {m['perplexity']:.2f}, bits/byte {m['bits_per_byte']:.4f}")


def cmd_eval_niah(args) -> None:
    from slmforge.cli.niah import print_grid
    from slmforge.eval.niah import evaluate

    print_grid(evaluate(args.run_dir, load_args(args)))


def register(sub) -> None:
    for name, fn, cls, what in (
            ("generate", cmd_generate, GenerateConfig, "generate text with a trained model"),
            ("chat", cmd_chat, ChatConfig, "chat with a trained model in the terminal"),
            ("serve", cmd_serve, ServeConfig, "an OpenAI-compatible server (/v1/chat/completions, /v1/completions, "
                                              "/v1/models)"),
            ("export", cmd_export, FolderConfig, "write a run (attention-only) as a Hugging Face LlamaForCausalLM "
                                                 "folder (out=FOLDER)"),
            ("import", cmd_import, FolderConfig, "turn a Hugging Face Llama folder (e.g. SmolLM2) into a run folder "
                                                 "(out=FOLDER)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("checkpoint", help="the Hugging Face folder (config.json, *.safetensors, tokenizer.json)"
                       if name == "import" else "run folder or checkpoint folder")
        config_args(p, cls, recipe=None, aliases=True)
        p.set_defaults(fn=fn)

    kinds = sub.add_parser("eval", help="evaluate a run: gsm8k (lm-eval's gsm8k scoring), ppl (bits per byte) or niah (long-context recall)")
    kinds = kinds.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser("gsm8k", help="GSM8K or the run's procedural arithmetic (data=procedural), n-shot CoT")
    p.add_argument("run_dir")
    config_args(p, "slmforge.eval.gsm8k:GSM8KConfig", recipe=None)
    p.set_defaults(fn=cmd_eval_gsm8k)
    p = kinds.add_parser("ppl", help="loss, perplexity and bits per byte on text files (strided windows)")
    p.add_argument("run_dir")
    p.add_argument("items", nargs="+", metavar="FILE or key=value", help="text files, then e.g. stride=128")
    config_args(p, "slmforge.eval.perplexity:PerplexityConfig", recipe=None, overrides=False)
    p.set_defaults(fn=cmd_eval_ppl, overrides=[])
    p = kinds.add_parser("niah", help="needle-in-a-haystack recall over lengths x depths (heatmap and JSON)")
    p.add_argument("run_dir")
    config_args(p, "slmforge.eval.niah:NiahEvalConfig", recipe=None)
    p.set_defaults(fn=cmd_eval_niah)
