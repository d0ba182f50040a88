"""The SFT curriculum (finetune.curriculum), the reasoning recipe, and procedural SFT data from a base run whose
corpus is built from data.sources (its held-out problems stay held out)."""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from slmforge.cli import main
from slmforge.config import load_config
from slmforge.corpus import source_configs
from slmforge.post.chat_data import SFTLoader, encode_conversations, procedural_conversations
from slmforge.post.curriculum import curriculum_order, difficulty, order_by_difficulty
from slmforge.post.run import finetune_config, procedural_problems
from slmforge.synth.procedural import build_corpus

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "reasoning_cpu.yaml"


def _tag(*ks: int) -> str:
    """A name without digits (a digit in it would be an operand)."""
    return "case " + "".join(chr(97 + k) for k in ks)


def _conv(steps: int, operands: list[int], tag: str) -> list[dict]:
    """A user turn holding ``operands`` (and no other number) and a reply of ``steps`` annotated steps."""
    question = f"{tag}: " + " and ".join(f"{n} apples" for n in operands) + "?"
    reply = "\n".join(f"Then 1 + {k} = <<1+{k}={1 + k}>>{1 + k}." for k in range(steps)) + "\n#### 1"
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


# (steps, operands) listed easy to hard: by steps, then by the largest operand
LADDER = [(0, [9]), (1, [2, 5]), (1, [40, 3]), (1, [7, 120]), (2, [3]), (2, [100, 50]), (3, [1, 7]), (4, [2])]


def test_difficulty_is_steps_then_largest_operand():
    assert difficulty(_conv(3, [4, 250, 17], "q")) == (3, 250)
    # several turns: every assistant turn's steps, every user turn's numbers; a system turn counts for nothing
    turns = [{"role": "system", "content": "Use 1000 words."}, *_conv(1, [6], "a"), *_conv(2, [11, 2], "b")]
    assert difficulty(turns) == (3, 11)
    assert difficulty([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]) == (0, 0)
    assert difficulty(_conv(0, [3], "Pay 1,200 dollars and 2.5 more"))[1] == Fraction(1200)


def test_order_is_easy_to_hard_and_ties_keep_a_seeded_order():
    convs = [_conv(s, ops, _tag(i)) for i, (s, ops) in enumerate(LADDER)]
    shuffled = convs[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != convs
    assert order_by_difficulty(shuffled, seed=5) == convs
    # ties: the same order for the same seed (a pure function of the data and the seed), another for another seed
    ties = [_conv(2, [30], _tag(i)) for i in range(12)]
    assert curriculum_order(ties, 1) == curriculum_order(ties, 1)
    assert curriculum_order(ties, 1) != curriculum_order(ties, 2)
    assert sorted(curriculum_order(ties, 1)) == list(range(12))


def _examples(tok, n_copies=3):
    """The ladder ``n_copies`` times over (distinct tags), shuffled; the curriculum order; and the examples."""
    convs = [_conv(s, ops, _tag(i, r)) for r in range(n_copies) for i, (s, ops) in enumerate(LADDER)]
    random.Random(1).shuffle(convs)
    ordered = order_by_difficulty(convs, seed=3)
    examples, _ = encode_conversations(tok, ordered, 128)
    return convs, ordered, examples


def _row_order(loader, epoch):
    return [i for row in loader._rows(epoch) for i in row]


def test_epoch_zero_follows_the_curriculum_and_later_epochs_are_shuffled(loaded):
    _, tok = loaded
    convs, ordered, examples = _examples(tok)
    keys = [difficulty(c) for c in ordered]
    assert keys == sorted(keys) and keys[0] == (0, 9) and keys[-1] == (4, 2)
    n = len(examples)
    for packing in (False, True):
        loader = SFTLoader(examples, 128, 2, seed=7, pad_id=tok.pad_id, packing=packing, curriculum=True)
        # epoch 0: the examples as given (easy to hard); with packing the rows are filled greedily in that order
        assert _row_order(loader, 0) == list(range(n))
        if packing:
            assert any(len(row) > 1 for row in loader._rows(0))
        # epoch 1 is shuffled exactly as without the curriculum
        plain = SFTLoader(examples, 128, 2, seed=7, pad_id=tok.pad_id, packing=packing)
        assert _row_order(loader, 1) == _row_order(plain, 1) != list(range(n))
        assert _row_order(plain, 0) != list(range(n))
    # the batches themselves: the first batch holds the easiest examples, one per row
    x, _, _ = next(iter(SFTLoader(examples, 128, 2, seed=7, pad_id=tok.pad_id, packing=False, curriculum=True)))
    for r in range(2):
        assert x[r, :len(examples[r].ids)].tolist() == examples[r].ids.tolist()


def test_a_curriculum_loader_resumes_exactly(loaded):
    _, tok = loaded
    _, _, examples = _examples(tok)

    def make(**kw):
        return SFTLoader(examples, 128, 2, seed=7, pad_id=tok.pad_id, curriculum=True, **kw)

    first = make()
    per_epoch = len(first)
    for k in (2, per_epoch + 1):  # inside epoch 0 (the curriculum) and inside epoch 1 (shuffled)
        loader = make()
        it = iter(loader)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(loader.state_dict()))
        want = [next(it) for _ in range(per_epoch + 2)]
        again = make()
        again.load_state_dict(state)
        got = [b for _, b in zip(range(per_epoch + 2), again)]
        assert all(torch.equal(a, b) for w, g in zip(want, got) for a, b in zip(w, g))
    # a state of a run without the curriculum does not resume one with it (nor an old state, saved before the key)
    plain = SFTLoader(examples, 128, 2, seed=7, pad_id=tok.pad_id)
    with pytest.raises(ValueError, match="curriculum=False"):
        first.load_state_dict(plain.state_dict())
    old = {k: v for k, v in plain.state_dict().items() if k != "curriculum"}
    plain.load_state_dict(old)


