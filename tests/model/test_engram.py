"""Engram memory: compression, hashing against its reference, gating at zero, offload, decoding, packing."""

import dataclasses

import pytest
import torch

from slmforge.config.model import AttnConfig, EngramConfig, ModelConfig
from slmforge.model.engram import (Engram, compression_map, context_ids, engram_ref, hash_rows, hash_rows_ref,
                                   table_sizes)
from slmforge.model.lm import LM
from tests.conftest import forward_and_decode


def _cfg(layers="1", **engram) -> ModelConfig:
    e = dict(layers=layers, table_rows=101, dim=8, max_order=3, num_heads=2, kernel=3) | engram
    return ModelConfig(vocab_size=97, d_model=32, num_layers=2, max_seq_len=64,
                       attn=AttnConfig(num_heads=4, num_kv_heads=2), engram=EngramConfig(**e))


def _model(cfg: ModelConfig, dtype=torch.float32) -> LM:
    torch.manual_seed(0)
    model = LM(cfg).to(dtype)
    for engram in getattr(model, "engrams", {}).values():  # a trained-looking convolution (it starts at zero)
        torch.nn.init.normal_(engram.conv, std=0.5)
    return model


def test_compression_merges_case_and_leading_space_variants():
    ids = compression_map(["the", "The", "Ġthe", " THE", "then", "Ġ", " ", "é", "É"])
    assert ids[0] == ids[1] == ids[2] == ids[3]
    assert ids[5] == ids[6] and ids[7] == ids[8]  # "Ġ" is byte-level BPE's space
    assert len({ids[0], ids[4], ids[5], ids[7]}) == 4
    assert sorted(set(ids)) == list(range(len(set(ids))))  # dense canonical ids


def test_tables_have_distinct_prime_sizes():
    sizes = table_sizes(100, 4)
    assert sizes == [101, 103, 107, 109]


def test_hashing_is_deterministic_and_equals_the_reference():
    cfg = _cfg(max_order=4, num_heads=3)
    a, b, other = Engram(cfg, 1), Engram(cfg, 1), Engram(cfg, 2)
    assert torch.equal(a.mult, b.mult) and not torch.equal(a.mult, other.mult)
    c = torch.randint(0, 97, (2, 9))
    ctx = context_ids(c, 4, boundary=97)
    rows = hash_rows(ctx, a.mult, a.primes)
    assert rows.shape == (2, 9, 9)
    assert rows.tolist() == hash_rows_ref(ctx.tolist(), a.mult.tolist(), a.primes.tolist())
    assert torch.equal(rows, hash_rows(ctx, b.mult, b.primes))
    assert bool((rows < a.primes.flatten()).all()) and bool((rows >= 0).all())
    # order 2 of position 0 hashes (c_0, boundary); a different earlier token changes order 3 only
    c2 = c.clone()
    c2[:, 2] = (c[:, 2] + 1) % 97
    r2 = hash_rows(context_ids(c2, 4, 97), a.mult, a.primes)
    assert torch.equal(r2[:, 4, :3], rows[:, 4, :3]) and not torch.equal(r2[:, 4, 3:6], rows[:, 4, 3:6])


def test_context_ids_follow_history_and_documents():
    c = torch.tensor([[5, 6, 7, 8]])
    assert context_ids(c, 3, 99).tolist()[0][1] == [6, 5, 99]
    assert context_ids(c, 3, 99, history=torch.tensor([[1, 2]])).tolist()[0][0] == [5, 2, 1]
    doc = torch.tensor([[0, 0, 1, 1]])
    assert context_ids(c, 3, 99, doc=doc).tolist()[0][2:] == [[7, 99, 99], [8, 7, 99]]


def test_forward_equals_the_loop_reference():
    cfg = _cfg()
    engram = _model(cfg, torch.float64).engrams["1"]
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    memory = torch.randn(2, 11, 4 * 8, dtype=torch.float64)
    torch.testing.assert_close(engram(x, memory), engram_ref(engram, x, memory))


def test_gate_at_zero_gives_the_base_models_output_exactly(monkeypatch):
    base, cfg = _model(dataclasses.replace(_cfg(), engram=EngramConfig())), _cfg("0,1")
    model = _model(cfg)
    missing = model.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("engrams.") or k == "token_map" for k in missing)
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert not torch.equal(model(x)[0], base(x)[0])
        monkeypatch.setattr(Engram, "gate", lambda self, h, k: torch.zeros_like(h[..., :1]))
        assert torch.equal(model(x)[0], base(x)[0])


