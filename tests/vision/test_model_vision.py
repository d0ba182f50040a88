"""The projector and the splice: reference equality, text-only equivalence, encoders' shapes, the HF tower."""

import dataclasses

import pytest
import torch

from slmforge.config import ModelConfig
from slmforge.config.model import VisionConfig
from slmforge.model.lm import LM
from slmforge.model.vision import SmallCNN, splice, splice_ref


def _vision_cfg(projector="linear"):
    return ModelConfig(vocab_size=97, d_model=32, num_layers=2, max_seq_len=64,
                       vision=VisionConfig(feature_dim=12, num_tokens=3, projector=projector))


def test_splice_matches_the_reference_and_checks_the_slot_count():
    torch.manual_seed(0)
    embeds, image = torch.randn(3, 9, 8), torch.randn(3, 2, 8)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 1:3] = mask[1, 4:6] = mask[2, 0:2] = True
    out = splice(embeds, mask, image)
    assert torch.equal(out, splice_ref(embeds, mask, image))
    assert torch.equal(out[1, 4:6], image[1]) and torch.equal(out[0, 0], embeds[0, 0])
    with pytest.raises(ValueError, match="image slots"):
        splice(embeds, mask, image[:2])


@pytest.mark.parametrize("projector", ["linear", "mlp"])
def test_no_image_gives_the_text_only_models_logits(projector):
    torch.manual_seed(0)
    text = LM(dataclasses.replace(_vision_cfg(), vision=VisionConfig()))
    vision = LM(_vision_cfg(projector))
    missing, unexpected = vision.load_state_dict(text.state_dict(), strict=False)
    assert not unexpected and all(m.startswith("projector.") for m in missing)
    tokens = torch.randint(0, 97, (2, 10))
    assert torch.equal(text(tokens)[0], vision(tokens)[0])


def test_images_change_only_the_positions_at_and_after_the_slots():
    torch.manual_seed(0)
    model = LM(_vision_cfg())
    tokens = torch.randint(0, 97, (1, 10))
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 4:7] = True
    a = model(tokens, images=torch.randn(1, 3, 12), image_mask=mask)[0]
    b = model(tokens, images=torch.randn(1, 3, 12), image_mask=mask)[0]
    assert torch.equal(a[0, :4], b[0, :4])  # causal: before the image, nothing changes
    assert not torch.allclose(a[0, 4:], b[0, 4:])


def test_a_text_only_model_refuses_images():
    model = LM(ModelConfig(vocab_size=97, d_model=32, num_layers=1, max_seq_len=64))
    with pytest.raises(ValueError, match="no vision projector"):
        model(torch.zeros(1, 4, dtype=torch.long), images=torch.zeros(1, 1, 4),
              image_mask=torch.ones(1, 4, dtype=torch.bool))


def test_cached_generation_with_an_image_equals_full_recompute():
    from slmforge.serve.generate import PaddedDecoder

    torch.manual_seed(0)
    model = LM(_vision_cfg()).eval()
    prompts = [[5, 0, 0, 0, 7, 8], [9, 0, 0, 0, 3]]
    slots = [[False, True, True, True, False, False], [False, True, True, True, False]]
    feats = torch.randn(2, 3, 12)
    dec = PaddedDecoder(model, prompts, 4, images=feats, image_slots=slots)
    logits = dec.prefill()
    with torch.no_grad():
        for row, (p, s) in enumerate(zip(prompts, slots)):
            ref = model(torch.tensor([p]), images=feats[row:row + 1], image_mask=torch.tensor([s]))[0][0, -1]
            assert torch.allclose(logits[row], ref, atol=1e-5)
        nxt = logits.argmax(-1)
        step = dec.step(nxt)
        for row, (p, s) in enumerate(zip(prompts, slots)):
            full = model(torch.tensor([p + [int(nxt[row])]]), images=feats[row:row + 1],
                         image_mask=torch.tensor([s + [False]]))[0][0, -1]
            assert torch.allclose(step[row], full, atol=1e-5)


def test_small_cnn_gives_grid_and_summary_tokens_at_any_input_size():
    enc = SmallCNN(dim=16, image_size=64, heads={"colour": 6})
    for size in (64, 48, 96):
        assert enc(torch.rand(2, 3, size, size)).shape == (2, 17, 16)
    assert enc.classify(torch.rand(2, 3, 64, 64))["colour"].shape == (2, 6)


def test_hf_vision_tower_loads_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from slmforge.model.vision import HFTower

    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    transformers.CLIPVisionModel(config).save_pretrained(tmp_path)
    tower = HFTower(str(tmp_path)).eval()
    assert (tower.num_tokens, tower.feature_dim) == (17, 32)  # 4 x 4 patches and the class token
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats = tower(images)
        ref = transformers.CLIPVisionModel.from_pretrained(tmp_path).eval()
        x = torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False)
        expect = ref(pixel_values=(x - tower.mean) / tower.std).last_hidden_state
    assert feats.shape == (2, 17, 32) and torch.allclose(feats, expect, atol=1e-5)


def test_attribute_tokens_are_the_heads_probabilities():
    torch.manual_seed(0)
    enc = SmallCNN(dim=16, image_size=32, heads={"colour": 6, "shape": 4}, attribute_tokens=True)
    images = torch.rand(3, 3, 32, 32)
    feats = enc(images)
    assert enc.num_tokens == 19 and feats.shape == (3, 19, 16)
    probs = enc.classify(images)["shape"].softmax(-1)
    assert torch.allclose(feats[:, 18, :4], probs) and torch.equal(feats[:, 18, 4:], torch.zeros(3, 12))
    assert torch.allclose(feats[:, 17].sum(-1), torch.ones(3))

