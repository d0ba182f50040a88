"""The calculator in decoding (serve/tools.py, GSM8K's ``<<expr=result>>``): results spliced in by scripted and by
trained models, batched equal to alone, unsafe expressions never evaluated, and the switch in generate, chat,
serve and eval gsm8k."""

import json
import re
from fractions import Fraction

import httpx
import pytest
import torch

from slmforge.cli import main
from slmforge.config import AttnConfig, ModelConfig
from slmforge.eval import gsm8k
from slmforge.model.lm import LM
from slmforge.serve import generate, tools, worker
from slmforge.serve.chat import chat
from slmforge.serve.generate import generate_batch, generate_batch_ref
from slmforge.serve.server import build_app, running_server
from slmforge.serve.tools import Calculator, calculate, format_result, make_tool
from slmforge.serve.worker import Job, Worker
from tests.conftest import memorize

PREFIX = "Tom has <<3*4="
JUNK = "99>>99 pens and 7 cats"
# The memorized text: every annotation has a wrong result, which the calculator replaces.
TEXT = "Tom has <<3*4=99>>99 pens and Ann has <<7+8=99>>99 cats."


def scripted(monkeypatch, ids: list[int], where=generate, name: str = "sample_next") -> None:
    """Replace the sampler: step i of a decoding "samples" ``ids[i]`` for every row, whatever the logits."""
    step = iter(range(10**6))

    def sample(logits, *args, **kw):
        i = next(step)
        return torch.full((logits.shape[0],), ids[min(i, len(ids) - 1)], dtype=torch.long)

    monkeypatch.setattr(where, name, sample)


# ---------------------------------------------------------------- 1. a scripted model


def test_scripted_call_gets_the_result_spliced_in(loaded, monkeypatch):
    model, tok = loaded
    prefix, junk = tok.encode(PREFIX), tok.encode(JUNK)
    forced = tok.encode("12>>")
    prompt = [[tok.eos_id] + tok.encode("Question: x\nAnswer:")]
    n = len(prefix) + len(junk)
    scripted(monkeypatch, prefix + junk)
    plain = generate_batch(model, prompt, n)
    scripted(monkeypatch, prefix + junk)
    calc = generate_batch(model, prompt, n, tool=Calculator(tok))
    assert tok.decode(plain[0]) == PREFIX + JUNK
    # The forced "12>>" takes the steps where the model wrote "99>>"; then the model goes on with its own tokens.
    assert calc[0] == prefix + forced + junk[len(forced):]
    assert tok.decode(calc[0]).startswith("Tom has <<3*4=12>>")
    # The text paths (generate, chat) and the server's worker splice it in the same way.
    scripted(monkeypatch, prefix + junk)
    assert generate.generate(model, tok, "Question: x", n, tools="calculator", new_document=True) == \
        tok.decode(calc[0])
    scripted(monkeypatch, prefix + junk + [tok.token_id("<|end|>")])
    lines = ["how many?"]
    transcript = chat(model, tok, max_new_tokens=n + 1, input_fn=lambda _: _next_line(lines), out=_Sink(),
                      tools="calculator")
    assert transcript[-1]["content"] == tok.decode(calc[0]).strip()
    scripted(monkeypatch, prefix + junk, worker, "_sample")
    events = []
    with torch.inference_mode():
        Worker(model, tok).run_batch([Job(prompt[0], n, events.append, stop_ids=(tok.eos_id,),
                                          tool=Calculator(tok))])
    assert "".join(e[1] for e in events if e[0] == "text") == tok.decode(calc[0])


def _next_line(lines: list[str]) -> str:
    if not lines:
        raise EOFError
    return lines.pop(0)


class _Sink:
    def write(self, text):
        pass

    def flush(self):
        pass


# ---------------------------------------------------------------- 3. what is never evaluated


@pytest.mark.parametrize("expr", ["__import__('os')", "1/0", "9**99999", "abc", "3*", "", "1" * 70 + "+1",
                                  "99999999*99999999*99999999", "2 3", "(1", "1e5"])
