"""Dedup: the vectorised MinHash equals its loop reference, MinHash and LSH follow their statistics, planted
near-duplicates are found, sharded runs equal a single run, and bad input is skipped and counted."""

import json

import numpy as np
import pytest

from slmforge.curate.dedup import (DedupConfig, MinHasher, _components, band_hashes, candidate_probability, dedup,
                                 jaccard_sorted, lsh_params, minhash, minhash_ref, shingle_hashes, shingle_sets,
                                 shingles_ref)
from slmforge.curate.minhash_kernels import pair_jaccard
from slmforge.curate.documents import Document, read_documents, write_jsonl

NGRAM = 5


def _vocab(rng, size=50_000):
    letters = rng.integers(0, 26, (size, 7)) + ord("a")
    return ["".join(map(chr, row)) for row in letters]


def _pair(rng, vocab, num_words, target, fresh):
    """(words a, words b, exact word-5-gram Jaccard) with b = a after k single-word edits NGRAM apart.

    Each edit changes exactly NGRAM shingles, so J = (S - NGRAM k) / (S + NGRAM k) with S = num_words - NGRAM + 1.
    """
    a = [vocab[i] for i in rng.integers(0, len(vocab), num_words)]
    num_shingles = num_words - NGRAM + 1
    k = int(round(num_shingles * (1 - target) / (NGRAM * (1 + target))))
    b = list(a)
    for p in rng.choice(np.arange(0, num_words, NGRAM), k, replace=False):
        b[p] = f"new{next(fresh)}"
    sa, sb = (set(zip(*(w[i:] for i in range(NGRAM)))) for w in (a, b))
    return a, b, len(sa & sb) / len(sa | sb)


def _counter():
    i = 0
    while True:
        yield i
        i += 1


# ---------------------------------------------------------------- reference and statistics

TEXTS = ["", "!!!", "a", "Hello, World!", "one two three four", "the cat sat on the mat " * 3, "x" * 40,
         "Ünïcode wörds — and ‘quotes’, İstanbul ΣΊΣΥΦΟΣ straße", "tabs\tand\nnew\r\nlines  ... and (parens)",
         "emoji 🙂 in the middle of words🙂like this"]


@pytest.mark.parametrize("shingle,ngram", [("word", 5), ("word", 1), ("word", 3), ("char", 5), ("char", 2)])
def test_minhash_matches_reference(shingle, ngram):
    rng = np.random.default_rng(0)
    vocab = ["alpha", "Beta", "γάμμα", "d.e", "f-g", "h", "...", "—", "\n\n", "İ", "42"]
    texts = TEXTS + [" ".join(rng.choice(vocab, rng.integers(0, 60))) for _ in range(20)]
    hasher = MinHasher(32, ngram, shingle, seed=7)
    signatures, sh, _ = hasher.sign(texts)
    assert (minhash(*shingle_sets(sh), hasher.a, hasher.b) == signatures).all()  # repeats do not change minima
    for i, text in enumerate(texts):
        assert sh.hashes[sh.offsets[i]:sh.offsets[i + 1]].tolist() == shingles_ref(text, ngram, shingle), text
        assert signatures[i].tolist() == minhash_ref(text, 32, ngram, shingle, seed=7), text


def test_normalisation_and_exact_hash():
    sh = shingle_hashes(["Hello, World!", "hello   world", "HELLO\nWORLD...", "hello worlds", "!!!"])
    assert sh.exact[0] == sh.exact[1] == sh.exact[2] != sh.exact[3]
    assert sh.num_words.tolist() == [2, 2, 2, 2, 0]
    assert np.diff(sh.offsets).tolist() == [1, 1, 1, 1, 0]  # shorter than n: one shingle; no words: none


def test_components_match_plain_union_find():
    rng = np.random.default_rng(1)
    n = 500
    edges = rng.integers(0, n, (400, 2))
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for u, v in edges.tolist():
        ru, rv = find(u), find(v)
        parent[max(ru, rv)] = min(ru, rv)
    assert _components(n, edges).tolist() == [find(x) for x in range(n)]


