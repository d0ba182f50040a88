"""The generated scenes: captions parse back to the truth, held-out pairs stay out of training, PNGs are real."""

import random

import pytest

from slmforge.synth.images import (HELD_OUT, caption_of, draw, parse_caption, sample_scene, scenes, score_caption,
                                   write_split)


def test_captions_parse_back_to_every_attribute():
    for split in ("train", "test"):
        for scene in scenes(600, 3, split):
            assert parse_caption(scene.caption()) == (scene.kind, scene.attrs)


def test_training_scenes_never_show_a_held_out_pair_and_test_is_half_held_out():
    train = scenes(3000, 0, "train")
    assert not any((o.colour, o.shape) in HELD_OUT for s in train for o in s.objects)
    test = scenes(200, 0, "test")
    assert sum(s.held_out() for s in test) == 100
    # every held-out pair is drawn in the test split
    seen = {(o.colour, o.shape) for s in test for o in s.objects}
    assert set(HELD_OUT) <= seen


def test_scenes_are_deterministic_by_seed():
    assert [s.caption() for s in scenes(50, 7, "train")] == [s.caption() for s in scenes(50, 7, "train")]
    assert [s.caption() for s in scenes(50, 7, "train")] != [s.caption() for s in scenes(50, 8, "train")]


def test_drawn_colours_and_positions_match_the_scene():
    import numpy as np

    from slmforge.synth.images import COLOURS

    rng = random.Random(0)
    for _ in range(40):
        scene = sample_scene(rng, "test", kind="single")
        px = np.asarray(draw(scene, 64))
        obj = scene.objects[0]
        centre = px[int(obj.y * 64), int(obj.x * 64)]
        assert tuple(centre) == COLOURS[obj.colour], (scene.caption(), centre)


def test_score_caption_marks_each_attribute():
    attrs = {"size": "large", "colour": "red", "shape": "circle", "position": "top left"}
    assert all(score_caption("a large red circle at the top left.", "single", attrs).values())
    marks = score_caption("a large blue circle at the top.", "single", attrs)
    assert marks == {"size": True, "colour": False, "shape": True, "position": False}
    assert not any(score_caption("three red circles.", "single", attrs).values())  # another form names nothing
    assert parse_caption("") is None and parse_caption("hello there") is None
    assert caption_of("pair", {"colour": "orange", "shape": "square", "relation": "above", "colour2": "red",
                               "shape2": "circle"}) == "an orange square above a red circle."


def test_write_split_writes_readable_pngs_and_a_manifest(tmp_path):
    import json

    from PIL import Image

    manifest = write_split(tmp_path, 12, 0, "test", size=48)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 12
    for rec in records:
        img = Image.open(tmp_path / rec["image"])
        assert img.format == "PNG" and img.size == (48, 48)
        assert parse_caption(rec["caption"])[1] == rec["attrs"]


@pytest.mark.parametrize("kind", ["single", "count", "pair"])
def test_every_kind_is_sampled(kind):
    assert sample_scene(random.Random(1), "train", kind=kind).kind == kind


def test_the_scenes_text_family_writes_parseable_captions_of_every_pair():
    from slmforge.synth.procedural import FAMILIES, build_corpus

    docs = build_corpus(["scenes"], 300, 10, 10, seed=0)["train"]
    lines = [line.split(": ", 1)[1] for d in docs for line in d.text.splitlines()]
    parsed = [parse_caption(line) for line in lines]
    assert all(parsed)
    pairs = {(a["colour"], a["shape"]) for _, a in parsed}
    assert set(HELD_OUT) <= pairs  # text knows every phrase; only images of held-out pairs are held out
    assert "scenes" in FAMILIES
