"""The lm-eval-harness adapter on tasks defined over local files (no network)."""

import json
import math
import os
from pathlib import Path

import pytest

from tests.conftest import needs_data
from tests.eval.conftest import GSM8K

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
lm_eval = pytest.importorskip("lm_eval")

TEXTS = ["The cat sat on the mat. " * 12, "Question: Tom has 3 apples.\nAnswer: 3",
         "Ünïcödé bytes count too: € and ✓."]


def _write_tasks(root: Path) -> None:
    gsm8k_yaml = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    problems = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()[:3]]
    (root / "gsm8k_test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    (root / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (root / "mc.jsonl").write_text("".join(json.dumps({"q": f"Is {n} even?", "label": n % 2}) + "\n" for n in range(4)))
    # The installed gsm8k task itself (prompt, filters, metric), over local files and with 12 new tokens.
    (root / "gsm8k_local.yaml").write_text(f"""include: {gsm8k_yaml}
task: gsm8k_local
tag: []
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    train: {GSM8K / "train.jsonl"}
    test: {root / "gsm8k_test.jsonl"}
generation_kwargs:
  until: ["Question:", "</s>", "<|im_end|>"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: 12
""")
    (root / "texts_local.yaml").write_text(f"""task: texts_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "texts.jsonl"}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
  - metric: word_perplexity
""")
    (root / "mc_local.yaml").write_text(f"""task: mc_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{q}}}}\\nAnswer:"
doc_to_choice: ["yes", "no"]
doc_to_target: label
metric_list:
  - metric: acc
""")


@needs_data(GSM8K / "test.jsonl", GSM8K / "train.jsonl")
def test_simple_evaluate_matches_our_scorers(eval_run, loaded, tmp_path):
    import slmforge.eval.harness  # noqa: F401  registers "slmforge"
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from slmforge.eval import gsm8k
    from slmforge.eval.perplexity import stream_nats

    _write_tasks(tmp_path)
    out = simple_evaluate(model="slmforge", model_args={"checkpoint": str(eval_run), "batch_size": 2},
                          tasks=["gsm8k_local", "texts_local", "mc_local"],
                          task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    results, samples = out["results"], out["samples"]
    assert 0 <= results["mc_local"]["acc,none"] <= 1 and len(samples["mc_local"]) == 4

    # generate_until: lm-eval's gsm8k prompts, generations and filters equal ours, record for record.
    model, tok = loaded
    ours = gsm8k.evaluate_model(model, tok, gsm8k.GSM8KConfig(limit=3, max_new_tokens=12, out_dir=str(tmp_path / "o")),
                                eval_run, progress=False)
    records = [json.loads(line) for line in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    theirs = sorted(samples["gsm8k_local"], key=lambda s: (s["doc_id"], s["filter"]))
    for s in theirs:
        r = records[s["doc_id"]]
        (context, gen_kwargs), = s["arguments"]
        assert context == r["prompt"] and gen_kwargs["until"] == list(gsm8k.STOP)
        assert s["resps"] == [[r["generation"]]]
        assert s["filtered_resps"] == [r[s["filter"]]["answer"]]
    for name in gsm8k.FILTERS:
        assert results["gsm8k_local"][f"exact_match,{name}"] == ours["metrics"][name]["exact_match"]

    # loglikelihood_rolling: disjoint windows with EOS first, exactly our perplexity with stride = seq_len.
    seq_len = model.cfg.max_seq_len
    nats = sum(stream_nats(model, [tok.eos_id] + tok.encode(t), seq_len, seq_len)[0] for t in TEXTS)
    num_bytes = sum(len(t.encode()) for t in TEXTS)
    assert results["texts_local"]["bits_per_byte,none"] == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-5)


def test_loglikelihood_and_greedy_flag(eval_run, loaded):
    import torch

    from slmforge.eval.harness import SlmforgeLM

    lm = SlmforgeLM(checkpoint=str(eval_run), batch_size=3)
    model, tok = loaded
    context, continuation = "Question: Tom has 3 apples.", " Answer: 3"
    ids = [tok.eos_id] + tok.encode(context + continuation)
    num = len(ids) - 1 - len(tok.encode(context))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].float(), -1)
    expected = sum(logp[p, ids[p + 1]].item() for p in range(len(ids) - 1 - num, len(ids) - 1))

    class Req:  # lm-eval's Instance exposes .args
        def __init__(self, *args):
            self.args = args

    (got, greedy), (short, _), (empty, _) = lm.loglikelihood([Req(context, continuation), Req("Q", "A"),
                                                              Req("", "Question")], disable_tqdm=True)
    assert got == pytest.approx(expected, abs=1e-4) and isinstance(greedy, bool)
    assert short < 0 and empty < 0
    # Token level: the argmax continuation is flagged greedy, another one is not.
    ctx = ids[:-num]
    with torch.no_grad():
        best = int(model(torch.tensor([ctx]))[0][0, -1].argmax())
    flags = [g for _, g in lm._loglikelihood_tokens([(("a", "b"), ctx, [best]), (("a", "c"), ctx, [(best + 1) % 300])])]
    assert flags == [True, False]
