"""HF interop: export -> transformers LlamaForCausalLM gives our logits; import gives theirs; round trips."""

import json

import pytest
import torch

from slmforge.cli import main
from slmforge.config import AttnConfig, ModelConfig
from slmforge.model.lm import LM
from slmforge.serve.hf import export_hf, import_hf, import_hf_run
from tests.conftest import make_run

transformers = pytest.importorskip("transformers")


def _cfg(tied: bool) -> ModelConfig:
    # head_dim 12 with d_model 32: q/k/v widths differ from d_model, which catches a wrong split.
    return ModelConfig(vocab_size=97, d_model=32, num_layers=2, ffn_hidden=48, max_seq_len=64, norm_eps=1e-5,
                       tie_embeddings=tied,
                       attn=AttnConfig(num_heads=4, num_kv_heads=2, head_dim=12, rope_theta=5000.0))


def _randomize_norms(model: LM) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("hf"), "hf")


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_export_matches_transformers_and_imports_back(tmp_path, tied):
    model = LM(_cfg(tied)).eval()
    _randomize_norms(model)
    export_hf(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.tie_word_embeddings == tied
    tokens = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        ours, _ = model(tokens)
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4

    # Import (no tokenizer in the folder here, so through the state dict) and a second export are identical.
    from slmforge.serve.hf import from_hf_state_dict, model_config_from_hf, to_hf_state_dict

    cfg = model_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert cfg == model.cfg
    back = LM(cfg)
    back.load_state_dict(from_hf_state_dict(to_hf_state_dict(model), cfg))
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_import_of_a_transformers_model(tmp_path, run_dir):
    """A model built by transformers itself, with our tokenizer: import gives the same logits."""
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, rope_theta=20000.0,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=64)
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text((run_dir / "tokenizer.json").read_text())
    model, tok, ours_cfg = import_hf(tmp_path)
    assert (ours_cfg.attn.num_kv_heads, ours_cfg.attn.rope_theta, ours_cfg.tie_embeddings) == (1, 20000.0, False)
    tokens = torch.randint(0, 320, (1, 40))
    with torch.no_grad():
        assert (model(tokens)[0] - hf(tokens).logits).abs().max().item() < 1e-4
    assert tok.decode(tok.encode("Question: 12 + 30")) == "Question: 12 + 30"


def test_foreign_tokenizer_is_shifted(tmp_path, run_dir):
    """A tokenizer without our special tokens at 0..6 (as SmolLM2's): ids move up by 7, logits stay put."""
    from slmforge.tokens.tokenizer import SPECIAL_TOKENS

    tok_json = json.loads((run_dir / "tokenizer.json").read_text())
    # Rename our specials so the file looks foreign: "<|eos|>" -> "<|endoftext|>" and so on.
    renamed = {s: f"<|foreign{i}|>" for i, s in enumerate(SPECIAL_TOKENS)}
    renamed["<|eos|>"] = "<|endoftext|>"
    text = json.dumps(tok_json)
    for old, new in renamed.items():
        text = text.replace(json.dumps(old), json.dumps(new))
    (tmp_path / "tokenizer.json").write_text(text)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    model, tok, ours_cfg = import_hf(tmp_path)
    assert ours_cfg.vocab_size == 327 and tok.token_id("<|endoftext|>") == 2 + 7
    assert torch.equal(model.tok_emb.weight[2], hf.model.embed_tokens.weight[2])  # our EOS seeded from theirs
    ids = tok.encode("Question: 7 apples<|endoftext|>")
    assert ids[-1] == 9
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][..., 7:]
        theirs = hf(torch.tensor([ids]) - 7).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_run_round_trip_and_cli(tmp_path, run_dir, capsys):
    from slmforge.serve.generate import generate, generate_ids
    from slmforge.checkpoint import load_for_inference

    assert main(["export", str(run_dir), f"out={tmp_path / 'hf'}"]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 0)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 2
    assert main(["import", str(tmp_path / "hf"), f"out={tmp_path / 'runs' / 'back'}"]) == 0
    a, tok_a, _ = load_for_inference(run_dir)
    b, tok_b, cfg_b = load_for_inference(tmp_path / "runs" / "back")
    assert cfg_b.model == a.cfg and tok_b.vocab_size == tok_a.vocab_size
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert generate(a, tok_a, "Question:", 8, temperature=0) == generate(b, tok_b, "Question:", 8, temperature=0)
    # Greedy decoding in transformers continues the same way as ours.
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = [tok_a.eos_id] + tok_a.encode("Question:")
    ours = generate_ids(a, torch.tensor([prompt]), 8)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert ours.tolist() == theirs.tolist()


def test_unsupported_models_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="window"):
        export_hf(LM(ModelConfig(vocab_size=50, d_model=32, num_layers=1, attn=AttnConfig(window=8))), tmp_path)
    from slmforge.serve.hf import model_config_from_hf

    base = dict(model_type="llama", vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=16)
    with pytest.raises(ValueError, match="rope scaling"):
        model_config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="model_type"):
        model_config_from_hf({**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="no config.json"):
        import_hf_run(tmp_path, tmp_path / "out")
