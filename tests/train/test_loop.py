import json

import pytest
import torch

from slmforge.checkpoint import latest_checkpoint
from slmforge.config import load_config
from slmforge.train.checkpoint import load_checkpoint
from slmforge.train.loop import train
from slmforge.train.task import default_loss
from tests.conftest import assert_png_drawn, saved_figure, tiny_run_config


def _cfg(tmp_path, shards_dir, name, **train_kw):
    import dataclasses

    cfg = tiny_run_config(tmp_path, name=name, **train_kw)
    data = dataclasses.replace(cfg.data, shards_dir=str(shards_dir / "shards"),
                               tokenizer=str(shards_dir / "tokenizer.json"))
    return dataclasses.replace(cfg, data=data)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Crash(Exception):
    pass


def test_exact_resume_after_a_crash(tmp_path, shards_dir):
    straight = _cfg(tmp_path, shards_dir, "straight")
    train(straight, progress=False)

    calls = {"n": 0}

    def crash_on_step_7(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:  # after the step-4 checkpoint and two more steps
            raise Crash
        x, y = batch
        return model(x, targets=y)[1]

    resumed = _cfg(tmp_path, shards_dir, "resumed")
    with pytest.raises(Crash):
        train(resumed, loss_fn=crash_on_step_7, progress=False)
    assert latest_checkpoint(resumed.run_dir / "checkpoints").name == "step_000004"
    assert len(_losses(resumed.run_dir)) == 6
    train(resumed, resume=True, progress=False)
    a, b = _losses(straight.run_dir), _losses(resumed.run_dir)
    assert len(a) == len(b) == 8
    assert a == b  # bit-identical at every step


def test_training_lowers_loss_and_writes_artifacts(tmp_path, shards_dir, saved_figures):
    cfg = _cfg(tmp_path, shards_dir, "art", max_steps=30, eval_every=10, ckpt_every=10, schedule="cosine")
    result = train(cfg, progress=False)
    losses = _losses(cfg.run_dir)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert result.val_loss < losses[0]
    records = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((cfg.run_dir / "train_result.json").read_text())["val_loss"] == result.val_loss
    assert load_config(cfg.run_dir / "config.yaml").train == cfg.train
    # loss.png draws every step's training loss and the three evaluations, nothing else.
    lines = saved_figure(saved_figures, "loss.png")["axes"][0]["lines"]
    assert lines["train"] == (list(map(float, range(1, 31))), losses)
    assert lines["validation"] == ([10.0, 20.0, 30.0], [r["val_loss"] for r in records if "val_loss" in r])
    assert_png_drawn(cfg.run_dir / "loss.png")
    assert {"val_loss", "val_bits_per_byte"} <= set(records[9])
    assert all(r["tokens_per_second"] > 0 for r in records)
    # Only the last two checkpoints are kept, and no temporary folder is left behind.
    ckpts = sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_000020", "step_000030"]


def test_checkpoint_round_trip(tmp_path, shards_dir):
    from slmforge.model.lm import LM

    trained = []

    def keep_model(model, batch):  # the model training holds, as it stands after the last step
        trained[:] = [model]
        return default_loss(model, batch)

    cfg = _cfg(tmp_path, shards_dir, "ckpt")
    train(cfg, loss_fn=keep_model, progress=False)
    model = LM(cfg.model)
    state = load_checkpoint(latest_checkpoint(cfg.run_dir / "checkpoints"), model)
    assert state["step"] == 8 and state["loader"]["position"] > 0
    assert model.head.weight is model.tok_emb.weight  # tying survives loading
    # Every tensor comes back bit for bit, so the logits are the very same numbers (and not a fresh model's).
    want, got = trained[0].state_dict(), model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        logits = model.eval()(x)[0]
        assert torch.equal(logits, trained[0].eval()(x)[0])
        assert not torch.allclose(logits, LM(cfg.model).eval()(x)[0], atol=1e-2)


def test_bf16_autocast_tracks_fp32(tmp_path, shards_dir):
    """The same 8 steps in bf16 autocast and in fp32: bf16 really rounds (the losses differ), stays within a
    few thousandths of fp32 at every step, and learns (an untrained model, at ln(320) = 5.77, is far above)."""
    fp32 = _cfg(tmp_path, shards_dir, "fp32", dtype="fp32")
    bf16 = _cfg(tmp_path, shards_dir, "bf16", dtype="bf16")
    a, b = train(fp32, progress=False), train(bf16, progress=False)
    la, lb = _losses(fp32.run_dir), _losses(bf16.run_dir)
    assert len(la) == len(lb) == 8 and la != lb
    assert max(abs(x - y) for x, y in zip(la, lb)) < 0.02  # measured 0.0014
    assert abs(a.val_loss - b.val_loss) < 0.02
    assert b.val_loss < lb[0] - 0.8  # measured 5.77 -> 4.56


def test_vocab_mismatch_is_a_clear_error(tmp_path, shards_dir):
    import dataclasses

    cfg = _cfg(tmp_path, shards_dir, "vocab")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=100))
    with pytest.raises(ValueError, match="vocab_size"):
        train(cfg, progress=False)


