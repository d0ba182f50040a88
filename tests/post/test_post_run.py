"""sft / orpo / dpo end to end on a tiny run: the new run folder, exact resume, the DPO reference, bad inputs."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from slmforge.checkpoint import load_for_inference
from slmforge.cli import main
from slmforge.post.chat_data import SFTLoader, encode_conversations
from slmforge.post.prefs import Pair, write_pairs
from slmforge.post.run import finetune_config, post_train, sft_source
from slmforge.runs import MetricsLog, RunDir
from tests.conftest import SHARED_DATA, make_run, needs_data

FAST = ["train.max_steps=6", "train.ckpt_every=3", "train.eval_every=3", "train.batch_size=4", "train.eval_batches=2",
        "train.warmup_steps=1", "max_len=64"]


@pytest.fixture
def base(tmp_path):
    return make_run(tmp_path, "base")


def _pairs_file(path, n=24):
    pairs = [Pair([{"role": "user", "content": f"What is {i} + {i}?"}], f"{i} + {i} = {2 * i}.\n#### {2 * i}",
                  f"I think it is {i + 3}.\n#### {i + 3}") for i in range(n)]
    write_pairs(path, pairs)
    return path


def _chats_file(path, n=40):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Add {i} and 3."},
                                      {"role": "assistant", "content": f"{i} + 3 = {i + 3}.\n#### {i + 3}"}]})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _losses(run_dir, key="loss"):
    return [r[key] for r in MetricsLog(RunDir.at(run_dir).metrics).read() if key in r]


def test_sft_makes_a_run_folder_that_inference_loads(base, tmp_path):
    cfg = finetune_config(base, "sft", [f"data={_chats_file(tmp_path / 'c.jsonl')}", *FAST])
    assert cfg.name == "base_sft" and cfg.finetune.method == "sft" and cfg.train.init_from == str(base)
    assert cfg.model == load_for_inference(base)[2].model
    result = post_train(cfg, progress=False)
    assert result.steps == 6 and math.isfinite(result.val_loss)
    model, tok, saved = load_for_inference(cfg.run_dir)
    assert saved.finetune.method == "sft" and saved.train.init_from == str(base)
    # The held-out problems of the base run travel with it, for `eval gsm8k data=procedural`.
    assert (cfg.run_dir / "data" / "test.jsonl").read_bytes() == (base / "data" / "test.jsonl").read_bytes()
    # Weights moved away from the starting point (init_from loaded them, training changed them).
    start = load_for_inference(base)[0].state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_init_from_loads_the_source_weights(base):
    from slmforge.config import load_config
    from slmforge.model.lm import LM
    from slmforge.train.task import init_checkpoint, load_init

    cfg = load_config(base / "config.yaml")
    model = LM(cfg.model)
    load_init(model, init_checkpoint(str(base)), str(base))
    for k, v in load_for_inference(base)[0].state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    other = LM(load_config(base / "config.yaml", ["model.d_model=48"]).model)
    with pytest.raises(ValueError, match="do not fit this model"):
        load_init(other, init_checkpoint(str(base)), str(base))
    with pytest.raises(ValueError, match="train.init_from=.*no such run folder"):
        init_checkpoint(str(base / "missing"))


@pytest.mark.parametrize("method", ["sft", "orpo"])
def test_a_killed_run_resumes_exactly(base, tmp_path, method):
    data = f"data={(_chats_file if method == 'sft' else _pairs_file)(tmp_path / 'd.jsonl')}"
    extra = ["val_fraction=0.2"]
    whole = finetune_config(base, method, [data, *extra, *FAST, "name=whole"])
    post_train(whole, progress=False)
    # The same run killed (SIGKILL) right after its step-3 checkpoint, then resumed.
    argv = [sys.executable, "-m", "slmforge", method, str(base), data, *extra, *FAST, "name=half"]
    env = {**os.environ, "SLMFORGE_FAULT": "ckpt:latest@3"}
    assert subprocess.run(argv, env=env, capture_output=True).returncode == -signal.SIGKILL
    again = finetune_config(base, method, [data, *extra, *FAST, "name=half"])
    assert len(_losses(again.run_dir)) == 3
    post_train(again, resume=True, progress=False)
    assert _losses(again.run_dir) == _losses(whole.run_dir) and len(_losses(whole.run_dir)) == 6
    assert _losses(again.run_dir, "val_loss") == _losses(whole.run_dir, "val_loss")


def test_orpo_logs_preference_metrics_and_plots_them(base, tmp_path):
    cfg = finetune_config(base, "orpo", [f"data={_pairs_file(tmp_path / 'p.jsonl')}", "val_fraction=0.2", *FAST])
    post_train(cfg, progress=False)
    records = MetricsLog(RunDir.of(cfg).metrics).read()
    for key in ("nll", "or_loss", "reward_margin", "reward_accuracy", "chosen_logps", "rejected_logps"):
        assert all(key in r for r in records)
    assert "val_reward_accuracy" in records[-1] and 0 <= records[-1]["val_reward_accuracy"] <= 1
    assert (cfg.run_dir / "preferences.png").stat().st_size > 10_000


def test_dpo_starts_at_log2_against_its_cached_reference(base, tmp_path):
    cfg = finetune_config(base, "dpo", [f"data={_pairs_file(tmp_path / 'p.jsonl')}", "val_fraction=0.2", *FAST,
                                        "train.max_steps=1", "train.lr_peak=0"])
    post_train(cfg, progress=False)
    (record,) = MetricsLog(RunDir.of(cfg).metrics).read()
    # Policy == reference at step 0: every DPO logit is 0, the loss -log sigmoid(0) = log 2, no reward margin.
    assert record["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert record["reward_margin"] == pytest.approx(0, abs=1e-6)
    assert (cfg.run_dir / "reference_logps.npz").is_file()


def test_packed_sft_loss_equals_the_conversations_one_by_one(loaded):
    model, tok = loaded
    convs = [[{"role": "user", "content": f"Add {i}."}, {"role": "assistant", "content": f"#### {i + 1}"}]
             for i in range(6)]
    examples, _ = encode_conversations(tok, convs, 64)
    x, y, doc = next(iter(SFTLoader(examples, 64, 1, seed=0, pad_id=tok.pad_id, shuffle=False)))
    in_row = int(doc.max()) + 1
    assert in_row >= 2  # several conversations share the row
    with torch.no_grad():
        packed = model(x, targets=y, doc=doc)[1]
    # The loader's shuffle=False order is the examples' order.
    torch.testing.assert_close(packed.double(), _one_by_one(model, examples[:in_row]).double(), rtol=0, atol=1e-5)


def _one_by_one(model, examples):
    total = count = 0.0
    for ex in examples:
        ids = torch.as_tensor(ex.ids, dtype=torch.long)[None]
        target = torch.full_like(ids, -100)
        target[0, :-1] = torch.where(torch.as_tensor(ex.train[1:]), ids[0, 1:], -100)
        n = int((target != -100).sum())
        with torch.no_grad():
            total += float(model(ids, targets=target)[1]) * n
        count += n
    return torch.tensor(total / count)


def test_the_sft_loss_reads_assistant_tokens_only(loaded):
    model, tok = loaded
    conv = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "2 + 3 = 5.\n#### 5"}]
    (ex,), _ = encode_conversations(tok, [conv], 64)
    x, y, doc = next(iter(SFTLoader([ex], 64, 1, seed=0, pad_id=tok.pad_id, packing=False, shuffle=False)))
    with torch.no_grad():
        loss = model(x, targets=y)[1]
        logp = torch.log_softmax(model(x)[0][0].double(), -1)
    n = len(ex.ids)
    trained = [t for t in range(n - 1) if ex.train[t + 1]]
    assert tok.decode(x[0, [t + 1 for t in trained]].tolist(), skip_special=False) == "2 + 3 = 5.\n#### 5<|end|>"
    manual = -sum(float(logp[t, int(x[0, t + 1])]) for t in trained) / len(trained)
    assert float(loss) == pytest.approx(manual, abs=1e-5)
    # So no prompt position's target is read: the mean runs over the assistant tokens (and its <|end|>) only.



@pytest.mark.parametrize("args, message", [
    (["sft", "{tmp}/nothing", "data=procedural"], "not a trained run folder"),
    (["sft", "{base}", "data={tmp}/no_assistant.jsonl"], "no_assistant.jsonl:1: .*assistant"),
    (["orpo", "{base}", "data={tmp}/empty_side.jsonl"], "empty_side.jsonl:1: .*empty"),
    (["orpo", "{base}"], "finetune.data is empty"),
    (["sft", "{base}", "data=procedural", "overlong=skip", "num_examples=20"], "finetune.max_len=64"),
    (["sft", "{untrained}", "data=procedural"], "no checkpoint found"),
    (["sft", "{base}", "data=gsm8k:{tmp}/test.jsonl"], "train split"),
])
def test_bad_inputs_are_one_line_errors(base, tmp_path, capsys, args, message):
    (tmp_path / "no_assistant.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (tmp_path / "empty_side.jsonl").write_text(json.dumps({"prompt": "hi", "chosen": " ", "rejected": "no"}) + "\n")
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.yaml").write_text((base / "config.yaml").read_text())
    argv = [a.format(tmp=tmp_path, base=base, untrained=untrained) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err
    # Nothing left half-written: no run folder for the refused stage.
    assert not [p.name for p in base.parent.iterdir() if p.name.startswith(("base_", "untrained_", "nothing_"))]


def test_a_recipes_post_stages_run_after_training_and_are_skipped_when_done(tmp_path):
    from dataclasses import replace

    from slmforge.config import PostConfig
    from slmforge.pipeline import run
    from slmforge.post.run import post_done
    from tests.conftest import tiny_run_config

    chats = _chats_file(tmp_path / "c.jsonl")
    cfg = tiny_run_config(tmp_path, name="base", max_steps=4)
    stages = [PostConfig(method="sft", data=[str(chats)], max_len=64, train={"max_steps": 2, "batch_size": 4}),
              PostConfig(method="sft", name="again", data=[str(chats)], max_len=64, train={"max_steps": 2})]
    cfg = replace(cfg, post=stages)
    assert not post_done(cfg)
    run(cfg)
    first, second = RunDir.at(tmp_path / "base_sft"), RunDir.at(tmp_path / "again")
    assert json.loads(first.train_result.read_text())["steps"] == 2
    # The second stage starts from the first, not from the base.
    assert load_for_inference(second.root)[2].train.init_from == str(first.root)
    assert post_done(cfg)
    mtime = first.train_result.stat().st_mtime_ns
    run(cfg)
    assert first.train_result.stat().st_mtime_ns == mtime


def test_sft_starts_from_a_hugging_face_folder(base, tmp_path):
    pytest.importorskip("transformers")
    from slmforge.serve.hf import export_hf

    hf = export_hf(base, tmp_path / "hf_model")
    cfg = finetune_config(hf, "sft", [f"data={_chats_file(tmp_path / 'c.jsonl')}", *FAST, "train.max_steps=2"])
    init = RunDir.at(tmp_path / "hf_model_sft" / "init")
    assert cfg.train.init_from == str(init.root) and cfg.model == load_for_inference(base)[2].model
    post_train(cfg, progress=False)
    assert load_for_inference(cfg.run_dir)[2].train.init_from == str(init.root)


def test_slmforge_post_runs_a_recipes_chain_from_a_source(base, tmp_path, capsys):
    chats = _chats_file(tmp_path / "c.jsonl")
    recipe = tmp_path / "post.yaml"
    recipe.write_text(f"post:\n  - method: sft\n    data: [{chats}]\n    max_len: 64\n"
                      f"    train: {{max_steps: 2, batch_size: 4}}\n")
    assert main(["post", str(recipe), str(base)]) in (0, None)
    assert f"sft: {tmp_path / 'base_sft'}" in capsys.readouterr().out
    assert json.loads(RunDir.at(tmp_path / "base_sft").train_result.read_text())["steps"] == 2
    (tmp_path / "empty.yaml").write_text("name: x\n")
    assert main(["post", str(tmp_path / "empty.yaml"), str(base)]) == 2
    assert "no post stages" in capsys.readouterr().err


def test_sft_replays_pretraining_windows_as_extra_rows(tmp_path, monkeypatch):
    from slmforge.config import load_config
    from slmforge.pipeline import run
    from slmforge.post import run as post_run
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(tmp_path, name="base", max_steps=2)
    run(cfg)
    chats = _chats_file(tmp_path / "c.jsonl")
    sft = finetune_config(cfg.run_dir, "sft", [f"data={chats}", "replay=0.5", *FAST, "max_len=32",
                                                "train.max_steps=2"])
    captured = []

    def spy(model, batch):
        captured.append(batch)
        return model(batch[0], targets=batch[1], doc=batch[2])[1]

    real = post_run.train
    monkeypatch.setattr(post_run, "train", lambda c, **kw: real(c, loss_fn=spy, **kw))
    post_train(sft, progress=False)
    x, y, doc = captured[0]
    assert x.shape == (4, 32)
    # Rows 2-3 are pre-training windows: every position is a target (the next token), one document each.
    assert bool((y[2:] != -100).all()) and bool((doc[2:] == 0).all())
    assert bool((y[:2] == -100).any())  # the SFT rows mask their prompts
    with pytest.raises(ValueError, match="finetune.replay"):
        load_config(None, ["finetune.replay=1.5"])


def _assert_resumes_exactly(make):
    """A loader from ``make()`` saved after 3 batches and restored into a new one gives the same next 4 batches."""
    first = make()
    it = iter(first)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    want = [next(it) for _ in range(4)]
    again = make()
    again.load_state_dict(state)
    got = [b for _, b in zip(range(4), again)]
    assert all(torch.equal(a, b) for w, g in zip(want, got) for a, b in zip(w, g))


def test_replay_loader_resumes_exactly(shards_dir, loaded):
    from slmforge.post.tasks import ReplayLoader
    from slmforge.tokens.shards import TokenLoader

    _, tok = loaded
    convs = [[{"role": "user", "content": f"Add {i}."}, {"role": "assistant", "content": f"#### {i + 1}"}]
             for i in range(30)]
    examples, _ = encode_conversations(tok, convs, 32)

    def make():
        return ReplayLoader(SFTLoader(examples, 32, 2, seed=3, pad_id=0),
                            TokenLoader(shards_dir / "shards" / "train", 32, 1, seed=3))

    _assert_resumes_exactly(make)


@needs_data(SHARED_DATA / "gsm8k" / "train.jsonl")
def test_gsm8k_train_records_become_question_solution_conversations(tmp_path):
    src = SHARED_DATA / "gsm8k" / "train.jsonl"
    lines = [line for line in open(src) if line.strip()][:3]
    (tmp_path / "train.jsonl").write_text("".join(lines))
    convs = sft_source(f"gsm8k:{tmp_path / 'train.jsonl'}")
    first = json.loads(lines[0])
    assert len(convs) == 3 and convs[0] == [{"role": "user", "content": first["question"]},
                                            {"role": "assistant", "content": first["answer"]}]
    assert "<<48/2=24>>" in convs[0][1]["content"] and convs[0][1]["content"].endswith("#### 72")


def test_orpo_replay_adds_the_pretraining_windows_loss(tmp_path, monkeypatch):
    """finetune.replay on ORPO: replay x batch_size pre-training windows beside each batch of pairs, their
    next-token loss added to the pair loss (and logged), so the base corpus's loss is kept while pairs train."""
    from slmforge.pipeline import run
    from slmforge.post import run as post_run
    from slmforge.post.tasks import pair_loss
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(tmp_path, name="base", max_steps=2)
    run(cfg)
    orpo = finetune_config(cfg.run_dir, "orpo", [f"data={_pairs_file(tmp_path / 'p.jsonl')}", "replay=0.5", *FAST,
                                                  "max_len=32", "train.max_steps=2"])
    captured = []
    plain = pair_loss("orpo", orpo.finetune.beta)

    def spy(model, batch):
        captured.append(batch)
        return plain(model, batch)

    real = post_run.train
    monkeypatch.setattr(post_run, "train", lambda c, **kw: real(c, loss_fn=spy, **kw))
    post_train(orpo, progress=False)
    tokens, targets, index, rx, ry = captured[0]
    assert tokens.shape[0] == 2 * 4 and rx.shape == (2, 32) and bool((ry != -100).all())
    model = load_for_inference(cfg.run_dir)[0]
    with torch.no_grad():
        both, metrics = plain(model, captured[0])
        alone, _ = plain(model, captured[0][:3])
        replay = model(rx, targets=ry)[1]
    assert float(both) == pytest.approx(float(alone) + float(replay), rel=1e-6)
    assert metrics["replay_nll"] == pytest.approx(float(replay), rel=1e-6)
    assert any("replay_nll" in r for r in MetricsLog(RunDir.of(orpo).metrics).read())


def test_pair_replay_loader_resumes_exactly(shards_dir):
    from slmforge.post.prefs import PairLoader, encode_pairs
    from slmforge.post.tasks import PairReplayLoader
    from slmforge.tokens.shards import TokenLoader
    from slmforge.tokens.tokenizer import Tokenizer

    tok = Tokenizer.load(shards_dir / "tokenizer.json")
    pairs = [Pair([{"role": "user", "content": f"Add {i}."}], f"#### {i + 1}", f"#### {i + 2}") for i in range(20)]
    encoded, _ = encode_pairs(tok, pairs, 32, "truncate")

    def make():
        return PairReplayLoader(PairLoader(encoded, 2, 3, tok.pad_id),
                                TokenLoader(shards_dir / "shards" / "train", 32, 1, seed=3))

    _assert_resumes_exactly(make)