def test_sft_with_curriculum_trains_easy_to_hard_first(eval_run, loaded):
    from slmforge.post.tasks import sft_task

    _, tok = loaded
    assert finetune_config(eval_run, "sft", ["data=procedural", "curriculum=true"]).finetune.curriculum is True
    convs = procedural_conversations(["arithmetic"], 40, 1234, "train")
    val = procedural_conversations(["arithmetic"], 4, 1234, "validation")
    keys = ["finetune.method=sft", "finetune.data=[procedural]", "model.max_seq_len=256", "train.batch_size=4",
            "train.eval_batches=1"]
    steps = {}
    for on in (True, False):
        cfg = load_config(None, [*keys, f"finetune.curriculum={on}"])
        loader = sft_task(cfg, tok, eval_run / "tokenizer.json", convs, val).loader
        assert loader.curriculum is on
        # the steps of each example in the order epoch 0 trains on them (the <<...>> in its tokens)
        texts = [tok.decode(loader.ids[i].tolist(), skip_special=False) for i in _row_order(loader, 0)]
        steps[on] = [t.count("<<") for t in texts]
    assert steps[True] == sorted(steps[True]) and steps[True][0] < steps[True][-1]
    assert steps[False] != sorted(steps[False])  # without the option the same data is shuffled from the start


# ---------------------------------------------------------------- data.sources: held-out problems stay held out


def _sources_config(tmp_path):
    # The math source's own sizes differ from the top-level ones: its test split is a larger share of its stream.
    return load_config(None, [f"out_dir={tmp_path}", "name=src", "data.num_train_docs=2000",
                              "data.num_val_docs=50", "data.num_test_docs=50",
                              "data.sources={math: {families: [arithmetic], num_train_docs: 600, num_val_docs: 60, "
                              "num_test_docs: 150}, other: {families: [narrative, facts, sorting], seed: 77}}"])


def _questions(convs):
    return {c[0]["content"] for c in convs}