def test_unsafe_or_malformed_calls_are_left_to_the_model(expr, monkeypatch):
    evaluated = []
    monkeypatch.setattr(tools, "safe_eval", lambda e, **kw: evaluated.append(e) or Fraction(0))
    if any(c.isalpha() or c in "'_" for c in expr) or not expr or len(expr) > tools.MAX_EXPR_CHARS:
        assert calculate(f"x <<{expr}=") is None and not evaluated  # never reaches the evaluator
    monkeypatch.undo()
    assert calculate(f"x <<{expr}=") is None


def test_unsafe_call_in_decoding_forces_nothing(loaded, monkeypatch):
    model, tok = loaded
    prompt = [[tok.eos_id] + tok.encode("Answer:")]
    for expr in ("__import__('os')", "1/0", "9**99999", "abc"):
        ids = tok.encode(f" <<{expr}=") + tok.encode(JUNK)
        scripted(monkeypatch, ids)
        assert generate_batch(model, prompt, len(ids), tool=Calculator(tok)) == [ids]


def test_results_are_written_as_the_annotations_write_them():
    cases = {"3*4": "12", "4+5+8": "17", "2-5": "-3", "(1+2)*3": "9", " 3 * 4 ": "12", "0.5*4": "2",
             "5/2": "2.5", "1/3": "0.3333", "2/3": "0.6667", "-1/8": "-0.125", "10/4": "2.5", "1/100000": "0",
             "123456789*1000000": "123456789000000"}
    assert {e: calculate(f"a <<{e}=") for e in cases} == cases
    assert format_result(Fraction(-7, 2)) == "-3.5"
    # Only a call that ends the text, after the last "<<", is made.
    assert calculate("<<3*4=12>>12") is None and calculate("<<3*4=12>>12 and <<2+2=") == "4"
    with pytest.raises(ValueError, match="tools='calc': unknown tool; expected calculator"):
        make_tool("calc", None)
    assert make_tool("", None) is None


# ---------------------------------------------------------------- 2. batched equals unbatched


@pytest.fixture(scope="module")
def trained(loaded):
    """A 1-layer model that memorized TEXT (its annotations all say 99), on the eval run's tokenizer."""
    _, tok = loaded
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_layers=1, max_seq_len=64,
                           attn=AttnConfig(num_heads=4, num_kv_heads=2)))
    ids = torch.tensor([[tok.eos_id] + tok.encode(TEXT) + [tok.eos_id]])
    _, loss = memorize(model, ids)
    model.eval()
    assert loss.item() < 0.05
    return model, tok


def test_batched_calculator_equals_each_prompt_alone(trained):
    model, tok = trained
    # Row 1 ends (EOS) after two tokens, before the others' calls: forcing must follow rows as the batch shrinks.
    starts = ["Tom", TEXT[:-1], "Tom has <<3*4=99>>99 pens", "Tom has <<3*4=99>>99 pens and Ann"]
    prompts = [[tok.eos_id] + tok.encode(s) for s in starts]
    calc = Calculator(tok)
    plain = [tok.decode(r) for r in generate_batch(model, prompts, 24, eos_id=tok.eos_id)]
    batched = generate_batch(model, prompts, 24, eos_id=tok.eos_id, tool=calc)
    alone = [generate_batch(model, [p], 24, eos_id=tok.eos_id, tool=calc)[0] for p in prompts]
    ref = generate_batch_ref(model, prompts, 24, eos_id=tok.eos_id, tool=calc)  # full recompute, one by one
    assert batched == alone == ref
    texts = [tok.decode(r) for r in batched]
    # Without the tool the model writes its memorized 99s; with it each row gets its own results spliced in...
    assert "<<3*4=99>>" in plain[0] and "<<7+8=99>>" in plain[3]
    assert "<<3*4=12>>" in texts[0] and "<<7+8=15>>" in texts[2] and "<<7+8=15>>" in texts[3]
    # ... and every finished call it can evaluate carries the right result (one it cannot, e.g. 7++8, is the model's).
    calls = [m for t in texts for m in re.findall(r"<<([^<>=]*)=([^<>]*)>>", t)]
    assert len(calls) >= 3 and all(calculate(f"<<{e}=") in (None, r) for e, r in calls)


