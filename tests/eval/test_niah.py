"""``slmforge eval niah``: the length x depth grid for every mixer layout, exact-match scoring, resume, errors."""

import json

import pytest
import torch

from slmforge.cli import main
from slmforge.eval import niah
from slmforge.eval.niah import NiahEvalConfig, answer_of, evaluate_model
from slmforge.model.lm import LM
from slmforge.synth.niah import Haystack, make_sample
from tests.conftest import assert_png_drawn


def _cfg(out_dir, **kw) -> NiahEvalConfig:
    base = dict(lengths=[160, 240], depths=[0.0, 1.0], samples=2, batch_size=2, kinds=["passkey", "kv"],
                out_dir=str(out_dir))
    return NiahEvalConfig(**{**base, **kw})


@pytest.mark.parametrize("layers", ["attn", "ssm", "linear", "hymba", "attn,ssm"])
def test_grid_runs_for_every_layout(loaded, tmp_path, layers):
    model, tok = loaded
    cfg = model.cfg.__class__(**{**model.cfg.__dict__, "layers": layers})
    torch.manual_seed(0)
    result = evaluate_model(LM(cfg).eval(), tok, _cfg(tmp_path), progress=False)
    saved = json.loads((tmp_path / "niah.json").read_text())
    assert sorted(saved["cells"]) == ["160:0", "160:1", "240:0", "240:1"] and saved == result
    for row in saved["lengths"].values():
        assert 0 <= row["recall"] <= 1 and row["peak_mb"] > 10 and row["seconds_per_sample"] > 0
    growth = saved["lengths"]["240"]["state_mb"] / saved["lengths"]["160"]["state_mb"]
    # The KV cache grows with the context; a recurrent state does not.
    assert growth == pytest.approx(1.5) if layers == "attn" else growth < 1.5
    assert_png_drawn(tmp_path / "niah.png", min_coloured=100)


def test_exact_match_scores_the_answer_of_each_sample(loaded, tmp_path, monkeypatch):
    model, tok = loaded
    cfg = _cfg(tmp_path, samples=3, lengths=[200], depths=[0.5])
    h = Haystack(cfg.haystack, tok)
    samples = [make_sample(h, cfg, 200, 0.5, f"200:0.5:{j}") for j in range(3)]
    answers = {tuple(s.prompt): s.answer_texts[-1] for s in samples}
    right = {tuple(samples[1].prompt)}  # the oracle knows sample 1 only

    def oracle(model, prompts, steps, eos_id=None):
        return [tok.encode(f" {answers[tuple(p)] if tuple(p) in right else '12345'}.") for p in prompts]

    monkeypatch.setattr(niah, "generate_batch", oracle)
    cell = evaluate_model(model, tok, cfg, progress=False)["cells"]["200:0.5"]
    assert cell["recall"] == pytest.approx(1 / 3)
    assert [r["correct"] for r in cell["records"]] == [False, True, False]
    assert answer_of(" 48213. And") == "48213" and answer_of("") == ""


def test_grid_resumes_from_the_cells_already_scored(loaded, tmp_path, monkeypatch):
    model, tok = loaded
    scored = []
    real = niah.score_cell

    def counting(model, haystack, cfg, length, depth):
        scored.append((length, depth))
        return real(model, haystack, cfg, length, depth)

    monkeypatch.setattr(niah, "score_cell", counting)
    evaluate_model(model, tok, _cfg(tmp_path, lengths=[160]), progress=False)
    assert scored == [(160, 0.0), (160, 1.0)]
    first = json.loads((tmp_path / "niah.json").read_text())["cells"]["160:0"]
    evaluate_model(model, tok, _cfg(tmp_path), progress=False)  # adds 240: only its cells are scored
    assert scored[2:] == [(240, 0.0), (240, 1.0)]
    assert json.loads((tmp_path / "niah.json").read_text())["cells"]["160:0"] == first
    evaluate_model(model, tok, _cfg(tmp_path, seed=7), progress=False)  # other samples: everything again
    assert len(scored) == 8


@pytest.mark.parametrize("items, message", [
    (["depths=[0.5, 1.5]"], "depths=[0.5, 1.5]: expected fractions in [0, 1]"),
    (["kinds=[needle]"], "kinds: unknown needle kind"),
    (["lengths=[8]"], "lengths=[8]: expected context lengths of at least 32 tokens"),
    (["haystack=[missing/*.txt]"], "missing"),
])
def test_bad_input_is_one_line(eval_run, tmp_path, capsys, items, message):
    code = main(["eval", "niah", str(eval_run), f"out_dir={tmp_path / 'out'}", "samples=1", *items])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "niah.json").exists()
