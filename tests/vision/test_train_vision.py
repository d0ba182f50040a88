"""The vision pipeline on a tiny run: encoder, projector-only training, describe, eval, and the user's errors."""

import json

import pytest
import safetensors.torch
import torch

from slmforge.cli import main as cli_main
from tests.conftest import make_run


@pytest.fixture(scope="module")
def vision_setup(tmp_path_factory):
    """Images, a trained (briefly) encoder, a tiny text run, and a vision run trained 4 steps from it."""
    from slmforge.post.vision import train_encoder, train_projector
    from slmforge.synth.images import write_split

    root = tmp_path_factory.mktemp("vision")
    data = root / "shapes"
    for split, n in (("train", 48), ("validation", 16), ("test", 12)):
        write_split(data, n, 0, split, size=32)
    accuracy = train_encoder(data, root / "encoder", dim=16, steps=3, batch_size=8)
    base = make_run(root, "base")
    train_projector(base, data, root / "encoder", ["train.max_steps=4", "train.batch_size=8", "train.eval_every=2",
                                                   "train.ckpt_every=2", "train.eval_batches=1"], progress=False)
    return {"root": root, "data": data, "base": base, "run": root / "base_vision", "accuracy": accuracy}


def _weights(run):
    ckpts = sorted((run / "checkpoints").iterdir())
    return safetensors.torch.load_file(str(ckpts[-1] / "model.safetensors"))


def test_projector_only_training_keeps_the_lms_weights_bit_identical(vision_setup):
    before, after = _weights(vision_setup["base"]), _weights(vision_setup["run"])
    assert set(after) - set(before) == {"projector.fc1.weight", "projector.fc1.bias"}
    assert all(torch.equal(before[k], after[k]) for k in before)
    metrics = [json.loads(line) for line in (vision_setup["run"] / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 4 and "val_loss" in metrics[-1]
    assert (vision_setup["run"] / "vision" / "encoder.json").is_file()
    assert set(vision_setup["accuracy"]) >= {"kind", "colour", "shape"}


def test_stage_two_trains_the_lm_too(vision_setup):
    from slmforge.post.vision import train_projector

    root = vision_setup["root"]
    train_projector(vision_setup["base"], vision_setup["data"], root / "encoder",
                    ["train.max_steps=2", "train.batch_size=8", "name=stage2", "train.eval_batches=1"], stage=2,
                    progress=False)
    before, after = _weights(vision_setup["base"]), _weights(root / "stage2")
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_describe_and_eval_write_captions_and_a_report(vision_setup, capsys):
    run, data = vision_setup["run"], vision_setup["data"]
    assert cli_main(["vision", "describe", str(run), str(data / "test" / "000000.png"),
                     str(data / "test" / "000001.png"), "max_new_tokens=4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(data / "test" / "000000.png"))
    assert cli_main(["vision", "eval", str(run), f"data={data}"]) == 0
    report = json.loads((run / "vision_eval.json").read_text())
    assert report["model"]["all"]["images"] == 12 and report["model"]["held_out"]["images"] == 6
    assert set(report["model"]["all"]["attributes"]) <= {"size", "colour", "shape", "position", "count", "relation"}
    assert (run / "vision_eval.png").stat().st_size > 1000


def test_majority_baseline_scores_its_own_guess(vision_setup):
    from slmforge.eval.vision import majority_captions, read_records, score

    records = read_records(vision_setup["data"], "train")
    captions = majority_captions(records, records)
    result = score(records, captions)["all"]
    assert 0 < result["attributes"]["colour"] < 1
    assert score(records, [r["caption"] for r in records])["all"]["all_correct"] == 1.0


@pytest.mark.parametrize("payload, message", [
    (b"not an image at all", "not a readable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a readable image"),
])
def test_bad_image_files_are_one_line_errors(vision_setup, tmp_path, capsys, payload, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(payload)
    assert cli_main(["vision", "describe", str(vision_setup["run"]), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "0x" not in err


def test_huge_images_and_text_only_runs_are_refused(vision_setup, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from slmforge.serve import vision

    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(big)
    monkeypatch.setattr(vision, "MAX_IMAGE_PIXELS", 200 * 200)
    assert cli_main(["vision", "describe", str(vision_setup["run"]), str(big)]) == 2
    assert "pixel limit" in capsys.readouterr().err
    monkeypatch.setattr(vision, "MAX_IMAGE_PIXELS", 4096 * 4096)
    img = vision_setup["data"] / "test" / "000000.png"
    assert cli_main(["vision", "describe", str(vision_setup["base"]), str(img)]) == 2
    assert "no vision projector" in capsys.readouterr().err
    assert cli_main(["vision", "describe", str(vision_setup["run"]), str(tmp_path / "missing.png")]) == 2
    assert "no such image file" in capsys.readouterr().err


def test_bad_arguments_are_refused_before_training(vision_setup, tmp_path, capsys):
    run, data = vision_setup["base"], vision_setup["data"]
    enc = vision_setup["root"] / "encoder"
    assert cli_main(["vision", "train", str(run), f"data={tmp_path}", f"encoder={enc}"]) == 2
    assert "no such manifest" in capsys.readouterr().err
    assert cli_main(["vision", "train", str(run), f"data={data}", f"encoder={tmp_path}"]) == 2
    assert "not a vision run" in capsys.readouterr().err
    assert cli_main(["vision", "train", str(run), f"data={data}", f"encoder={enc}", "stage=3"]) == 2
    assert "stage=3" in capsys.readouterr().err
    assert cli_main(["vision", "train", str(run), f"data={data}", f"encoder={enc}", "train.trainable=nope",
                     "name=bad"]) == 2
    assert "train.trainable=nope" in capsys.readouterr().err
    assert not (vision_setup["root"] / "bad" / "checkpoints").exists()
