"""FlexOlmo (``slmforge flex``): expert training leaves the base alone, merging with no experts is the base, opting a
source out equals merging without it, router embeddings are the domains' mean FFN inputs, context routing reads the
running mean (cached chunks route as the full sequence), bad input is one line."""

import json

import pytest
import torch

from slmforge.checkpoint import find_checkpoint, load_for_inference, read_checkpoint
from slmforge.cli import main
from slmforge.config import ModelConfig
from slmforge.model.cache import Cache
from slmforge.model.flexmoe import FlexMoE
from slmforge.post.flex import (_split, anchor_weights, ffn_input_moments, flex_configs, flex_train, held_out_docs,
                                router_embeddings, router_row, shrunk_inverse)
from slmforge.post.flex_merge import flex_merge, flex_optout, flex_report
from slmforge.synth.knowledge import KnowledgeBase, candidates
from tests.conftest import make_run

FAST = ["train.max_steps=4", "train.ckpt_every=4", "train.eval_every=4", "train.batch_size=4", "train.eval_batches=2",
        "train.warmup_steps=1", "train.lr_peak=1e-2", "router_docs=20"]


def _source_files(root, kb, source):
    docs, questions = root / f"docs{source}.jsonl", root / f"questions{source}.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in kb.documents(source)))
    questions.write_text("".join(json.dumps({"prompt": p, "answer": a, "candidates": candidates(a)}) + "\n"
                                 for p, a in kb.questions(source)[:12]))
    return docs, questions


@pytest.fixture(scope="module")
def flex(tmp_path_factory):
    """A tiny base run and two experts (sources a and b of a knowledge base), one trained through the CLI."""
    root = tmp_path_factory.mktemp("flex")
    base = make_run(root, "base")
    kb = KnowledgeBase(num_entities=16, num_sources=2, seed=3)
    experts = {}
    for source, name in ((0, "a"), (1, "b")):
        docs, questions = _source_files(root, kb, source)
        keys = [f"source={name}", f"data={docs}", f"questions={questions}", *FAST]
        if name == "a":
            flex_train(base, *flex_configs(base, keys), progress=False)
        else:
            assert main(["flex", "train", str(base), *keys]) == 0
        experts[name] = root / f"base_{name}"
    return {"root": root, "base": base, "experts": experts, "kb": kb}


def _logits(run, ids):
    with torch.no_grad():
        return load_for_inference(run)[0](ids)[0]


IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))


def test_merging_no_experts_gives_the_base_logits_exactly(flex):
    merged = flex_merge(flex["base"], [], name="merged_none")
    assert load_for_inference(merged)[2].model.ffn == "flexmoe"
    assert torch.equal(_logits(merged, IDS), _logits(flex["base"], IDS))


def test_expert_training_leaves_the_base_unchanged(flex):
    base_sd = load_for_inference(flex["base"])[0].state_dict()
    init = read_checkpoint(find_checkpoint(flex["experts"]["a"] / "init")[1])[0]
    for name, run in flex["experts"].items():
        sd = load_for_inference(run)[0].state_dict()
        for key, value in anchor_weights(base_sd).items():
            assert torch.equal(sd[key], value), key
        ffn = "blocks.0.ffn"
        if name == "a":
            assert torch.equal(sd[f"{ffn}.router_anchor"], init[f"{ffn}.router_anchor"])
            assert not torch.equal(sd[f"{ffn}.w13"], init[f"{ffn}.w13"])  # the expert itself learned
            assert not torch.equal(sd[f"{ffn}.router_experts"], init[f"{ffn}.router_experts"])
        # The expert started as a copy of the base FFN.
        assert torch.equal(init[f"{ffn}.w13"][0], base_sd[f"{ffn}.w13.weight"].t())


