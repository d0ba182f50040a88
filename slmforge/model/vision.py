"""The vision side of the LM: the projector, the splice, and the vision encoders it reads.

LLaVA's design (Liu et al. 2023, arXiv 2304.08485): a frozen vision encoder turns an image into patch features
(P tokens of F numbers); the projector maps each to d_model (stage 1 trains only the projector); the results take
the place of the token embeddings at the image slots of the sequence (``splice``), so the LM reads an image as P
soft tokens. ``LM.forward(images=, image_mask=)`` does the splice; the encoders live here too since they are
plain modules, but only the projector belongs to the LM's weights: the encoder is a run's separate, frozen file.

Encoders, chosen by ``ENCODERS[kind]``, all map images (B, 3, H, W) in [0, 1] to features (B, P, F):
  cnn   ``SmallCNN``: trained here (``slmforge vision encoder``) to classify the generated scenes' attributes;
        a colour-blind form stream beside a colour stream; its tokens are a 4 x 4 grid of patch features and one
        summary token the attribute heads read.
  hf    any Hugging Face vision tower (CLIP, SigLIP) from a local folder; its last hidden states.
  timm  any timm model from a local checkpoint; its unpooled features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.config.model import VisionConfig


class Projector(nn.Module):
    """Patch features (N, P, F) -> (N, P, d_model): a linear map, or LLaVA-1.5's Linear-GELU-Linear."""

    def __init__(self, cfg: VisionConfig, d_model: int):
        super().__init__()
        self.kind = cfg.projector
        self.fc1 = nn.Linear(cfg.feature_dim, d_model)
        self.fc2 = nn.Linear(d_model, d_model) if cfg.projector == "mlp" else None

    def reset_parameters(self, std: float) -> None:
        for fc in (self.fc1, self.fc2):
            if fc is not None:
                nn.init.normal_(fc.weight, std=std)
                nn.init.zeros_(fc.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        y = self.fc1(feats)
        return y if self.fc2 is None else self.fc2(F.gelu(y))


def splice(embeds: torch.Tensor, image_mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """embeds (B, T, C), image_mask (B, T) bool, image_embeds (N, P, C) -> (B, T, C) with the N*P image vectors at
    the True slots, in row-major order (row 0's slots take the first image's P vectors, and so on)."""
    slots = int(image_mask.sum())
    if slots != image_embeds.shape[0] * image_embeds.shape[1]:
        raise ValueError(f"{slots} image slots in the tokens for {image_embeds.shape[0]} images of "
                         f"{image_embeds.shape[1]} tokens each")
    return embeds.masked_scatter(image_mask[..., None], image_embeds.to(embeds.dtype))


def splice_ref(embeds: torch.Tensor, image_mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """``splice`` one slot at a time: the reference."""
    out, flat = embeds.clone(), image_embeds.reshape(-1, image_embeds.shape[-1])
    k = 0
    for b in range(embeds.shape[0]):
        for t in range(embeds.shape[1]):
            if image_mask[b, t]:
                out[b, t] = flat[k]
                k += 1
    return out


# ---------------------------------------------------------------- encoders


class SmallCNN(nn.Module):
    """A small two-stream CNN for plain-background images: 16 patch tokens (a 4 x 4 grid) and one summary token.

    The form stream sees only where the image differs from its background (the median border colour), so its
    features of a shape are the same in every colour; the colour stream sees the pixels. A grid token is both
    streams' features of one patch, side by side, so colour and form are bound by place. One plain CNN instead
    learns colour-shape conjunctions and misses a red triangle it never saw (shape accuracy 0.77 on validation scenes,
    a third with a held-out pair, against 1.00 for this one); held-out pairs measure composition: the encoder must
    compose.
    The summary token is each stream's nonlinear map of its whole grid, side by side, so what the attribute heads
    (``heads``, used only while the encoder trains) read from it, positions, counts and relations included, is
    linear in it; a colour head reads the colour half, the others the form half, so no head can learn a
    colour-shape shortcut either. With ``attribute_tokens`` the heads' class probabilities follow as one token
    each: the encoder's reading of the scene, in a form a small frozen LM can copy from.
    """

    def __init__(self, dim: int = 128, image_size: int = 64, heads: dict[str, int] | None = None,
                 attribute_tokens: bool = False):
        super().__init__()
        if attribute_tokens and max((heads or {}).values(), default=0) > dim:
            raise ValueError(f"attribute tokens need dim >= the largest head ({max(heads.values())} classes)")
        self.attribute_tokens = attribute_tokens
        self.image_size, self.feature_dim = image_size, dim
        self.num_tokens = 17 + (len(heads or {}) if attribute_tokens else 0)
        half = dim // 2
        self.form = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip([1, 16, 32, 64], [16, 32, 64, half]))
        self.colour = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1)
                                    for a, b in zip([3, 16, 32, 64], [16, 32, 64, dim - half]))
        self.half = half
        self.form_summary, self.colour_summary = nn.Linear(16 * half, half), nn.Linear(16 * (dim - half), dim - half)
        # Heads named colour* read the colour half of the summary, the others the form half.
        self.heads = nn.ModuleDict({name: nn.Linear(dim - half if name.startswith("colour") else half, n)
                                    for name, n in (heads or {}).items()})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # (B, 3, 4S)
        background = border.median(dim=-1).values[..., None, None]
        mask = ((x - background).abs().amax(dim=1, keepdim=True) > 0.1).to(x.dtype)
        grids = []
        summaries = []
        for convs, h, fc in ((self.form, mask, self.form_summary), (self.colour, x - 0.5, self.colour_summary)):
            for conv in convs:
                h = F.max_pool2d(F.relu(conv(h)), 2)
            h = F.adaptive_avg_pool2d(h, 4)  # (B, C, 4, 4)
            grids.append(h)
            summaries.append(F.relu(fc(h.flatten(1))))
        grid = torch.cat(grids, dim=1).flatten(2).transpose(1, 2)  # (B, 16, dim)
        tokens = torch.cat([grid, torch.cat(summaries, dim=1)[:, None]], dim=1)
        if not self.attribute_tokens:
            return tokens
        # One more token per head: its class probabilities, zero-padded to dim.
        probs = [F.pad(logits.softmax(-1), (0, self.feature_dim - logits.shape[-1]))
                 for logits in self._heads(tokens[:, -1]).values()]
        return torch.cat([tokens, torch.stack(probs, dim=1)], dim=1)

    def classify(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._heads(self(images)[:, 16])

    def _heads(self, summary: torch.Tensor) -> dict[str, torch.Tensor]:
        form, colour = summary[:, :self.half], summary[:, self.half:]
        return {name: head(colour if name.startswith("colour") else form) for name, head in self.heads.items()}


class HFTower(nn.Module):
    """A Hugging Face vision tower (``CLIPVisionModel``, ``SiglipVisionModel``, ...) from a local folder."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path)
        config = getattr(config, "vision_config", config)  # a full CLIP folder: its vision half
        self.model = AutoModel.from_pretrained(path, config=config)
        self.image_size = int(config.image_size)
        self.feature_dim = int(config.hidden_size)
        patches = (self.image_size // int(config.patch_size)) ** 2
        self.num_tokens = patches + (1 if "clip" in config.model_type else 0)  # CLIP's class token
        # CLIP's and SigLIP's preprocessing means; a folder's preprocessor_config.json would say the same.
        clip = "clip" in config.model_type
        self.register_buffer("mean", torch.tensor([0.4815, 0.4578, 0.4082] if clip else [0.5] * 3).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2686, 0.2613, 0.2758] if clip else [0.5] * 3).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        return self.model(pixel_values=(x - self.mean) / self.std).last_hidden_state


class TimmTower(nn.Module):
    """A timm model (``name``) with weights from a local checkpoint; its unpooled features as tokens."""

    def __init__(self, name: str, checkpoint: str = "", image_size: int = 224):
        super().__init__()
        try:
            import timm
        except ImportError:
            raise ValueError("vision.encoder=timm needs the timm package: pip install timm") from None
        self.model = timm.create_model(name, pretrained=False, checkpoint_path=checkpoint or "", num_classes=0)
        self.image_size = image_size
        self.feature_dim = int(self.model.num_features)
        with torch.no_grad():
            self.num_tokens = self(torch.zeros(1, 3, image_size, image_size)).shape[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        feats = self.model.forward_features(x)
        return feats.flatten(2).transpose(1, 2) if feats.dim() == 4 else feats  # CNN maps (B, F, H, W) -> tokens


ENCODERS: dict[str, type[nn.Module]] = {"cnn": SmallCNN, "hf": HFTower, "timm": TimmTower}
