"""Data mixtures: YAML configs, proportions per stage, stage budgets, seeds, exact resume, exhaustion, ranks, errors."""

import itertools
import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slmforge.config import dump_yaml, merge
from slmforge.tokens.mixture import MixtureConfig, MixtureLoader, SourceWeight, Stage
from slmforge.tokens.shards import _ShardWriter, tokenize_to_shards
from slmforge.tokens.tokenizer import train_tokenizer
from slmforge.runs import write_json

T, B = 8, 4  # seq_len and batch_size of most tests
BASE = 10_000  # source i holds tokens BASE * i + position, so every token tells its source
NAMES = ("web", "code", "math", "small")


def _write_source(out_dir: Path, index: int, num_tokens: int, doc_len: int = 37) -> Path:
    lengths = [doc_len] * (num_tokens // doc_len) + [num_tokens % doc_len] * bool(num_tokens % doc_len)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir, np.dtype(np.uint16), 1 << 27)
    writer.write(BASE * index + np.arange(num_tokens), np.array(lengths))
    writer.close()
    write_json(out_dir / "meta.json", dict(dtype="uint16", files=writer.files, num_tokens=num_tokens))
    return out_dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sources")
    # "small" has 12 windows of T + 1 tokens: it runs out within a few dozen rows.
    sizes = {"web": 9000, "code": 9000, "math": 9000, "small": 12 * T + 1}
    return {name: str(_write_source(root / name, i, sizes[name])) for i, name in enumerate(NAMES)}


def _cfg(dirs, stages, **kw) -> MixtureConfig:
    """stages: [(name, rows, {source: weight})]; budgets are rows * T tokens (world_size 1)."""
    return MixtureConfig(
        sources=[dict(name=n, shards=dirs[n]) for n in NAMES],
        stages=[dict(name=name, tokens=rows * T, weights=[dict(source=s, weight=w) for s, w in weights.items()])
                for name, rows, weights in stages], **kw)


def _sources_of(batches) -> list[int]:
    """The source index of every row, in order."""
    return [int(v) // BASE for x, _ in batches for v in x[:, 0]]


def _take(loader, n):
    return [(x.clone(), y.clone()) for x, y in itertools.islice(loader, n)]


# ---------------------------------------------------------------- config


def test_yaml_recipe_loads_through_merge_and_round_trips(dirs):
    @dataclass
    class Data:  # as the mixture sits in DataConfig
        mixture: MixtureConfig = field(default_factory=MixtureConfig)

    text = f"""
mixture:
  seed: 3
  on_exhausted: stop
  sources:
    - {{name: web, shards: {dirs['web']}}}
    - {{name: math, shards: {dirs['math']}}}
  stages:
    - name: stable
      tokens: 800
      weights: [{{source: web, weight: 3}}, {{source: math, weight: 1}}]
    - name: anneal
      tokens: 2e2
      weights: [{{source: math, weight: 1}}]
"""
    cfg = merge(Data(), yaml.safe_load(text), where="data").mixture
    assert cfg.stages[1] == Stage("anneal", 200, [SourceWeight("math", 1.0)])
    assert isinstance(cfg.stages[1].weights[0].weight, float) and cfg.on_exhausted == "stop"
    np.testing.assert_allclose(cfg.normalised_weights(), [[0.75, 0.25], [0.0, 1.0]])
    assert merge(Data(), yaml.safe_load(dump_yaml(Data(cfg))), where="data").mixture == cfg
    assert cfg.total_tokens == 1000
    assert [cfg.stage_at(t)[0] for t in (0, 799, 800, 999, 1000, 10**9)] == [0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match=r"sources\[0\]: unknown key 'shard' \(did you mean shards"):
        merge(MixtureConfig(), {"sources": [{"name": "web", "shard": "x"}]})
    with pytest.raises(ValueError, match=r"weights\[0\]: expected a mapping"):
        merge(MixtureConfig(), {"stages": [{"name": "s", "weights": [0.5]}]})


def _bad(dirs, key):
    """A valid two-source config with one mistake, named by key."""
    stages = [dict(name="stable", tokens=100, weights=[dict(source="web", weight=1), dict(source="math", weight=1)])]
    raw = dict(sources=[dict(name="web", shards=dirs["web"]), dict(name="math", shards=dirs["math"])], stages=stages)
    weights = stages[0]["weights"]
    if key == "no_stages":
        raw["stages"] = []
    elif key == "unknown_source":
        weights[1]["source"] = "mth"
    elif key == "negative":
        weights[0]["weight"] = -1
    elif key == "zero_sum":
        weights[0]["weight"] = weights[1]["weight"] = 0
    elif key == "missing_folder":
        raw["sources"][1]["shards"] = dirs["math"] + "-missing"
    elif key == "duplicate_source":
        raw["sources"][1]["name"] = "web"
    elif key == "zero_tokens":
        stages[0]["tokens"] = 0
    elif key == "on_exhausted":
        raw["on_exhausted"] = "skip"
    return merge(MixtureConfig(), raw)


@pytest.mark.parametrize("key,message", [
    ("no_stages", r"mixture.stages is empty"),
    ("unknown_source", r"mixture.stages\[0\] \('stable'\).weights: unknown source 'mth'.*Did you mean math"),
    ("negative", r"mixture.stages\[0\] \('stable'\).weights: source 'web' has weight -1"),
    ("zero_sum", r"mixture.stages\[0\] \('stable'\).weights sum to 0"),
    ("missing_folder", r"mixture.sources\[1\] \('math'\).shards: no folder .*math-missing"),
    ("duplicate_source", r"mixture.sources\[1\]: source name 'web' is used twice"),
    ("zero_tokens", r"mixture.stages\[0\] \('stable'\).tokens=0"),
    ("on_exhausted", r"on_exhausted='skip': choose one of repeat, stop"),
])
def test_bad_configs_are_clear_errors(dirs, key, message):
    with pytest.raises(ValueError, match=message):
        MixtureLoader(_bad(dirs, key), T, B)


# ---------------------------------------------------------------- proportions and stages


def test_realised_proportions_follow_the_weights_of_each_stage(dirs):
    stages = [("stable", 250, {"web": 6, "code": 3, "math": 1}), ("mid", 90, {"web": 1, "code": 1}),
              ("anneal", 132, {"web": 0.2, "code": 0.2, "math": 0.6})]
    cfg = _cfg(dirs, stages, seed=11)
    loader = MixtureLoader(cfg, T, B)
    rows = _sources_of(_take(loader, sum(r for _, r, _ in stages) // B))
    start = 0
    for (name, num_rows, _), weights in zip(stages, cfg.normalised_weights()):
        drawn = np.array(rows[start : start + num_rows])
        start += num_rows
        counts = np.stack([np.cumsum(drawn == s) for s in range(len(NAMES))], axis=1)  # (rows, sources)
        np.testing.assert_allclose(counts[-1] / num_rows, weights, atol=0.02)
        # Smooth round-robin keeps every prefix of the stage within 1.5 rows of its share.
        expected = np.arange(1, num_rows + 1)[:, None] * weights
        assert np.abs(counts - expected).max() <= 1.5
        assert loader.realised()[name] == {n: int(c) * T for n, c in zip(NAMES, counts[-1])}


def test_stage_transitions_at_the_declared_budgets(dirs):
    # The first budget is 10 rows and 1 token: the switch comes at row 11, in the middle of the third batch.
    cfg = _cfg(dirs, [("a", 10, {"web": 1}), ("b", 6, {"math": 1})], after_last="stop")
    cfg.stages[0].tokens += 1
    loader = MixtureLoader(cfg, T, B)
    stages_seen = []
    batches = []
    for batch in loader:
        batches.append(batch)
        stages_seen.append(loader.current_stage[0])
    # after_last=stop: the last batch starts before the end of the budget (row 16 < 16.125) and ends past it.
    assert _sources_of(batches) == [0] * 11 + [2] * 9
    assert stages_seen == [0, 0, 1, 1, 1] and loader.num_tokens == 20 * T
    assert loader.realised() == {"a": {"web": 11 * T, "code": 0, "math": 0, "small": 0},
                                 "b": {"web": 0, "code": 0, "math": 9 * T, "small": 0}}
    cfg.after_last = "continue"
    assert _sources_of(_take(MixtureLoader(cfg, T, B), 10)) == [0] * 11 + [2] * 29


def test_stream_is_deterministic_by_seed(dirs):
    stages = [("s", 1000, {"web": 1, "code": 1, "math": 1})]
    a, b, c = (_take(MixtureLoader(_cfg(dirs, stages, seed=seed), T, B), 20) for seed in (5, 5, 6))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert _sources_of(a) != _sources_of(c)
    assert not any(torch.equal(p[0], q[0]) for p, q in zip(a, c))
    for x, y in a:
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64 and torch.equal(y, x + 1)


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("skip", [3, 9, 10, 20], ids=["mid_stage", "before_boundary", "across_boundary", "past_end"])
@pytest.mark.parametrize("mode", ["window", "documents"])
def test_resume_continues_the_identical_stream(dirs, skip, mode):
    # Stage "first" ends at row 37, inside batch 10; "small" starts its second epoch during it.
    cfg = _cfg(dirs, [("first", 37, {"web": 2, "small": 1}), ("second", 30, {"code": 1, "math": 3})], seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uninterrupted = _take(MixtureLoader(cfg, T, B, mode=mode), skip + 8)
        original = MixtureLoader(cfg, T, B, mode=mode)
        _take(original, skip)
        state = json.loads(json.dumps(original.state_dict()))  # plain data, as saved in a checkpoint
        restored = MixtureLoader(cfg, T, B, mode=mode)
        restored.load_state_dict(state)
        assert restored.realised() == original.realised() and restored.current_stage == original.current_stage
        for expected, resumed in zip(uninterrupted[skip:], _take(restored, 8)):
            assert torch.equal(expected[0], resumed[0]) and torch.equal(expected[1], resumed[1])
    with pytest.raises(ValueError, match="seed=2"):
        MixtureLoader(_cfg(dirs, [("first", 37, {"web": 1})], seed=3), T, B, mode=mode).load_state_dict(state)
    with pytest.raises(ValueError, match="names must stay the same"):
        MixtureLoader(_cfg(dirs, [("only", 37, {"web": 1})], seed=2), T, B, mode=mode).load_state_dict(state)


# ---------------------------------------------------------------- exhaustion


def test_repeat_says_so_once_naming_the_source_and_epoch(dirs, capsys):
    loader = MixtureLoader(_cfg(dirs, [("only", 1000, {"web": 1, "small": 1})]), T, B)
    rows = _sources_of(_take(loader, 25))
    lines = [line for line in capsys.readouterr().out.splitlines() if "finished epoch" in line]
    assert lines == ["[slmforge] mixture: source 'small' finished epoch 0 in stage 'only'; repeating it from epoch 1 "
                     "(on_exhausted='repeat')"]
    assert rows.count(3) == 50 and loader.loaders[3].epoch == 4  # 12 rows an epoch: four repeats


def test_stop_raises_naming_the_source_stage_and_tokens(dirs):
    cfg = _cfg(dirs, [("warmup", 8, {"web": 1}), ("main", 1000, {"web": 1, "small": 1})], on_exhausted="stop")
    loader = MixtureLoader(cfg, T, B)
    batches = iter(loader)
    _take(batches, 8)  # 8 web rows, then 24 rows of which 12 (all) from small
    before = loader.state_dict()
    with pytest.raises(RuntimeError, match=r"source 'small' ran out of data in stage 'main' after 96 of its tokens "
                                           r"\(96 in this stage; 256 mixture tokens"):
        next(batches)
    assert loader.state_dict() == before


# ---------------------------------------------------------------- ranks


@pytest.mark.parametrize("mode", ["window", "documents"])
def test_ranks_draw_the_same_sources_and_disjoint_rows(dirs, mode):
    cfg = _cfg(dirs, [("s", 400, {"web": 1, "code": 1, "math": 2})], seed=4)
    loaders = [MixtureLoader(cfg, T, B, rank=r, world_size=2, mode=mode) for r in range(2)]
    batches = [_take(loader, 40) for loader in loaders]
    assert _sources_of(batches[0]) == _sources_of(batches[1])
    rows = [{tuple(row) for x, _ in b for row in x.tolist()} for b in batches]
    assert len(rows[0]) == len(rows[1]) == 40 * B and not rows[0] & rows[1]
    # Budgets count all ranks: 40 batches of 2 x 4 rows is 320 of the 400 rows.
    assert loaders[0].num_tokens == 320 * T and sum(loaders[0].realised()["s"].values()) == 320 * T


# ---------------------------------------------------------------- real text through a trained tokenizer


def test_mixture_of_tokenized_text(tmp_path):
    rng = random.Random(0)
    texts = {
        "sums": [f"{a} plus {b} is {a + b}." for a, b in (rng.sample(range(1, 99), 2) for _ in range(300))],
        "stories": [f"The {rng.choice(['cat', 'dog', 'fox'])} ran to the {rng.choice(['park', 'sea', 'hill'])}."
                    for _ in range(300)],
    }
    train_tokenizer([t for docs in texts.values() for t in docs], 300, tmp_path / "tok")
    cfg = MixtureConfig(sources=[dict(name=n, shards=str(tmp_path / n)) for n in texts],
                        stages=[dict(name="s", tokens=10**6, weights=[dict(source="sums", weight=1),
                                                                      dict(source="stories", weight=3)])])
    windows = {}
    for name, docs in texts.items():
        meta = tokenize_to_shards(docs, tmp_path / "tok", tmp_path / name, num_workers=1)
        stream = np.fromfile(tmp_path / name / meta["files"][0]["tokens"], dtype=meta["dtype"]).astype(np.int64)
        windows[name] = {tuple(w) for w in np.lib.stride_tricks.sliding_window_view(stream, 17).tolist()}
    counts = {name: 0 for name in texts}
    for x, y in _take(MixtureLoader(cfg, 16, B), 10):
        assert x.shape == (B, 16) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            (name,) = [n for n in texts if tuple(row) in windows[n]]
            counts[name] += 1
    assert counts == {"sums": 10, "stories": 30}