def test_lsh_params_match_datasketch():
    # Values from datasketch 2.0's _optimal_param (scipy quad integration).
    assert lsh_params(0.8, 128) == (9, 13)
    assert lsh_params(0.5, 128) == (25, 5)
    assert lsh_params(0.9, 128) == (5, 25)
    assert lsh_params(0.7, 128) == (14, 9)
    assert lsh_params(0.8, 128, 0.3, 0.7) == (11, 11)
    assert lsh_params(0.8, 128, 0.05, 0.95) == (16, 8)


@pytest.fixture(scope="module")
def pairs():
    """400 pairs at each of four similarities, 400 words each, with their signatures."""
    rng, fresh = np.random.default_rng(2), _counter()
    vocab = _vocab(rng)
    texts, truth = [], []
    for target in (0.3, 0.6, 0.8, 0.95):
        for _ in range(400):
            a, b, j = _pair(rng, vocab, 400, target, fresh)
            texts += [" ".join(a), " ".join(b)]
            truth.append(j)
    signatures, _, _ = MinHasher(128, NGRAM, "word", seed=1).sign(texts)
    return signatures[0::2], signatures[1::2], np.array(truth)


def test_minhash_estimate_tracks_jaccard(pairs):
    sig_a, sig_b, truth = pairs
    estimate = (sig_a == sig_b).mean(axis=1)
    for target in np.unique(np.round(truth, 1)):
        sel = np.round(truth, 1) == target
        j = truth[sel].mean()
        sigma = np.sqrt(j * (1 - j) / 128)
        error = estimate[sel] - truth[sel]
        print(f"J={j:.3f}: bias {error.mean():+.4f}, std {error.std():.4f} (theory {sigma:.4f}), "
              f"max |error| {np.abs(error).max():.4f}")
        assert abs(error.mean()) < 4 * sigma / np.sqrt(sel.sum())
        assert 0.8 * sigma < error.std() < 1.2 * sigma
        assert np.abs(error).max() < 5 * sigma


@pytest.mark.parametrize("num_bands,rows_per_band", [(16, 8), (9, 13)])
def test_lsh_candidate_probability_follows_s_curve(pairs, num_bands, rows_per_band):
    sig_a, sig_b, truth = pairs
    shared = (band_hashes(sig_a, num_bands, rows_per_band) == band_hashes(sig_b, num_bands, rows_per_band)).any(1)
    for target in np.unique(np.round(truth, 1)):
        sel = np.round(truth, 1) == target
        expected = candidate_probability(truth[sel], num_bands, rows_per_band).mean()
        observed = shared[sel].mean()
        print(f"b={num_bands} r={rows_per_band} J={truth[sel].mean():.3f}: candidates {observed:.3f}, "
              f"S-curve {expected:.3f}")
        assert abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / sel.sum()) + 0.01


def test_shingle_sets_give_exact_jaccard():
    rng, fresh = np.random.default_rng(3), _counter()
    vocab = _vocab(rng, 1000)
    a, b, j = _pair(rng, vocab, 300, 0.7, fresh)
    values, offsets = shingle_sets(shingle_hashes([" ".join(a), " ".join(b)]))
    assert jaccard_sorted(values[offsets[0]:offsets[1]], values[offsets[1]:offsets[2]]) == pytest.approx(j)


# ---------------------------------------------------------------- the whole pipeline

LEVELS = (0.95, 0.9, 0.85, 0.8, 0.7, 0.5)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """400 unrelated documents of 200-400 words, then 40 edited copies at each similarity level."""
    rng, fresh = np.random.default_rng(4), _counter()
    vocab = _vocab(rng)
    docs, copies = [], []
    for level in LEVELS:
        for _ in range(40):
            a, b, j = _pair(rng, vocab, int(rng.integers(200, 400)), level, fresh)
            docs.append(Document(f"base{len(docs)}", " ".join(a)))
            copies.append((Document(f"copy{len(copies)}", " ".join(b)), docs[-1].id, j, level))
    docs += [Document(f"base{len(docs) + i}", " ".join(_pair(rng, vocab, 300, 1.0, fresh)[0])) for i in range(160)]
    path = tmp_path_factory.mktemp("planted") / "corpus.jsonl"
    write_jsonl(path, docs + [c[0] for c in copies])
    return path, copies


def _removed(out_dir):
    with open(out_dir / "removed.jsonl", encoding="utf-8") as f:
        return {r["id"]: r for r in map(json.loads, f)}