def test_opting_out_equals_merging_without_that_expert(flex):
    a, b = flex["experts"]["a"], flex["experts"]["b"]
    merged = flex_merge(flex["base"], [a, b], name="merged_ab")
    out = flex_optout(merged, ["a"])
    assert out.name == "merged_ab_without_a"
    only_b = flex_merge(flex["base"], [b], name="merged_b")
    cut, ref = load_for_inference(out)[0].state_dict(), load_for_inference(only_b)[0].state_dict()
    assert cut.keys() == ref.keys() and all(torch.equal(cut[k], ref[k]) for k in ref)
    assert torch.equal(_logits(out, IDS), _logits(only_b, IDS))
    assert not torch.equal(_logits(merged, IDS), _logits(out, IDS))
    # Opting every source out leaves the base.
    none = flex_optout(merged, ["a", "b"], name="merged_empty")
    assert torch.equal(_logits(none, IDS), _logits(flex["base"], IDS))


def test_router_embeddings_are_the_mean_ffn_input_per_layer(flex):
    model, tok, cfg = load_for_inference(flex["base"])
    texts = flex["kb"].documents(0)[:5]
    rows = router_embeddings(model, tok, texts, 16, max_docs=5)
    # Independently: the FFN norms' outputs (the FFN inputs), concatenated, then averaged.
    seen = {i: [] for i in range(len(model.blocks))}
    hooks = [b.ffn_norm.register_forward_hook(lambda m, a, o, i=i: seen[i].append(o.reshape(-1, o.shape[-1])))
             for i, b in enumerate(model.blocks)]
    ids = [i for t in texts for i in tok.encode(t) + [tok.eos_id]]
    with torch.no_grad():
        for s in range(0, len(ids), 16):
            model(torch.tensor(ids[s : s + 16])[None])
    for h in hooks:
        h.remove()
    assert sorted(rows) == [f"blocks.{i}.ffn" for i in seen]
    for i, outs in seen.items():
        torch.testing.assert_close(rows[f"blocks.{i}.ffn"], torch.cat(outs).mean(0), rtol=1e-5, atol=1e-6)
    other = router_embeddings(model, tok, flex["kb"].documents(1)[:5], 16, max_docs=5)
    assert not torch.allclose(other["blocks.0.ffn"], rows["blocks.0.ffn"])
    # The expert run's starting router: the public rows (the base's held-out documents) and its source's, whitened
    # by the public covariance (router=lda, the default).
    flex_cfg, run_cfg = flex_configs(flex["base"], ["source=a", f"data={flex['root'] / 'docs0.jsonl'}", *FAST])
    init = read_checkpoint(find_checkpoint(flex["experts"]["a"] / "init")[1])[0]
    public = ffn_input_moments(model, tok, held_out_docs(flex["base"]), run_cfg.data.seq_len, 20, covariance=True)
    own = router_embeddings(model, tok, _split(flex_cfg, run_cfg.data.seed)[0],
                            run_cfg.data.seq_len, 20)
    for i in seen:
        ffn = f"blocks.{i}.ffn"
        mean, cov = public[ffn]
        precision = shrunk_inverse(cov, flex_cfg.router_shrink)
        for key, m in (("anchor", mean), ("experts", own[ffn])):
            row, bias = router_row(m, precision)
            assert torch.equal(init[f"{ffn}.router_{key}"][0], row) and torch.equal(init[f"{ffn}.router_{key}_bias"][0],
                                                                                   bias)


def test_router_rows_pick_the_nearest_domain_mean():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 8, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3, 0.5, 2])[:, None]
    a = torch.randn(8, 8, generator=g, dtype=torch.float64)
    cov = a @ a.t() + torch.eye(8, dtype=torch.float64)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64) * 3
    for precision in (None, torch.linalg.inv(cov)):
        rows = [router_row(m, precision) for m in means]
        logits = x @ torch.stack([r for r, _ in rows]).t() + torch.stack([b for _, b in rows])
        p = torch.eye(8, dtype=torch.float64) if precision is None else precision
        diff = x[:, None, :] - means[None]  # (N, E, C)
        distance = torch.einsum("nec,cd,ned->ne", diff, p, diff)
        assert torch.equal(logits.argmax(1), distance.argmin(1))
    # Tokens near the smallest mean go to it with the bias; by plain dot products a larger mean takes them.
    near = means[2] + 0.05 * torch.randn(50, 8, generator=g, dtype=torch.float64)
    rows = torch.stack([router_row(m)[0] for m in means])
    biases = torch.stack([router_row(m)[1] for m in means])
    assert ((near @ rows.t() + biases).argmax(1) == 2).all() and not ((near @ rows.t()).argmax(1) == 2).all()