def test_sft_problems_of_a_sources_corpus_keep_its_held_out_split(tmp_path):
    cfg = _sources_config(tmp_path)
    cfg.finetune.families = ["arithmetic", "sorting"]
    corpora = source_configs(cfg)
    held = {}  # the held-out documents the corpus stage writes, per source
    for name, d in corpora.items():
        part = build_corpus(d.families, d.num_train_docs, d.num_val_docs, d.num_test_docs, d.seed)
        held[name] = {doc.meta.get("question") for s in ("validation", "test") for doc in part[s]} - {None}
    train = procedural_problems(cfg, 300, "train")
    val = procedural_problems(cfg, 40, "validation")
    assert len(train) == 300 and len(val) == 40
    assert not _questions(train) & (held["math"] | held["other"])
    assert not _questions(train) & _questions(val)
    assert sum("####" in c[1]["content"] for c in train) == 150  # the families mixed evenly (arithmetic ends ####)
    # the validation problems are the sources' own (held-out, never trained on) problems
    assert _questions(val) & held["math"] and _questions(val) & held["other"]
    # what the top-level keys alone would give (the sources' sizes and seeds ignored) leaks their test problems
    naive = procedural_conversations(["arithmetic"], 300, cfg.data.seed, "train", corpus=cfg.data)
    assert _questions(naive) & held["math"]
    # and a run without data.sources gives what it gave before
    plain = load_config(None, ["finetune.families=[arithmetic, sorting]"])
    assert procedural_problems(plain, 30, "train") == procedural_conversations(
        ["arithmetic", "sorting"], 30, plain.data.seed, "train", corpus=plain.data)


# ---------------------------------------------------------------- the reasoning recipe


def test_the_reasoning_recipe_loads_with_its_anneal_and_sft_stage(capsys):
    cfg = load_config(RECIPE)
    assert cfg.data.split_digits and set(cfg.data.sources) == {"math", "other"}
    assert cfg.data.sources["math"]["families"] == ["arithmetic"]
    stages = cfg.data.mixture.stages
    assert [s.name for s in stages][-1] == cfg.train.anneal_stage == "anneal"
    share = {s.name: {w.source: w.weight / sum(v.weight for v in s.weights) for w in s.weights} for s in stages}
    assert share["anneal"]["math"] > share["stable"]["math"]
    # the stages' tokens are the run's: max_steps x batch x seq_len
    assert sum(s.tokens for s in stages) == cfg.train.max_steps * cfg.train.batch_size * cfg.data.seq_len
    (sft,) = [p for p in cfg.post if p.method == "sft"]
    assert sft.data == ["procedural"] and sft.replay == 0.25 and sft.curriculum is True
    assert sft.families == ["arithmetic"] and sft.train["max_steps"] > 0
    assert main(["run", str(RECIPE), "--dry-run"]) in (0, None)
    out = capsys.readouterr().out
    assert "anneal_stage: anneal" in out and "curriculum: true" in out
    # the header says how to score it, with and without the calculator and with maj@k
    header = RECIPE.read_text().split("\nname:")[0]
    for words in ("slmforge eval gsm8k runs/reasoning_cpu_sft data=procedural num_fewshot=0 chat=true",
                  "tools=calculator", "maj_k=8"):
        assert words in header


def test_the_recipes_sft_stage_config_from_its_annealed_base(eval_run, tmp_path):
    """The SFT stage as `slmforge run` builds it from the pre-trained run: the recipe's keys, and none of the base's
    anneal (its mixture stage means nothing to SFT, whose schedule is cosine)."""
    import shutil

    from slmforge.post.run import stage_config
    from slmforge.runs import save_config

    recipe = load_config(RECIPE)
    base = tmp_path / recipe.name
    shutil.copytree(eval_run / "checkpoints", base / "checkpoints")
    save_config(base, recipe)
    cfg = stage_config(base, recipe.post[0], recipe.name)
    assert cfg.name == "reasoning_cpu_sft" and cfg.train.init_from == str(base)
    assert cfg.train.schedule == "cosine" and cfg.train.anneal_stage == ""
    assert cfg.train.max_steps == recipe.post[0].train["max_steps"] and cfg.train.batch_size == 16
    f = cfg.finetune
    assert (f.method, f.data, f.families, f.replay, f.curriculum) == ("sft", ["procedural"], ["arithmetic"], 0.25, True)
    # its procedural problems keep the base's math source's splits
    assert cfg.data.sources == recipe.data.sources
