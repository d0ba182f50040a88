import torch

from slmforge.config import TrainConfig
from slmforge.model.lm import LM
from slmforge.train.optim import build_optimizer, param_groups


def test_no_decay_on_norms_and_embeddings(tiny_model_cfg):
    model = LM(tiny_model_cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] or "tok_emb" in names[id(p)] for p in no_decay["params"])
    assert all(p.dim() == 2 and "tok_emb" not in names[id(p)] for p in decay["params"])
    # The tied embedding/head is one parameter, listed once.
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == model.num_params()


def test_matches_torch_adamw_reference(tiny_model_cfg):
    cfg = TrainConfig(lr_peak=1e-2, weight_decay=0.1)
    a, b = LM(tiny_model_cfg), LM(tiny_model_cfg)
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer(a, cfg)
    groups = param_groups(b, 0.1)
    opt_b = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    x = torch.randint(0, 97, (2, 16))
    for _ in range(3):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x, targets=x)[1].backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