def test_flexmoe_dispatch_matches_reference_and_routes_by_embedding():
    cfg = ModelConfig(d_model=16, ffn_hidden=24)
    cfg.flexmoe.sources, cfg.flexmoe.top_k = "x,y,z", 2
    layer = FlexMoE(cfg).double()
    layer.reset_parameters(0.3, 0.2)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    fast = layer(x)[0]
    layer.reference = True
    torch.testing.assert_close(layer(x)[0], fast, rtol=0, atol=1e-12)
    # A router row that dominates every token: the output is that expert (the anchor here) alone.
    x[..., 0] = 1.0
    with torch.no_grad():
        layer.router_experts.zero_()
        layer.router_anchor.zero_()[0, 0] = 100.0
        layer.top_k = 1
    torch.testing.assert_close(layer(x)[0], layer.anchor(x)[0], rtol=0, atol=1e-12)


def test_report_has_every_domain_and_model(flex):
    merged = flex_merge(flex["base"], list(flex["experts"].values()), name="merged_report")
    report = flex_report(merged, max_docs=10)
    assert report["sources"] == ["a", "b"] and report["domains"] == ["public", "a", "b"]
    rows = {r["domain"]: r for r in report["table"]}
    assert "expert_loss" not in rows["public"] and "base_fact_accuracy" not in rows["public"]
    for d in ("a", "b"):
        assert {"base_loss", "expert_loss", "merged_loss", "opted_out_loss", "base_fact_accuracy",
                "opted_out_fact_accuracy"} <= rows[d].keys()
        assert 0 <= rows[d]["merged_fact_accuracy"] <= 1
    assert json.loads((merged / "report.json").read_text())["table"] == report["table"]
    assert "| a |" in (merged / "report.md").read_text()
    # Routing diagnostic: per domain, each expert's share of the gate weight (the anchor is "public").
    assert list(report["routing"]) == ["public", "a", "b"]
    for shares in report["routing"].values():
        assert list(shares) == ["public", "a", "b"] and abs(sum(shares.values()) - 1) < 1e-9
    assert "| domain | public | a | b |" in (merged / "report.md").read_text()


def test_bad_inputs_are_one_line_errors(flex, tmp_path, capsys):
    merged = flex_merge(flex["base"], [flex["experts"]["a"]], name="merged_bad")
    cases = [(["flex", "merge", str(tmp_path / "missing")], "no such run folder"),
             (["flex", "optout", str(merged), "source=zzz"], "no source 'zzz'"),
             (["flex", "merge", str(flex["base"]), str(flex["base"])], "not a FlexOlmo expert run"),
             (["flex", "train", str(flex["base"]), "source=c"], "data= is empty"),
             (["flex", "report", str(flex["base"])], "no flex.json"),
             (["flex", "train", str(flex["base"]), "source=a", f"data={flex['root'] / 'docs0.jsonl'}"], "--resume")]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not (flex["root"] / "base_c").exists()


def _context_layer(top_k=1, prior=4.0):
    cfg = ModelConfig(d_model=16, ffn_hidden=24)
    cfg.flexmoe.sources, cfg.flexmoe.top_k, cfg.flexmoe.context_prior = "x,y,z", top_k, prior
    layer = FlexMoE(cfg).double()
    layer.reset_parameters(0.3, 0.2)
    with torch.no_grad():
        layer.router_prior.normal_()
    return layer