def test_planted_near_duplicates(planted, tmp_path):
    path, copies = planted
    report = dedup(DedupConfig(inputs=[str(path)], out_dir=str(tmp_path), num_workers=1))["clusters"]
    removed = _removed(tmp_path)
    truth, levels = np.array([c[2] for c in copies]), np.array([c[3] for c in copies])
    found = np.array([removed.get(c.id, {}).get("cluster") == original for c, original, _, _ in copies])
    print(f"\nb={report['lsh']['num_bands']} r={report['lsh']['rows_per_band']}, threshold 0.8, exact verification")
    for level in LEVELS:
        sel = levels == level
        print(f"  {sel.sum()} pairs at J {truth[sel].min():.3f}-{truth[sel].max():.3f}: {found[sel].sum()} removed")
    print(f"  recall at J >= 0.85: {found[truth >= 0.85].mean():.3f}; removed below 0.8: {found[truth < 0.8].sum()}")
    assert found[truth >= 0.85].mean() >= 0.95
    assert not found[truth < 0.8].any()  # verification rejects every candidate below the threshold
    assert all(r["id"].startswith("copy") for r in removed.values())  # no unrelated document removed
    assert all(r["jaccard"] >= 0.8 for r in removed.values())
    kept = {d.id for d in read_documents(tmp_path / "kept" / "00000-of-00001.jsonl")}
    assert len(kept) == report["num_kept"] == 400 + len(copies) - len(removed)
    assert report["cluster_sizes"] == {"2": len(removed)} and len(report["examples"]) == 5


def test_lsh_without_verification_follows_the_s_curve(planted, tmp_path):
    path, copies = planted
    dedup(DedupConfig(inputs=[str(path)], out_dir=str(tmp_path), num_workers=1, verify=False,
                      false_positive_weight=0.5, false_negative_weight=0.5))  # datasketch's balance: (9, 13)
    removed = _removed(tmp_path)
    truth = np.array([c[2] for c in copies])
    found = np.array([c[0].id in removed for c in copies])
    assert found[truth > 0.93].mean() >= 0.95 and found[truth < 0.6].sum() <= 1
    expected = candidate_probability(truth, 9, 13).sum()
    assert abs(found.sum() - expected) < 4 * np.sqrt(expected)
    assert all(r["jaccard"] is None for r in removed.values())


@pytest.mark.parametrize("keep", ["first", "longest"])
def test_exact_and_near_duplicates_and_survivor(tmp_path, keep):
    base = "the quick brown fox jumps over the lazy dog near the river bank today " * 6
    docs = [Document("a", "Hello, World! " + base), Document("b", "hello world " + base),  # b: exact dup of a
            Document("c", "HELLO world... " + base + " and more"),  # near-duplicate, the longest
            Document("d", "something else entirely different " * 5)]
    write_jsonl(tmp_path / "in.jsonl", docs)
    cfg = DedupConfig(inputs=[str(tmp_path / "in.jsonl")], out_dir=str(tmp_path / "out"), keep=keep, num_workers=1)
    report = dedup(cfg)["clusters"]
    removed = _removed(tmp_path / "out")
    kept = [d.id for d in read_documents(tmp_path / "out" / "kept" / "00000-of-00001.jsonl")]
    if keep == "first":
        assert kept == ["a", "d"] and {r["cluster"] for r in removed.values()} == {"a"}
        assert (removed["b"]["reason"], removed["c"]["reason"]) == ("exact", "near")
        assert (report["num_exact_removed"], report["num_near_removed"]) == (1, 1)
    else:
        # The reason is relative to the survivor: a and b are exact copies of each other, near ones of c.
        assert kept == ["c", "d"] and {r["cluster"] for r in removed.values()} == {"c"}
        assert removed["a"]["reason"] == removed["b"]["reason"] == "near"
    assert report["cluster_sizes"] == {"3": 1} and report["examples"][0]["size"] == 3


