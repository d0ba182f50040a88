"""Interactive chat in the terminal, using the chat template the tokenizer reserves tokens for."""

from __future__ import annotations

import sys

from slmforge.serve.generate import stream_text


def chat(model, tokenizer, system: str = "", max_new_tokens: int = 256, temperature: float = 0.7,
         top_k: int = 50, top_p: float = 0.95, input_fn=None, out=None, tools: str = "") -> list[dict]:
    """Read user turns until EOF or '/exit'; '/reset' clears the history. Returns the transcript.
    ``tools="calculator"``: the calculator in decoding (``tools.py``).

    ``input_fn`` and ``out`` default to ``input`` and ``sys.stdout`` as they are when called (not when imported)."""
    input_fn, out = input_fn or input, out or sys.stdout
    messages = [{"role": "system", "content": system}] if system else []
    out.write("slmforge chat — /reset clears the history, /exit or Ctrl-D quits\n")
    while True:
        try:
            user = input_fn("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return messages
        if user.strip() == "/exit":
            return messages
        if user.strip() == "/reset":
            messages = messages[:1] if system else []
            continue
        messages.append({"role": "user", "content": user})
        # Content as text: a user typing <|system|> cannot forge a turn (Tokenizer.encode_chat).
        prompt = tokenizer.encode_chat(messages, add_generation_prompt=True)
        out.write("model> ")
        reply = []
        for piece in stream_text(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p,
                                 new_document=True, tools=tools,
                                 stop_ids=[tokenizer.token_id("<|end|>"), tokenizer.token_id("<|user|>")]):
            reply.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
