"""``slmforge vision data|encoder|train|describe|eval``: a trained LM learns to describe simple images.

  data      generated scenes as PNG files and JSONL manifests (``synth/images.py``)
  encoder   train the small CNN encoder on them, or record a local Hugging Face / timm tower (``post/vision.py``)
  train     LLaVA's stage 1 (projector only) or 2 from a trained text run: a new run folder <RUN>_vision
  describe  caption image files with a vision run
  eval      attribute accuracy of the captions of held-out images, with prior baselines (``eval/vision.py``)
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Literal

from slmforge.cli.common import config_args, load_args, run_flags
from slmforge.config import check_min


@dataclass
class DataArgs:
    """``slmforge vision data out=runs/shapes``."""

    out: str = "runs/shapes"  # folder of <split>/*.png and <split>.jsonl
    train: int = 20000
    validation: int = 500
    test: int = 1000  # half with a held-out colour-shape pair
    seed: int = 0
    size: int = 64  # pixels per side

    def validate(self, prefix: str = "") -> None:
        check_min(self, prefix, 1, "train validation test")
        check_min(self, prefix, 16, "size")


@dataclass
class EncoderArgs:
    """``slmforge vision encoder data=runs/shapes out=runs/shapes_encoder``."""

    kind: Literal["cnn", "hf", "timm"] = "cnn"  # cnn: trained here; hf, timm: a local tower, recorded as is
    data: str = "runs/shapes"  # cnn: the images it learns from
    out: str = "runs/shapes_encoder"
    path: str = ""  # hf: the model folder; timm: the checkpoint file
    model_name: str = ""  # timm: the model name (e.g. vit_tiny_patch16_224)
    dim: int = 128
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    limit: int = 0  # training images used; 0 = all
    attribute_tokens: bool = False  # cnn: one more token per attribute head (its class probabilities)

    def validate(self, prefix: str = "") -> None:
        check_min(self, prefix, 1, "dim steps batch_size")
        check_min(self, prefix, 0, "limit")


@dataclass
class TrainArgs:
    """``slmforge vision train RUN data=runs/shapes encoder=runs/shapes_encoder [train.* keys] [name=...]``."""

    data: str = "runs/shapes"
    encoder: str = "runs/shapes_encoder"
    stage: int = 1  # 1: the projector alone (the LM's weights stay bit-identical); 2: projector and LM
    projector: Literal["linear", "mlp"] = "linear"
    limit: int = 0  # training images used; 0 = all


@dataclass
class DescribeArgs:
    """``slmforge vision describe RUN image.png [more.png] [prompt=...]``."""

    prompt: str = ""  # "" = the run's template's: none after the image (plain), "Describe the image." (chat)
    max_new_tokens: int = 32
    temperature: float = 0.0


@dataclass
class EvalArgs:
    """``slmforge vision eval RUN data=runs/shapes``."""

    data: str = "runs/shapes"
    split: str = "test"
    limit: int = 0  # images scored; 0 = all
    batch_size: int = 64


def cmd_data(args) -> None:
    from slmforge.synth.images import write_split

    cfg = load_args(args)
    for split in ("train", "validation", "test"):
        print(write_split(cfg.out, getattr(cfg, split), cfg.seed, split, cfg.size))


def cmd_encoder(args) -> None:
    cfg = load_args(args)
    if cfg.kind == "cnn":
        from slmforge.post.vision import train_encoder

        train_encoder(cfg.data, cfg.out, cfg.dim, cfg.steps, cfg.batch_size, cfg.lr, cfg.seed, cfg.limit,
                      cfg.attribute_tokens)
        return
    from slmforge.serve.vision import build_encoder, save_encoder

    spec = {"kind": "hf", "path": cfg.path} if cfg.kind == "hf" else {
        "kind": "timm", "name": cfg.model_name, "checkpoint": cfg.path}
    encoder = build_encoder(spec)  # loads now: a bad folder fails before anything is written
    save_encoder(encoder, spec, cfg.out)
    print(f"{cfg.out}: {cfg.kind} encoder, {encoder.num_tokens} tokens of {encoder.feature_dim}")


def cmd_train(args) -> None:
    from slmforge.cli.train import format_result
    from slmforge.config import load
    from slmforge.post.vision import train_projector

    own = {f.name for f in dataclasses.fields(TrainArgs)}
    mine = [o for o in args.overrides if o.split("=", 1)[0] in own]
    cfg = load(TrainArgs, None, mine)
    rest = [o for o in args.overrides if o not in mine]
    print(format_result(train_projector(args.run_dir, cfg.data, cfg.encoder, rest, cfg.stage, cfg.projector,
                                        cfg.limit, resume=args.resume, force=args.force)))


def cmd_describe(args) -> None:
    from slmforge.checkpoint import load_for_inference
    from slmforge.serve.vision import describe, load_encoder, read_image

    cfg = load_args(args, [o for o in args.items if "=" in o])
    files = [o for o in args.items if "=" not in o]
    if not files:
        raise ValueError("no image given: slmforge vision describe RUN image.png")
    images = [read_image(f) for f in files]  # every file checked before the model loads
    model, tokenizer, _ = load_for_inference(args.run_dir)
    if model.projector is None:
        raise ValueError(f"{args.run_dir}: the model has no vision projector; train one with slmforge vision train")
    for name, text in zip(files, describe(model, tokenizer, load_encoder(args.run_dir), images, cfg.prompt or None,
                                          cfg.max_new_tokens, temperature=cfg.temperature)):
        print(f"{name}: {text}" if len(files) > 1 else text)
    sys.stdout.flush()


def cmd_eval(args) -> None:
    from slmforge.eval.vision import evaluate_vision

    cfg = load_args(args)
    evaluate_vision(args.run_dir, cfg.data, cfg.split, cfg.limit, cfg.batch_size)


def register(sub) -> None:
    p = sub.add_parser("vision", help="teach a trained LM to describe simple images (a LLaVA-style projector)",
                       description=__doc__.split("\n\n", 1)[1])
    vsub = p.add_subparsers(dest="vision_command", required=True)
    for name, fn, cls, what in (("data", cmd_data, DataArgs, "write generated scenes as PNG files and manifests"),
                                ("encoder", cmd_encoder, EncoderArgs, "train or record the frozen vision encoder")):
        q = vsub.add_parser(name, help=what)
        config_args(q, cls, recipe=None)
        q.set_defaults(fn=fn)
    q = vsub.add_parser("train", help="train the projector (stage 1) or projector and LM (stage 2) from a run")
    q.add_argument("run_dir", help="the trained text run to start from")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="data=, encoder=, stage=, projector=, "
                   "limit=, and any run key (train.max_steps=..., name=..., model.vision.template=chat)")
    run_flags(q)
    q.set_defaults(fn=cmd_train, config_cls=TrainArgs)
    for name, fn, cls, what in (("describe", cmd_describe, DescribeArgs, "caption image files with a vision run"),
                                ("eval", cmd_eval, EvalArgs, "score captions of held-out images by attribute")):
        q = vsub.add_parser(name, help=what)
        q.add_argument("run_dir", help="a vision run folder (made by slmforge vision train)")
        if name == "describe":
            q.add_argument("items", nargs="*", metavar="IMAGE|key=value", help="image files and keys")
            q.set_defaults(config_cls=cls)
        else:
            config_args(q, cls, recipe=None)
        q.set_defaults(fn=fn)
