"""NIAH training (``post/niah.py``): targets on the answers, the length curriculum at fixed tokens per step, exact
resume of the loader, the new run folder (from a run or from scratch), the CLI and its errors."""

import json

import pytest
import torch
import yaml

from slmforge.checkpoint import load_for_inference
from slmforge.cli import main
from slmforge.post.niah import NiahLoader, NiahTrainConfig, niah_config, niah_train, rows_batch, stage_overrides
from slmforge.synth.niah import Haystack, make_sample

FAST = ["kinds=[passkey, kv]", "lengths=[96, 192]", "tokens_per_step=384", "val_samples=2", "train.max_steps=3",
        "train.warmup_steps=1", "train.eval_every=3", "train.ckpt_every=3"]


def test_targets_are_the_answers_and_the_rest_is_text(loaded):
    _, tok = loaded
    cfg = NiahTrainConfig(kinds=["multi"], num_needles=3, questions=2)
    samples = [make_sample(Haystack(["procedural"], tok), cfg, n, 0.5, f"r{n}") for n in (300, 330)]
    x, answer, text = rows_batch(samples, tok.pad_id)
    assert x.shape == (2, max(len(s.ids) for s in samples) - 1)
    for r, s in enumerate(samples):
        ids = torch.tensor(s.ids)
        assert torch.equal(x[r, : len(ids) - 1], ids[:-1]) and (x[r, len(ids) - 1 :] == tok.pad_id).all()
        want = {p - 1 for start, end in s.answers for p in range(start, end)}
        assert set(torch.nonzero(answer[r] != -100).flatten().tolist()) == want
        assert [tok.decode(answer[r][answer[r] != -100].tolist()).split()] == [s.answer_texts]
        assert not ((answer[r] != -100) & (text[r] != -100)).any()
        assert (text[r, len(ids) - 1 :] == -100).all() and (text[r, : len(ids) - 1] != -100).sum() == \
            len(ids) - 1 - len(want)


def test_curriculum_holds_tokens_per_step_and_resumes_exactly(loaded):
    _, tok = loaded
    cfg = NiahTrainConfig(kinds=["passkey"], lengths=[96, 192], length_steps=[2, 1], tokens_per_step=384)
    loader = NiahLoader(Haystack(["procedural"], tok), cfg, max_steps=4)
    batches = iter(loader)
    shapes = [next(batches)[0].shape for _ in range(4)]
    assert [s[0] for s in shapes] == [4, 4, 2, 2] and [s[1] for s in shapes[:2]] == [shapes[0][1]] * 2
    assert all(s[1] - 96 < 10 for s in shapes[:2]) and all(s[1] - 192 < 10 for s in shapes[2:])
    state = loader.state_dict()
    want = next(batches)
    again = NiahLoader(Haystack(["procedural"], tok), cfg, max_steps=4)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(next(iter(again)), want))


@pytest.mark.parametrize("init", ["run", "scratch"])
def test_niah_run_folder(eval_run, tmp_path, init):
    cfg, ncfg = niah_config(eval_run, [*FAST, f"out_dir={tmp_path}", f"init={init}", "lm_weight=0.5",
                                       "model.attn.rope_scaling=yarn", "model.attn.rope_factor=2"])
    assert cfg.name == "eval_niah" and cfg.train.init_from == (str(eval_run) if init == "run" else "")
    assert ncfg.lengths == [96, 192] and cfg.train.batch_size == 2 and cfg.data.seq_len == 192
    result = niah_train(cfg, ncfg, eval_run, progress=False)
    run = tmp_path / "eval_niah"
    assert result.steps == 3 and yaml.safe_load((run / "niah.yaml").read_text())["lm_weight"] == 0.5
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"answer_loss", "answer_acc", "text_loss"} <= set(records[0]) and "val_recall" in records[-1]
    model, _, saved = load_for_inference(run)
    assert saved.model.attn.rope_scaling == "yarn" and (run / "tokenizer.json").is_file()


def test_stage_mappings_become_keys():
    assert stage_overrides({"lengths": [1, 2], "train": {"max_steps": 5}, "model": {"attn": {"rope_factor": 4}}}) \
        == ["lengths=[1, 2]", "train.max_steps=5", "model.attn.rope_factor=4"]


def test_cli_trains_and_refuses_bad_keys(eval_run, tmp_path, capsys):
    assert main(["niah", "train", str(eval_run), *FAST, f"out_dir={tmp_path}", "name=cli"]) == 0
    assert (tmp_path / "cli" / "train_result.json").is_file()
    capsys.readouterr()
    for bad, message in ((["lengths=[8]"], "lengths=[8]: give context lengths of at least 32"),
                         (["length_steps=[5]"], "length_steps has 1 entries for 3 lengths"),
                         (["kinds=[passkei]"], "Did you mean passkey"),
                         (["lengths=[40, 400]"], "length=40: too short for the needles"),
                         (["train.max_stepz=3"], "max_stepz")):
        assert main(["niah", "train", str(eval_run), f"out_dir={tmp_path}", "name=bad", *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def test_copy_rows_copy_segments_of_their_first_half(loaded):
    _, tok = loaded
    cfg = NiahTrainConfig(kinds=["passkey"], lengths=[96], tokens_per_step=384, copy_share=0.5)
    x, answer, text = next(iter(NiahLoader(Haystack(["procedural"], tok), cfg, max_steps=1)))
    assert x.shape[0] == 4 and (answer[:2] != -100).any() and (answer[2:] == -100).all()
    half = (x.shape[1] + 1) // 2
    for r in (2, 3):  # the copy rows: random ids, every text target a token of the first half's
        assert (x[r] >= 7).all() and (text[r, : half - 1] == -100).all()
        targets = text[r][text[r] != -100]
        assert len(targets) > x.shape[1] // 3 and set(targets.tolist()) <= set(x[r, :half].tolist())
        for p in torch.nonzero(text[r] != -100).flatten().tolist():
            assert p + 1 >= x.shape[1] or text[r, p] == x[r, p + 1]
