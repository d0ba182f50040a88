"""Token shards: contents equal direct encoding for any worker count; loader order, ranks and exact resume."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

import slmforge.tokens.shards as shards_module
from slmforge.tokens.shards import TokenLoader, _ShardWriter, load_shards, tokenize_to_shards
from slmforge.tokens.tokenizer import Tokenizer, train_tokenizer
from slmforge.runs import write_json
from tests.conftest import SHARED_DATA, has_data

TINYSTORIES = SHARED_DATA / "tinystories" / "validation_sample.txt"


@pytest.fixture(scope="module")
def docs() -> list[str]:
    if has_data(TINYSTORIES):
        paragraphs = TINYSTORIES.read_text(encoding="utf-8")[:100_000].split("\n\n")
    else:
        paragraphs = [f"Story {i}: the cat sat on mat number {i}.\nThe end." for i in range(400)]
    return paragraphs + ["", "emoji 😀 and 中文", "  leading\n\nspaces\xa0nbsp", "<|user|>hi<|end|>"]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, docs) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(docs, vocab_size=400, path=path)
    return path


def _read(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


def test_shards_equal_direct_encoding_for_any_worker_count(tok_path, docs, tmp_path, monkeypatch):
    # Small batches so that two workers each get several and order preservation is exercised.
    monkeypatch.setattr(shards_module, "_BATCH_CHARS", 5_000)
    meta = tokenize_to_shards(docs, tok_path, tmp_path / "w1", num_workers=1)
    tokenize_to_shards(iter(docs), tok_path, tmp_path / "w2", num_workers=2)
    assert _read(tmp_path / "w1") == _read(tmp_path / "w2")

    tok = Tokenizer.load(tok_path)
    expected = [tok.encode(d) + [tok.eos_id] for d in docs]
    shards = load_shards(tmp_path / "w1")
    assert np.array(shards.tokens).tolist() == [i for e in expected for i in e]
    assert shards.doc_starts.tolist() == np.cumsum([0] + [len(e) for e in expected])[:-1].tolist()
    assert shards.meta["dtype"] == "uint16" and shards.tokens.dtype == np.uint16
    assert meta["num_docs"] == len(docs) and meta["num_tokens"] == sum(map(len, expected))
    assert meta["num_bytes"] == sum(len(d.encode("utf-8")) for d in docs)
    assert meta["vocab_size"] == tok.vocab_size and meta["mb_per_second"] > 0


def test_shards_split_at_document_ends(tok_path, docs, tmp_path):
    tokenize_to_shards(docs, tok_path, tmp_path / "one", num_workers=1)
    one = load_shards(tmp_path / "one")
    meta = tokenize_to_shards(docs, tok_path, tmp_path / "many", num_workers=1, shard_tokens=1000)
    many = load_shards(tmp_path / "many")
    assert len(meta["files"]) > 3 and len(many.tokens.arrays) == len(meta["files"])
    assert np.array_equal(np.array(many.tokens), np.array(one.tokens))
    assert np.array_equal(many.doc_starts, one.doc_starts)
    for f in meta["files"]:
        assert np.load(tmp_path / "many" / f["docs"])[0] == 0
        assert f["num_tokens"] >= 1000 or f is meta["files"][-1]
    # Reads that cross shard files.
    boundary = len(many.tokens.arrays[0])
    flat = np.array(one.tokens)
    assert np.array_equal(many.tokens[boundary - 5 : boundary + 5], flat[boundary - 5 : boundary + 5])
    assert np.array_equal(many.tokens[boundary - 5 : boundary + 1005 : 7], flat[boundary - 5 : boundary + 1005 : 7])
    assert many.tokens[boundary] == flat[boundary] and many.tokens[-1] == flat[-1]
    positions = np.array([[0, boundary - 1], [boundary, len(flat) - 1]])
    assert np.array_equal(many.tokens.gather(positions), flat[positions])


def test_large_vocab_uses_uint32(tok_path, docs, tmp_path, monkeypatch):
    monkeypatch.setattr(Tokenizer, "vocab_size", property(lambda self: 70_000))
    meta = tokenize_to_shards(docs[:50], tok_path, tmp_path, num_workers=1)
    assert meta["dtype"] == "uint32"
    assert (tmp_path / "tokens-00000.bin").stat().st_size == 4 * meta["num_tokens"]
    tok = Tokenizer.load(tok_path)
    assert np.array(load_shards(tmp_path).tokens).tolist() == [i for d in docs[:50] for i in tok.encode(d) + [2]]


def test_append_eos_false(tok_path, docs, tmp_path):
    meta = tokenize_to_shards(docs[:20], tok_path, tmp_path, num_workers=1, append_eos=False)
    tok = Tokenizer.load(tok_path)
    assert meta["eos_id"] is None
    assert np.array(load_shards(tmp_path).tokens).tolist() == [i for d in docs[:20] for i in tok.encode(d)]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_interrupted_write_leaves_the_earlier_shards_intact(tok_path, docs, tmp_path, monkeypatch, num_workers):
    monkeypatch.setattr(shards_module, "_BATCH_CHARS", 2_000)
    out = tmp_path / "shards"
    tokenize_to_shards(docs, tok_path, out, num_workers=1)
    before = _read(out)

    def failing():
        yield from docs[:100]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tokenize_to_shards(failing(), tok_path, out, num_workers=num_workers, shard_tokens=1000)
    assert _read(out) == before  # the new shards went to a temporary folder, now deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"] and not list(out.glob(".*.tmp"))
    assert load_shards(out).meta["num_docs"] == len(docs)


def test_truncated_shard_is_reported(tok_path, docs, tmp_path):
    tokenize_to_shards(docs, tok_path, tmp_path, num_workers=1)
    path = tmp_path / "tokens-00000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="tokens-00000.bin"):
        load_shards(tmp_path)


# ---------------------------------------------------------------- loader, on shards whose tokens are 0..N-1


def _arange_shards(out_dir: Path, doc_lengths: list[int], shard_tokens: int = 1 << 27) -> Path:
    """A shard directory whose token at stream position i is i, so batches show where they came from."""
    writer = _ShardWriter(out_dir, np.dtype(np.uint16), shard_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer.write(np.arange(sum(doc_lengths)), np.array(doc_lengths))
    writer.close()
    write_json(out_dir / "meta.json", dict(dtype="uint16", files=writer.files, num_tokens=sum(doc_lengths)))
    return out_dir


def _doc_lengths(seed: int = 0, num_docs: int = 60) -> list[int]:
    return np.random.default_rng(seed).integers(1, 80, num_docs).tolist()


def _take(loader, n):
    return [(x.clone(), y.clone()) for x, y in itertools.islice(loader, n)]


def test_window_batches_are_shifted_windows(tmp_path):
    loader = TokenLoader(_arange_shards(tmp_path, _doc_lengths()), seq_len=16, batch_size=4, shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert x[0].tolist() == list(range(16)) and x[1, 0] == 16
    assert torch.equal(y, x + 1)
    for x, y in _take(TokenLoader(tmp_path, 16, 4, seed=3), 20):
        assert torch.equal(y, x + 1) and bool((x[:, 0] % 16 == 0).all())


def test_window_order_is_seeded_and_each_window_is_seen_once_per_epoch(tmp_path):
    _arange_shards(tmp_path, _doc_lengths())
    a, b, c = (TokenLoader(tmp_path, 8, 4, seed=s) for s in (0, 0, 1))
    first_a, first_b, first_c = _take(a, 5), _take(b, 5), _take(c, 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(first_a, first_b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(first_a, first_c))
    loader = TokenLoader(tmp_path, 8, 4, seed=0)
    epoch0 = torch.cat([x[:, 0] for x, _ in loader.iter_epoch_once()]).tolist()
    assert len(epoch0) == len(set(epoch0)) == len(loader) * 4
    assert max(epoch0) + 9 <= loader.shards.meta["num_tokens"]
    epoch1 = torch.cat([x[:, 0] for x, _ in loader.iter_epoch_once()]).tolist()
    # Each epoch draws its own remainder of windows to drop, so compare orders, not sets.
    assert loader.epoch == 1 and len(set(epoch1)) == len(epoch1) and epoch1 != epoch0


def test_validation_passes_repeat(tmp_path):
    loader = TokenLoader(_arange_shards(tmp_path, _doc_lengths()), 8, 4, shuffle=False, world_size=2, rank=1)
    first, second = list(loader.iter_epoch_once()), list(loader.iter_epoch_once())
    assert len(first) == len(second) == len(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    assert first[0][0][0, 0] == 8 * 4  # rank 1 starts with the second global batch


@pytest.mark.parametrize("mode", ["window", "documents"])
def test_ranks_see_disjoint_windows(tmp_path, mode):
    _arange_shards(tmp_path, _doc_lengths())
    loaders = [TokenLoader(tmp_path, 8, 2, seed=5, rank=r, world_size=3, mode=mode) for r in range(3)]
    assert len({len(loader) for loader in loaders}) == 1
    seen = [{tuple(row) for x, _ in loader.iter_epoch_once() for row in x.tolist()} for loader in loaders]
    assert all(len(s) == len(loaders[0]) * 2 for s in seen)
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


@pytest.mark.parametrize("mode", ["window", "documents"])
@pytest.mark.parametrize("consumed", ["mid_epoch", "end_of_epoch", "second_epoch"])
def test_resume_yields_exactly_the_next_batches(tmp_path, mode, consumed):
    _arange_shards(tmp_path, _doc_lengths(), shard_tokens=300)
    original = TokenLoader(tmp_path, 8, 4, seed=7, mode=mode)
    n = len(original)
    skip = {"mid_epoch": n // 2, "end_of_epoch": n, "second_epoch": n + 3}[consumed]
    uninterrupted = _take(TokenLoader(tmp_path, 8, 4, seed=7, mode=mode), skip + n + 2)
    batches = iter(original)
    _take(batches, skip)
    state = original.state_dict()
    assert all(isinstance(v, (int, str, bool)) for v in state.values())
    restored = TokenLoader(tmp_path, 8, 4, seed=7, mode=mode)
    restored.load_state_dict(state)
    # The next n + 2 batches cross into the next epoch.
    for expected, continued, resumed in zip(uninterrupted[skip:], _take(batches, n + 2), _take(restored, n + 2)):
        assert torch.equal(expected[0], continued[0]) and torch.equal(expected[0], resumed[0])
        assert torch.equal(expected[1], resumed[1])


def test_documents_mode_packs_every_token_once_with_documents_whole(tmp_path):
    lengths = _doc_lengths(num_docs=40)
    # Choose the total so that the windows and batches use every token: (N - 1) % T == 0, windows % B == 0.
    seq_len, batch_size = 10, 3
    lengths[-1] += (seq_len * batch_size) - (sum(lengths) - 1) % (seq_len * batch_size)
    _arange_shards(tmp_path, lengths)
    loader = TokenLoader(tmp_path, seq_len, batch_size, seed=2, mode="documents")
    batches = list(loader.iter_epoch_once())
    stream = np.concatenate([x.reshape(-1).numpy() for x, _ in batches] + [batches[-1][1][-1, -1:].numpy()])
    assert sorted(stream.tolist()) == list(range(sum(lengths)))
    doc_of = np.searchsorted(np.cumsum(lengths), stream, side="right")
    runs = np.flatnonzero(np.diff(doc_of)) + 1
    assert len(runs) == len(lengths) - 1  # each document appears as one contiguous run
    assert all(np.all(np.diff(run) == 1) for run in np.split(stream, runs))
    assert not np.all(np.diff(doc_of[runs]) > 0)  # and the documents were shuffled


def test_multi_shard_loader_equals_single_shard(tmp_path):
    lengths = _doc_lengths()
    single = TokenLoader(_arange_shards(tmp_path / "a", lengths), 8, 4, seed=1, mode="documents")
    multi = TokenLoader(_arange_shards(tmp_path / "b", lengths, shard_tokens=200), 8, 4, seed=1, mode="documents")
    assert len(multi.shards.tokens.arrays) > 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(_take(single, 30), _take(multi, 30)))


def test_loader_errors(tmp_path):
    _arange_shards(tmp_path, [20])
    with pytest.raises(ValueError, match="too few"):
        TokenLoader(tmp_path, 8, 4)
    loader = TokenLoader(tmp_path, 4, 2)
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader(tmp_path, 2, 2).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="mode"):
        TokenLoader(tmp_path, 4, 2, mode="bogus")