def test_offloaded_tables_give_the_same_logits_as_in_memory_ones():
    x = torch.randint(0, 97, (2, 12))
    memory_model = _model(_cfg()).to(torch.float64)
    offloaded = _model(_cfg(offload=True)).to(torch.float64)
    table = offloaded.engrams["1"].table.weight
    assert table.dtype == torch.float32 and memory_model.engrams["1"].table.weight.dtype == torch.float64
    with torch.no_grad():
        want = memory_model(x)[0]
        assert torch.equal(offloaded(x)[0], want)
        prefetched = offloaded.engram_memory(x)  # lookups made ahead of the forward
        assert torch.equal(offloaded(x, memory=prefetched)[0], want)
    if torch.cuda.is_available():
        offloaded.to("cuda")
        assert table.device.type == "cpu" and offloaded.head.weight.device.type == "cuda"
        with torch.no_grad():
            torch.testing.assert_close(offloaded(x.cuda())[0].cpu(), want)


def test_cached_decoding_equals_the_full_forward():
    model = _model(_cfg("0,1"))
    x = torch.randint(0, 97, (3, 17))
    full, decoded, caches = forward_and_decode(model, x, prefill=5)
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)
    assert caches[0].history.shape == (3, 2) and caches[0].nbytes() > caches[0].inner.nbytes()
    # left padding: a short row decoded in a padded batch gets the logits it gets alone
    short = x[:1, 4:]
    with torch.no_grad():
        alone = model(short)[0]
        cache = model.init_cache(2, 17, num_pad=torch.tensor([4, 0]))
        padded = model(torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), x[1:2]]), cache=cache)[0]
    torch.testing.assert_close(padded[0, 4:], alone[0], atol=1e-5, rtol=1e-5)


def test_packed_documents_see_only_themselves():
    model = _model(_cfg())
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 9))
    doc = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), doc=doc)[0]
        torch.testing.assert_close(packed[:, 7:], model(b)[0], atol=1e-5, rtol=1e-5)


def test_token_compression_is_a_saved_buffer_that_merges_memories():
    model = _model(_cfg())
    tokens = [f"t{i}" for i in range(95)] + ["Ġhello", "Hello"]
    model.set_token_compression(tokens)
    assert model.token_map[95] == model.token_map[96] and "token_map" in model.state_dict()
    m = model.engram_memory(torch.tensor([[3, 95], [3, 96]]))["1"]
    assert torch.equal(m[0], m[1])


def test_it_learns_and_every_part_gets_a_gradient():
    model = LM(_cfg())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 97, (2, 16))
    for step in range(30):
        _, loss = model(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        if step == 1:  # the convolution starts at zero: its norm's gradient arrives from the second step on
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
    assert loss.item() < 0.5


def test_bad_layer_is_one_line_naming_the_key():
    with pytest.raises(ValueError, match=r"model.engram.layers='5': expected comma-separated layer numbers in 0..1"):
        _cfg("5").validate()
    with pytest.raises(ValueError, match="model.engram.max_order=1"):
        _cfg(max_order=1).validate()


def test_plan_and_info_count_tables_apart_from_compute():
    from slmforge.info import format_info, info
    from slmforge.plan import count_params, flops_per_token

    cfg = _cfg("0,1")
    with torch.device("meta"):
        model = LM(cfg)
    n, tables = count_params(cfg), sum(e.table.weight.numel() for e in model.engrams.values())
    assert n.total == sum(p.numel() for p in model.parameters()) and n.table == tables == 2 * sum(table_sizes(101, 4)) * 8
    assert n.non_embedding == n.total - n.embedding - tables and n.active == n.total - tables + 2 * 4 * 8
    base = dataclasses.replace(cfg, engram=EngramConfig())
    assert count_params(base).table == 0 and count_params(base).active == count_params(base).total
    extra = flops_per_token(cfg, 64)["forward"] - flops_per_token(base, 64)["forward"]
    assert extra == 2 * 2 * (2 * 32 * 32)  # two layers of W_k and W_v, 32 memory wide
    assert f"{tables:,} in Engram tables" in format_info(info(cfg))


def test_training_sets_the_compression_and_never_decays_the_tables(tmp_path, shards_dir):
    from slmforge.checkpoint import load_for_inference
    from slmforge.train.loop import train
    from slmforge.train.optim import param_groups
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(tmp_path, name="engram", max_steps=3)
    data = dataclasses.replace(cfg.data, shards_dir=str(shards_dir / "shards"),
                               tokenizer=str(shards_dir / "tokenizer.json"))
    model_cfg = dataclasses.replace(cfg.model, engram=EngramConfig(layers="1", table_rows=101, dim=8))
    train(dataclasses.replace(cfg, data=data, model=model_cfg), progress=False)
    model, tok, _ = load_for_inference(cfg.run_dir)
    tokens = [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
    assert model.token_map[: len(tokens)].tolist() == compression_map(tokens)
    assert len(set(model.token_map.tolist())) < len(model.token_map)  # some variants merged
    groups = param_groups(model, 0.1)
    table = model.engrams["1"].table.weight
    holding = [g for g in groups if any(p is table for p in g["params"])]
    assert len(holding) == 1 and holding[0]["weight_decay"] == 0.0
