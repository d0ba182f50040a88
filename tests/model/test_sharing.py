"""Parameter sharing (MobiLlama shared FFN, MobileLLM block repeat) and OpenELM layer-wise scaling."""

import dataclasses

import numpy as np
import pytest
import torch

from slmforge.config import AttnConfig, ModelConfig, ScalingConfig, SSMConfig
from slmforge.model.lm import LM
from slmforge.plan import count_params
from tests.conftest import assert_tiny_lm_learns

BASE = ModelConfig(vocab_size=97, d_model=32, num_layers=4, max_seq_len=64, ffn_hidden=48,
                   attn=AttnConfig(num_heads=4, num_kv_heads=2), ssm=SSMConfig(state_dim=8, head_dim=16, chunk_size=8))
VARIANTS = {
    "share_ffn": dict(share_ffn=True),
    "repeat2": dict(block_repeat=2),
    "repeat2_share_ffn": dict(block_repeat=2, share_ffn=True),
    "repeat2_hybrid": dict(block_repeat=2, layers="attn,ssm"),
    "share_ffn_all_mixers": dict(share_ffn=True, layers="attn,ssm,linear,hymba"),
    "repeat4_hymba": dict(block_repeat=4, layers="hymba"),
    "scaling": dict(scaling=ScalingConfig(enabled=True, ffn_multiple=16)),
    "scaling_repeat2_hybrid": dict(block_repeat=2, layers="attn,linear",
                                   scaling=ScalingConfig(enabled=True, ffn_multiple=16)),
}
SHARING = [k for k in VARIANTS if not k.startswith("scaling")]


def _cfg(name: str, **extra) -> ModelConfig:
    return dataclasses.replace(BASE, **VARIANTS[name], **extra)


def _unshared_copy(model: LM) -> LM:
    """The same network with every layer's weights its own copy: the reference for sharing."""
    cfg = model.cfg
    ref = LM(dataclasses.replace(cfg, share_ffn=False, block_repeat=1, layers=",".join(cfg.layer_kinds())))
    with torch.no_grad():
        for name in ("tok_emb", "norm", "head"):
            getattr(ref, name).load_state_dict(getattr(model, name).state_dict())
        for layer, block in zip(ref.blocks, model.layers()):
            state = block.state_dict()
            if model.ffn is not None:
                state.update({f"ffn.{k}": v for k, v in model.ffn.state_dict().items()})
            layer.load_state_dict(state)
    return ref


def _uses(model: LM) -> list[set[int]]:
    """The ids of the parameters each layer application reads."""
    shared = [] if model.ffn is None else list(model.ffn.parameters())
    return [{id(p) for p in [*block.parameters(), *shared]} for block in model.layers()]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_equals_forward(name):
    model = LM(_cfg(name)).eval()
    x = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        full, _ = model(x)
        cache = model.init_cache(2, 21)
        assert len(cache) == model.cfg.num_layers and len({id(c) for c in cache}) == len(cache)
        outs = [model(x[:, :9], cache=cache)[0]] + [model(x[:, i : i + 1], cache=cache)[0] for i in range(9, 21)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SHARING)
def test_shared_weights_are_one_tensor_with_the_gradient_of_every_use(name):
    model = LM(_cfg(name))
    uses = _uses(model)
    reused = set.union(*(a & b for i, a in enumerate(uses) for b in uses[i + 1 :]))
    assert reused  # the variant really shares something
    if model.cfg.block_repeat > 1:
        assert model.layers()[0] is model.layers()[1]
        assert model.layers()[0].mixer_norm.weight is model.layers()[1].mixer_norm.weight

    ref = _unshared_copy(model)
    x = torch.randint(0, 97, (2, 17))
    logits, loss = model(x[:, :-1], targets=x[:, 1:])
    ref_logits, ref_loss = ref(x[:, :-1], targets=x[:, 1:])
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    loss.backward()
    ref_loss.backward()
    # A shared weight's gradient is the sum of the gradients of the copies that every layer using it holds.
    for j, block in enumerate(model.blocks):
        users = [i for i, b in enumerate(model.block_index) if b == j]
        for pname, p in block.named_parameters():
            expected = sum(ref.blocks[i].get_parameter(pname).grad for i in users)
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)
    if model.ffn is not None:
        for pname, p in model.ffn.named_parameters():
            expected = sum(b.ffn.get_parameter(pname).grad for b in ref.blocks)
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_count_params_is_exact(name, tie):
    cfg = _cfg(name, tie_embeddings=tie)
    with torch.device("meta"):
        model = LM(cfg)
    n = count_params(cfg)
    params = list(model.parameters())
    assert n.total == sum(p.numel() for p in params)
    embedding = {id(model.tok_emb.weight), id(model.head.weight)}
    assert n.non_embedding == sum(p.numel() for p in params if id(p) not in embedding)
    uses = _uses(model)
    assert n.shared == sum(p.numel() for p in params if sum(id(p) in u for u in uses) > 1)
    assert n.per_layer == [sum(p.numel() for p in params if id(p) in u) for u in uses]


