"""Images in, text out: a vision run's encoder, image files checked and read, prompts with image slots, captions.

A vision run (``slmforge vision train``) is a run folder whose model has a projector (``model.vision``) and whose
``vision/`` folder holds the frozen encoder: ``encoder.json`` (its kind and options) and, for the ``cnn`` kind,
``encoder.safetensors``. A prompt with an image is the chat template with P image slots at the front of the user's
turn: ``<|user|>`` + P x ``<|pad|>`` (their embeddings replaced by the image's projected features) + the text +
``<|end|><|assistant|>``.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import torch

from slmforge.model.vision import ENCODERS
from slmforge.runs import atomic_path

ENCODER_JSON, ENCODER_WEIGHTS = "encoder.json", "encoder.safetensors"
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096
DESCRIBE_PROMPT = "Describe the image."


def build_encoder(spec: dict) -> torch.nn.Module:
    """An encoder from its ``encoder.json`` record: {"kind": "cnn", "dim": 128, ...} / {"kind": "hf", "path": ...}."""
    from slmforge.registry import lookup

    spec = dict(spec)
    cls = lookup(ENCODERS, spec.pop("kind", ""), "vision encoder (vision.encoder)")
    try:
        return cls(**spec)
    except TypeError as exc:
        raise ValueError(f"vision encoder options {spec}: {exc}") from None


def save_encoder(encoder: torch.nn.Module, spec: dict, folder: str | Path) -> None:
    """``encoder.json`` and, for trained kinds, ``encoder.safetensors`` (with the attribute heads)."""
    import safetensors.torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if spec["kind"] == "cnn":
        weights = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        with atomic_path(folder / ENCODER_WEIGHTS) as tmp:
            safetensors.torch.save_file(weights, str(tmp))
    with atomic_path(folder / ENCODER_JSON) as tmp:
        Path(tmp).write_text(json.dumps(spec, indent=1) + "\n")


def load_encoder(folder: str | Path) -> torch.nn.Module:
    """The frozen encoder saved by ``save_encoder`` (a run's ``vision/`` folder, or an encoder folder)."""
    folder = Path(folder)
    if (folder / "vision" / ENCODER_JSON).is_file():
        folder = folder / "vision"
    if not (folder / ENCODER_JSON).is_file():
        raise ValueError(f"{folder}: no {ENCODER_JSON}: not a vision run (train one with slmforge vision train)")
    spec = json.loads((folder / ENCODER_JSON).read_text())
    encoder = build_encoder(spec)
    if spec["kind"] == "cnn":
        import safetensors.torch

        missing, unexpected = safetensors.torch.load_model(encoder, str(folder / ENCODER_WEIGHTS), strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder / ENCODER_WEIGHTS}: weights do not match {spec}")
    return encoder.eval().requires_grad_(False)


def read_image(source: str | Path | bytes, name: str = ""):
    """A PIL RGB image from a file or bytes; a missing, huge, corrupt or non-image file is one ValueError."""
    from PIL import Image, UnidentifiedImageError

    name = name or str(source if not isinstance(source, bytes) else "image")
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{name}: no such image file")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise ValueError(f"{name}: {path.stat().st_size:,} bytes, over the {MAX_IMAGE_BYTES:,}-byte limit")
        data = path.read_bytes()
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{name}: {len(data):,} bytes, over the {MAX_IMAGE_BYTES:,}-byte limit")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{name}: {img.width} x {img.height} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel limit")
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
        reason = re.sub(r" <[^>]*>", "", " ".join(str(exc).split()))[:120]  # no object reprs in a user's error
        raise ValueError(f"{name}: not a readable image ({reason})") from None
    return img.convert("RGB")


def to_tensor(images: list, size: int) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) floats in [0, 1] (resized when they are another size)."""
    import numpy as np

    arrays = [np.asarray(img.resize((size, size)) if img.size != (size, size) else img, dtype=np.float32)
              for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0)


@torch.no_grad()
def image_features(encoder: torch.nn.Module, images: list, batch_size: int = 256) -> torch.Tensor:
    """PIL images -> the encoder's features (N, P, F), in batches."""
    out = [encoder(to_tensor(images[i:i + batch_size], encoder.image_size)) for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def vision_prompt(tokenizer, num_tokens: int, text: str = DESCRIBE_PROMPT,
                  template: str = "chat") -> tuple[list[int], list[bool]]:
    """Prompt ids with one image and ``text``, ready for the answer, and its slot mask (``model.vision.template``):
    chat: a user turn, ``<|user|>`` + slots + text + ``<|end|><|assistant|>``; plain: slots + text."""
    pad = tokenizer.token_id("<|pad|>")
    if template == "plain":
        ids = [pad] * num_tokens + tokenizer.encode_text(text)
        return ids, [True] * num_tokens + [False] * (len(ids) - num_tokens)
    ids = [tokenizer.token_id("<|user|>"), *[pad] * num_tokens, *tokenizer.encode_text(text),
           tokenizer.token_id("<|end|>"), tokenizer.token_id("<|assistant|>")]
    slots = [False] + [True] * num_tokens + [False] * (len(ids) - 1 - num_tokens)
    return ids, slots


def answer_ids(tokenizer, answer: str, template: str = "chat") -> list[int]:
    """The ids the model learns to answer with: the text and its end (``<|end|>``; plain: a newline)."""
    if template == "plain":
        return tokenizer.encode_text(" " + answer.strip() + "\n")
    return tokenizer.encode_text(answer) + [tokenizer.token_id("<|end|>")]


def default_prompt(template: str) -> str:
    return "" if template == "plain" else DESCRIBE_PROMPT


def describe(model, tokenizer, encoder, images: list, prompt: str | None = None, max_new_tokens: int = 32,
             batch_size: int = 64, temperature: float = 0.0) -> list[str]:
    """One answer per PIL image to ``prompt`` about it (default: the template's; greedy by default), batched,
    KV-cached. An answer ends at ``<|end|>``, or with the plain template at the end of its line."""
    from slmforge.serve.generate import generate_batch

    num_tokens, template = model.cfg.vision.num_tokens, model.cfg.vision.template
    ids, slots = vision_prompt(tokenizer, num_tokens, default_prompt(template) if prompt is None else prompt, template)
    end = tokenizer.token_id("<|end|>")
    stop = (lambda new: "\n" in tokenizer.decode(new[-2:])) if template == "plain" else None
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        feats = image_features(encoder, chunk)
        if feats.shape[1] != num_tokens:
            raise ValueError(f"the encoder gives {feats.shape[1]} tokens per image, the model expects {num_tokens}")
        new = generate_batch(model, [ids] * len(chunk), max_new_tokens, eos_id=end, temperature=temperature,
                             images=feats, image_slots=[slots] * len(chunk), stop=stop)
        out += [tokenizer.decode(row).split("\n")[0].strip() for row in new]
    return out