def test_shards_equal_one_run(planted, tmp_path):
    path, _ = planted
    cfg = DedupConfig(inputs=[str(path)], out_dir=str(tmp_path / "one"), num_workers=2)
    dedup(cfg)
    sharded = DedupConfig(inputs=[str(path)], out_dir=str(tmp_path / "three"), num_workers=1)
    for stage, ranks in (("signatures", range(3)), ("clusters", [None]), ("write", range(3))):
        for rank in ranks:
            dedup(sharded, stage=stage, shard_index=rank, num_shards=3)
    assert _removed(tmp_path / "one") == _removed(tmp_path / "three")
    kept_one = [d.id for d in read_documents(tmp_path / "one" / "kept")]
    kept_three = [d.id for d in read_documents(tmp_path / "three" / "kept")]
    assert sorted(kept_one) == sorted(kept_three) and len(kept_one) == 640 - len(_removed(tmp_path / "one"))
    # A finished shard is reused: its files are not rewritten.
    bands = tmp_path / "three" / "signatures" / "00001-of-00003" / "bands.bin"
    before = bands.stat().st_mtime_ns
    dedup(sharded, stage="signatures", shard_index=1, num_shards=3)
    assert bands.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="no finished signatures"):
        dedup(sharded, stage="clusters", num_shards=4)


def test_bad_input_is_skipped_and_counted(tmp_path):
    text = "a perfectly ordinary document with enough words to have several shingles in it "
    path = tmp_path / "in.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps({"id": "ok1", "text": text * 2}).encode() + b"\n")
        f.write(b'{"id": "broken", "text": \n')  # malformed JSON
        f.write(b'[1, 2, 3]\n')  # not an object
        f.write(b'{"id": "bad-bytes", "text": "caf\xe9"}\n')  # invalid UTF-8
        f.write(json.dumps({"id": "empty", "text": "   "}).encode() + b"\n")
        f.write(json.dumps({"id": "huge", "text": "word " * 400}).encode() + b"\n")
        f.write(b'{"id": "surrogate", "text": "lone \\ud800 surrogate"}\n')
        f.write(json.dumps({"id": "ok2", "text": text * 2}).encode() + b"\n")
        f.write(json.dumps({"id": "punct", "text": "!!! ??? ..."}).encode() + b"\n")
    report = dedup(DedupConfig(inputs=[str(path)], out_dir=str(tmp_path / "out"), max_doc_bytes=1000,
                               num_workers=1))["clusters"]
    read = report["read"]
    assert (read["num_malformed_skipped"], read["num_invalid_utf8_skipped"], read["num_empty_skipped"]) == (2, 2, 1)
    assert "line 2" in read["errors"][0] and "lone surrogate" in read["errors"][-1]
    assert report["skipped"] == {"too_large": 1}
    assert report["num_removed"] == 1 and report["num_without_words"] == 1
    kept = [d.id for d in read_documents(tmp_path / "out" / "kept" / "00000-of-00001.jsonl")]
    assert kept == ["ok1", "punct"]
    # Nothing readable at all is an error with the counts, and leaves no output folder behind.
    (tmp_path / "broken.jsonl").write_bytes(b"{broken\n[1]\n")
    with pytest.raises(ValueError, match=r"0 documents read from .*broken.jsonl, 2 records: 2 malformed"):
        dedup(DedupConfig(inputs=[str(tmp_path / "broken.jsonl")], out_dir=str(tmp_path / "none"), num_workers=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl", "in.jsonl", "out"]


def test_pair_jaccard_kernel_equals_reference():
    rng = np.random.default_rng(3)
    sets = [np.unique(rng.integers(0, 60, rng.integers(0, 40))).astype(np.uint32) for _ in range(30)]
    sets[0] = sets[1] = np.zeros(0, np.uint32)  # empty against empty is 1.0, empty against non-empty 0.0
    stored = [rng.permutation(np.r_[s, s[: len(s) // 2]]) for s in sets]  # in any order, with repeats
    values = np.concatenate(stored).astype(np.uint32)
    offsets = np.r_[0, np.cumsum([len(s) for s in stored])].astype(np.int64)
    rows_a, rows_b = rng.integers(0, 30, 200), rng.integers(0, 30, 200)
    rows_a[:2], rows_b[:2] = [0, 0], [1, 5]
    got = pair_jaccard(values, offsets, rows_a, values, offsets, rows_b)
    want = [jaccard_sorted(sets[i], sets[j]) for i, j in zip(rows_a, rows_b)]
    assert got.tolist() == want