def test_tools_off_is_unchanged_and_a_silent_tool_changes_nothing(trained):
    model, tok = trained
    prompts = [[tok.eos_id] + tok.encode(s) for s in ("Tom", "Ann has", "7")]
    plain = generate_batch(model, prompts, 20, eos_id=tok.eos_id)
    assert generate_batch(model, prompts, 20, eos_id=tok.eos_id, tool=lambda new: []) == plain
    sampled = [generate_batch(model, prompts, 20, temperature=1.0, generator=torch.Generator().manual_seed(5),
                              **kw) for kw in ({}, {"tool": lambda new: []})]
    assert sampled[0] == sampled[1]


def test_server_setting_calculator(trained):
    model, tok = trained
    answers = []
    for setting in ("", "calculator"):
        with running_server(build_app(model, tok, "m", tools=setting)) as url:
            body = {"model": "m", "prompt": "Tom has", "max_tokens": 20, "temperature": 0}
            answers.append(httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"])
    assert "<<3*4=99>>" in answers[0] and "<<3*4=12>>" in answers[1]
    assert answers[1] == generate.generate(model, tok, "Tom has", 20, temperature=0, tools="calculator")


# ---------------------------------------------------------------- 4. the switch on the command line and in eval


def test_eval_gsm8k_tools_reach_generation_and_resume_settings(eval_run, loaded, tmp_path, monkeypatch):
    model, tok = loaded
    seen = []

    def stub(model, prompts, max_new_tokens, eos_id=None, stop=None, tool=None, **kw):
        seen.append(tool)
        return [tok.encode(" <<3*4=") + (tool(tok.encode(" <<3*4=")) if tool else []) + tok.encode("12\n#### 12")
                for _ in prompts]

    monkeypatch.setattr(gsm8k, "generate_batch", stub)
    cfg = gsm8k.GSM8KConfig(data="procedural", limit=2, num_fewshot=0, max_new_tokens=20, out_dir=str(tmp_path),
                            tools="calculator")
    gsm8k.evaluate_model(model, tok, cfg, eval_run, progress=False)
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all(isinstance(t, Calculator) for t in seen)
    assert all(r["settings"]["tools"] == "calculator" and "<<3*4=12>>12" in r["generation"] for r in records)
    # A record written without the calculator is not reused with it.
    partial = tmp_path / "samples.partial.jsonl"
    partial.write_text(json.dumps({**records[0], "generation": "#### 7",
                                   "settings": {**records[0]["settings"], "tools": ""}}) + "\n")
    gsm8k.evaluate_model(model, tok, cfg, eval_run, progress=False)
    assert json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])["generation"] != "#### 7"


def test_cli_tools_switch(eval_run, capsys):
    assert main(["generate", str(eval_run), "prompt=Tom has", "max_new_tokens=3", "tools=calculator"]) == 0
    assert main(["eval", "gsm8k", str(eval_run), "data=procedural", "limit=1", "num_fewshot=0", "max_new_tokens=3",
                 "tools=calculator", f"out_dir={eval_run / 'eval' / 'calc'}"]) == 0
    summary = json.loads((eval_run / "eval" / "calc" / "summary.json").read_text())
    assert summary["config"]["tools"] == "calculator"
    capsys.readouterr()
    for cmd in (["generate", str(eval_run), "prompt=x"], ["chat", str(eval_run)], ["serve", str(eval_run)]):
        assert main(cmd + ["tools=calc"]) == 2
        err = capsys.readouterr().err.strip()
        assert "tools='calc': unknown tool; expected calculator" in err and "\n" not in err