def _mixture_cfg(tmp_path, shards_dir, name, **train_kw):
    import dataclasses

    from slmforge.config import merge

    cfg = _cfg(tmp_path, shards_dir, name, **train_kw)
    shards = shards_dir / "shards"
    # Two sources (the corpus's train and test shards), a stable stage then an anneal stage; 4x32 = 128 tokens/step.
    mixture = merge(cfg.data.mixture, {
        "after_last": "stop",
        "sources": [{"name": "main", "shards": str(shards / "train")}, {"name": "hq", "shards": str(shards / "test")}],
        "stages": [
            {"name": "stable", "tokens": 640, "weights": [{"source": "main", "weight": 0.75}, {"source": "hq", "weight": 0.25}]},
            {"name": "anneal", "tokens": 384, "weights": [{"source": "hq", "weight": 1.0}]},
        ],
    })
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mixture=mixture))


def test_mixture_stages_are_logged_and_training_stops_at_the_budget(tmp_path, shards_dir):
    cfg = _mixture_cfg(tmp_path, shards_dir, "mix", max_steps=100, eval_every=100, log_every=2)
    result = train(cfg, progress=False)
    records = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 8  # (640 + 384) / 128
    assert [r["stage"] for r in records] == ["stable"] * 5 + ["anneal"] * 3
    realised = records[-1]["mixture_tokens"]
    assert realised["stable"] == {"main": 480, "hq": 160}
    assert realised["anneal"] == {"main": 0, "hq": 384}
    assert result.val_loss == result.val_loss  # evaluated at the early end


def test_mixture_exact_resume(tmp_path, shards_dir):
    straight = _mixture_cfg(tmp_path, shards_dir, "mix_straight")
    train(straight, progress=False)
    calls = {"n": 0}

    def crash_on_step_6(model, batch):
        calls["n"] += 1
        if calls["n"] == 6:  # inside the anneal stage, after the step-4 checkpoint
            raise Crash
        return model(batch[0], targets=batch[1])[1]

    resumed = _mixture_cfg(tmp_path, shards_dir, "mix_resumed")
    with pytest.raises(Crash):
        train(resumed, loss_fn=crash_on_step_6, progress=False)
    train(resumed, resume=True, progress=False)
    assert _losses(straight.run_dir) == _losses(resumed.run_dir)


@pytest.mark.parametrize("option", ["compile=true", "activation_checkpointing=true"])
def test_compile_and_activation_checkpointing_match_eager(tmp_path, shards_dir, option):
    key, value = option.split("=")
    eager = _cfg(tmp_path, shards_dir, "eager", max_steps=3)
    other = _cfg(tmp_path, shards_dir, key, max_steps=3, **{key: value})
    train(eager, progress=False)
    train(other, progress=False)
    assert _losses(other.run_dir) == pytest.approx(_losses(eager.run_dir), rel=1e-4)


def test_dsa_dense_steps_warm_up_in_the_run_and_resume_exactly(tmp_path, shards_dir):
    """``model.dsa.dense_steps=5``: the first five optimizer steps run dense (the indexer's warm-up), the rest sparse,
    decided by the step alone, so a run that crashes after the switch resumes bit-identically."""
    import dataclasses

    from slmforge.model.dsa import DSA

    def dsa_cfg(name):
        cfg = _cfg(tmp_path, shards_dir, name)
        dsa = dataclasses.replace(cfg.model.dsa, mode="sparse", top_k=4, dense_steps=5, index_dim=8, index_heads=2)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, layers="dsa", dsa=dsa))

    modes: list[str] = []

    def record(model, batch):
        layers = [m for m in model.modules() if isinstance(m, DSA)]
        assert len(layers) == 2 and len({m.mode for m in layers}) == 1
        modes.append(layers[0].mode)
        x, y = batch
        return model(x, targets=y)[1]

    straight = dsa_cfg("dsa_straight")
    train(straight, loss_fn=record, progress=False)
    assert modes == ["dense"] * 5 + ["sparse"] * 3

    calls = {"n": 0}

    def crash_on_step_7(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:  # after the step-4 checkpoint, and after the switch to sparse at step 5
            raise Crash
        x, y = batch
        return model(x, targets=y)[1]

    resumed = dsa_cfg("dsa_resumed")
    with pytest.raises(Crash):
        train(resumed, loss_fn=crash_on_step_7, progress=False)
    train(resumed, resume=True, progress=False)
    a, b = _losses(straight.run_dir), _losses(resumed.run_dir)
    assert len(a) == len(b) == 8 and a == b
    # the sparse steps differ from dense ones: the same run without the switch logs other losses after step 5
    dense = dataclasses.replace(straight, name="dsa_dense",
                                model=dataclasses.replace(straight.model, dsa=dataclasses.replace(
                                    straight.model.dsa, mode="dense", dense_steps=0)))
    train(dense, progress=False)
    c = _losses(dense.run_dir)
    assert c[:5] == a[:5] and c[5:] != a[5:]


@pytest.mark.parametrize("keep", [0, 2])
def test_keep_checkpoints_zero_keeps_every_one(tmp_path, shards_dir, keep):
    cfg = _cfg(tmp_path, shards_dir, f"keep{keep}", ckpt_every=2, keep_checkpoints=keep)
    train(cfg, progress=False)
    kept = sorted(p.name for p in (cfg.run_dir / "checkpoints").glob("step_*"))
    assert kept == (["step_000002", "step_000004", "step_000006", "step_000008"] if keep == 0
                    else ["step_000006", "step_000008"])
