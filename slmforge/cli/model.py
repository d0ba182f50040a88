"""Subcommands that use a trained model: generate, chat, serve, export, import, eval."""

from __future__ import annotations

from slmforge.config import merge, parse_overrides


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


def cmd_serve(args) -> None:
    from slmforge.serve.server import serve

    serve(args.checkpoint, host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
          max_batch=args.max_batch)


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


def register(sub) -> None:
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

    p = sub.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models)")
    p.add_argument("checkpoint", help="run folder or checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this bearer key (default: $SLMFORGE_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the name clients ask for (default: the run's name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together in one batch")
    p.set_defaults(fn=cmd_serve)

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