def test_context_routing_reads_the_running_mean_with_the_public_prior():
    layer = _context_layer(prior=3.0)
    assert layer.router_input == "context"
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    t = torch.arange(1, 10, dtype=torch.float64)[None, :, None]
    expected = (x.cumsum(1) + 3.0 * layer.router_prior) / (t + 3.0)
    torch.testing.assert_close(layer.context(x), expected.reshape(-1, 16), rtol=0, atol=1e-12)
    layer.router_input = "token"
    assert torch.equal(layer.context(x), x.reshape(-1, 16))
    # A document far from the public mean leaves the anchor once its context outweighs the prior.
    layer.router_input, layer.context_prior = "context", 8.0
    with torch.no_grad():
        layer.router_experts.zero_()[0] = 1.0
        layer.router_anchor.zero_()
        layer.router_experts_bias.fill_(-2.1)
        layer.router_prior.zero_()
    doc = torch.ones(1, 12, 16, dtype=torch.float64) / 4  # expert x: 4 t / (t + 8) - 2.1 > 0 once t > 8.8
    chosen = layer.route(doc)[0][:, 0]
    assert chosen.tolist() == [0] * 8 + [1] * 4


@pytest.mark.parametrize("top_k", [1, 2])
def test_cached_chunks_route_as_the_full_sequence(top_k):
    layer = _context_layer(top_k)
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    full = layer(x)[0]
    cache, outs = Cache(), []
    for start, stop in ((0, 5), (5, 6), (6, 7), (7, 11)):  # a prefill, then one token at a time, then a chunk
        cache.pos += stop - start  # the block's mixer writes its slots before the FFN runs
        outs.append(layer(x[:, start:stop], cache=cache)[0])
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-10)
    # Left padding: a padded row decodes as it would alone.
    num_pad = torch.tensor([0, 3, 1])
    padded = torch.randn(3, 11, 16, dtype=torch.float64)
    for b, p in enumerate(num_pad.tolist()):
        padded[b, p:] = x[b, : 11 - p]
    cache, outs = Cache(), []
    cache.left_pad(num_pad)
    for start, stop in ((0, 6), (6, 7), (7, 11)):
        cache.pos += stop - start
        outs.append(layer(padded[:, start:stop], cache=cache)[0])
    out = torch.cat(outs, 1)
    for b, p in enumerate(num_pad.tolist()):
        torch.testing.assert_close(out[b, p:], layer(x[b : b + 1, : 11 - p])[0][0], rtol=0, atol=1e-10)


def test_merge_keeps_the_experts_router_input_and_the_public_prior(flex):
    merged = flex_merge(flex["base"], list(flex["experts"].values()), name="merged_prior")
    model, _, cfg = load_for_inference(merged)
    assert cfg.model.flexmoe.router_input == "context"
    expert = load_for_inference(flex["experts"]["a"])[0].state_dict()
    sd = model.state_dict()
    assert torch.equal(sd["blocks.0.ffn.router_prior"], expert["blocks.0.ffn.router_prior"])
    assert sd["blocks.0.ffn.router_prior"].abs().sum() > 0


def test_decoding_a_context_routed_merge_equals_full_recompute(flex):
    """KV-cached, left-padded, batched generation carries the routing's running sums (``Block`` passes the cache
    to the FFN, ``Cache.keep`` trims them with finished rows): the same tokens as recomputing every prefix."""
    from slmforge.serve.batching import unmergeable
    from slmforge.serve.generate import generate_batch, generate_batch_ref

    merged = flex_merge(flex["base"], list(flex["experts"].values()), name="merged_decode")
    model = load_for_inference(merged)[0].eval()
    assert any(getattr(m, "takes_cache", False) for m in model.modules())
    prompts = [IDS[0, :5].tolist(), IDS[1, :12].tolist(), IDS[0, 3:20].tolist()]
    ref = generate_batch_ref(model, prompts, 10)
    assert generate_batch(model, prompts, 10) == ref
    early = generate_batch(model, prompts, 10, eos_id=ref[1][2])  # rows end at different steps, caches kept
    assert early == generate_batch_ref(model, prompts, 10, eos_id=ref[1][2])
    assert unmergeable(model) is not None  # continuous batching falls back to static for it