def test_sharing_cuts_parameters_not_depth():
    plain, repeat = count_params(BASE), count_params(_cfg("repeat2"))
    per_block = plain.per_layer[0]
    assert plain.total - repeat.total == 2 * per_block == repeat.shared
    assert repeat.per_layer == plain.per_layer  # each layer still computes with a full block
    ffn = 3 * BASE.d_model * BASE.ffn_dim
    assert plain.total - count_params(_cfg("share_ffn")).total == 3 * ffn


def test_checkpoint_round_trip_of_a_shared_model(tmp_path):
    from slmforge.train.checkpoint import load_checkpoint, save_checkpoint

    cfg = _cfg("repeat2_share_ffn", layers="attn,ssm")
    model = LM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 97, (2, 12))
    model(x[:, :-1], targets=x[:, 1:])[1].backward()
    opt.step()
    path = save_checkpoint(tmp_path, 1, model, opt, extra={})
    for with_optimizer in (False, True):
        back = LM(cfg)
        opt_back = torch.optim.AdamW(back.parameters(), lr=1e-2)
        load_checkpoint(path, back, opt_back if with_optimizer else None)
        assert torch.equal(back(x)[0], model(x)[0])
        assert back.layers()[0] is back.layers()[1]
    assert opt_back.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def _make_divisible(v: float, divisor: int) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def test_openelm_scaling_follows_the_formula():
    cfg = dataclasses.replace(BASE, d_model=128, num_layers=6, ffn_hidden=0,
                              attn=AttnConfig(num_heads=16, num_kv_heads=8),
                              scaling=ScalingConfig(enabled=True, alpha_min=0.5, alpha_max=1.0, beta_min=0.5,
                                                    beta_max=4.0, ffn_multiple=32))
    model = LM(cfg)
    # OpenELM's configuration_openelm.py: np.linspace over the layers, rounded to 2 decimals, then
    # make_divisible(alpha * d_model, head_dim * groups) and make_divisible(beta * d_model, ffn_multiple).
    alphas = [round(float(a), 2) for a in np.linspace(0.5, 1.0, 6)]
    betas = [round(float(b), 2) for b in np.linspace(0.5, 4.0, 6)]
    heads = [_make_divisible(a * 128, 8 * 2) // 8 for a in alphas]  # head_dim 8, 2 query heads per kv head
    widths = [_make_divisible(b * 128, 32) for b in betas]
    assert [b.mixer.num_heads for b in model.blocks] == heads == [8, 10, 12, 12, 14, 16]
    assert [b.mixer.num_kv_heads for b in model.blocks] == [h // 2 for h in heads]
    assert [b.mixer.head_dim for b in model.blocks] == [8] * 6
    assert [b.ffn.hidden for b in model.blocks] == widths == [64, 160, 256, 320, 416, 512]


def test_bad_sharing_configs_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of model.block_repeat=3"):
        LM(dataclasses.replace(BASE, block_repeat=3))
    with pytest.raises(ValueError, match="share_ffn and model.scaling.enabled"):
        LM(_cfg("scaling", share_ffn=True))


def test_hf_export_unrolls_sharing_and_refuses_scaling(tmp_path):
    transformers = pytest.importorskip("transformers")
    from slmforge.serve.hf import export_hf

    model = LM(_cfg("repeat2_share_ffn")).eval()
    export_hf(model, tmp_path / "shared")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "shared").eval()
    x = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        assert (model(x)[0] - hf(x).logits).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="layer-wise scaling"):
        export_hf(LM(_cfg("scaling")), tmp_path / "scaled")


def test_batched_generation_of_a_shared_model_matches_the_reference():
    from slmforge.serve.generate import generate_batch, generate_batch_ref

    model = LM(_cfg("repeat2_share_ffn")).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    assert generate_batch(model, prompts, 6) == generate_batch_ref(model, prompts, 6)


def test_a_tiny_shared_model_learns():
    torch.manual_seed(0)
    assert_tiny_lm_learns(LM(_cfg("repeat2_share_ffn", layers="attn,ssm")))


def test_fsdp_with_activation_checkpointing_trains_a_shared_model_like_one_process(tmp_path, shards_dir):
    """FSDP2 shards each unique block once (a repeated block is gathered again for each use) and the shared
    FFN with the root; two gloo ranks must reproduce one process's losses."""
    from tests.train.test_distributed import _run_two_ranks
    from tests.train.test_loop import _cfg as run_cfg, _losses
    from slmforge.train.loop import train

    def cfg(name, **kw):
        c = run_cfg(tmp_path, shards_dir, name, **kw)
        return dataclasses.replace(c, model=dataclasses.replace(c.model, share_ffn=True, block_repeat=2,
                                                                layers="attn,ssm"))

    single = cfg("single", batch_size=4, grad_accum=2)
    train(single, progress=False)
    ranks = cfg("fsdp", batch_size=2, grad_accum=2, parallel="fsdp", activation_checkpointing=True)
    _run_two_ranks(ranks)
    assert _losses(ranks.run_dir) == pytest.approx(_losses(single.run_dir), rel=1e-4, abs=1e-5)
