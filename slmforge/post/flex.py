"""``slmforge flex train BASE source=NAME data=PATH``: one FlexOlmo expert, trained on one data source only.

FlexOlmo (Shi et al. 2025, arXiv 2507.07024, sec. 3): a data owner trains an expert FFN per layer on its own data,
initialised from the public base's FFN and coupled to it in a 2-expert MoE (``model.ffn=flexmoe``, one source):
the base FFN is the frozen anchor expert, attention, embeddings, norms and the anchor's router row stay the base's,
and only the expert's FFN and router row learn. Experts trained this way by owners who never see each other's
data all speak to the same frozen base, so ``post/flex_merge.py`` can stack them into one MoE.

Router embeddings (sec. 3.2, domain-informed routing): FlexOlmo averages an embedder's embeddings of the domain's
documents; here row ``r`` of each layer is the mean ``m`` of that layer's FFN input (the normed hidden state the
router sees) over the domain's tokens under the base model: the anchor's row from the public data (the base run's
held-out documents), the expert's from its source's training data. ``router_row`` turns a mean into the row and a
bias that make the merged router a nearest-centroid classifier of the token's hidden state (``router=mean``: row
``m``, bias ``-|m|^2/2``, so ``argmax x.m - |m|^2/2 = argmin |x - m|``; without the bias plain dot products favour
whichever domain's mean has the larger norm, on every token). ``router=lda`` (default) whitens first with the
inverse of the public data's covariance ``P`` (shrunk toward its mean variance): row ``P m``, bias ``-m.P m/2``,
the nearest mean in Mahalanobis distance, linear discriminant analysis with one shared covariance, which separates
domains where a few high-variance directions of the hidden state would drown the plain distance. Every owner
computes its row alone from its data, the base and the public data, so the rows stay comparable. What the router
compares with the rows is ``model.flexmoe.router_input``: by default the sequence's running mean of FFN inputs,
started with pseudo-tokens of the public mean (``router_prior``), since a document's domain is the document's and
one token's hidden state tells it poorly (``model/flexmoe.py``); the merge keeps the experts' setting.
``train_router`` (the paper's choice, default) fine-tunes the expert's row and bias with its FFN; FlexOlmo's
optional router tuning on proxy data after the merge is not done: no owner's data leaves the owner. ``top_k=1``
trains the expert on the tokens the fixed router sends it (the gate is then 1, so the router gets no gradient) and
merges with ``flex merge top_k=1``: each token runs exactly one FFN, so a source's expert touches only the tokens
routed to it and opting it out cannot move the other domains' tokens (``benchmarks/flexolmo.py``).

The expert run is an ordinary run folder (``init/`` holds the coupled starting weights) plus ``flex.json``, its
held-out documents (``data/validation.jsonl``) and, when given, its fact probes (``questions.jsonl``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from slmforge.checkpoint import (checkpoint_folders, find_checkpoint, find_tokenizer, load_for_inference,
                                 write_checkpoint)
from slmforge.config import ModelConfig, RunConfig, load, load_config
from slmforge.curate.documents import read_documents
from slmforge.log import log
from slmforge.metrics import evaluate_loss
from slmforge.runs import RunDir, atomic_path, write_json
from slmforge.tokens.shards import TokenLoader, load_shards, tokenize_to_shards
from slmforge.train.loop import RunResult, train
from slmforge.train.task import Task, default_loss

FLEX_JSON = "flex.json"
QUESTIONS = "questions.jsonl"
# Like post-training: trained weights to start from, a short warm-up, cosine to 10%.
DEFAULTS = ["train.max_steps=200", "train.lr_peak=1e-3", "train.warmup_steps=10", "train.schedule=cosine",
            "train.lr_min_ratio=0.1", "train.eval_every=50", "train.ckpt_every=50", "train.anneal_stage=", "post=[]",
            "data.shards_dir=", "data.mixture.stages=[]"]


@dataclass
class FlexTrainConfig:
    """``slmforge flex train BASE source=NAME data=PATH [key=value]``; other keys are run keys (train.*, name)."""

    source: str = ""  # the data source's name: its expert's name in the merged model (letters, digits, - and _)
    data: list[str] = field(default_factory=list)  # its training documents (.txt, .jsonl, .parquet; globs)
    val_data: list[str] = field(default_factory=list)  # its held-out documents; empty = val_fraction of data
    val_fraction: float = 0.05
    questions: str = ""  # optional JSONL of {"prompt", "answer", "candidates"}: this source's fact probes
    public: list[str] = field(default_factory=list)  # documents for the anchor's router row; [] = the base's held-out
    router_docs: int = 512  # documents averaged into a router embedding
    top_k: int = 2  # model.flexmoe.top_k of the coupled model (2: anchor and expert both on every token)
    train_router: bool = True  # fine-tune the expert's router row and bias with its FFN (False: keep the centroid)
    router: Literal["lda", "mean"] = "lda"  # router rows: domain means whitened by the public covariance, or raw
    router_shrink: float = 0.1  # lda: the public covariance + router_shrink * (its mean variance) * I, inverted


def flex_configs(base: str | Path, overrides: list[str]) -> tuple[FlexTrainConfig, RunConfig]:
    """The expert's settings and its run config: the base's model with ``model.ffn=flexmoe`` and one source, the
    new run <base>_<source> beside the base (``name=`` to change)."""
    base = Path(base)
    names = {f.name for f in dataclasses.fields(FlexTrainConfig)}
    flex = load(FlexTrainConfig, None, [o for o in overrides if o.split("=", 1)[0] in names])
    user = [o for o in overrides if o.split("=", 1)[0] not in names]
    if not flex.source or not flex.source.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"source={flex.source!r}: name the data source (letters, digits, - and _), e.g. source=law")
    if not flex.data:
        raise ValueError("data= is empty: give the source's training documents, e.g. data=private/law.jsonl")
    base_cfg = base_config(base)
    keys = [f"name={base.name}_{flex.source}", f"out_dir={base.parent}", "model.ffn=flexmoe",
            f"model.flexmoe.sources={flex.source}", f"model.flexmoe.top_k={flex.top_k}", *DEFAULTS]
    cfg = load_config(base / "config.yaml", keys + user)
    cfg.train.init_from = str(RunDir.of(cfg).root / "init")
    if dataclasses.replace(cfg.model, ffn="dense", flexmoe=base_cfg.model.flexmoe) != base_cfg.model:
        raise ValueError(f"model: an expert keeps the model of {base}/config.yaml; drop the model.* keys")
    return flex, cfg


def base_config(base: Path) -> RunConfig:
    """A trained run with a dense FFN in every block: a FlexOlmo base."""
    find_checkpoint(base)
    if not (base / "config.yaml").is_file():
        raise ValueError(f"{base}: no config.yaml, so not a run folder; give a run made by `slmforge run` or `train`")
    cfg = load_config(base / "config.yaml")
    if set(cfg.model.block_ffns()) != {"dense"} or cfg.model.share_ffn:
        raise ValueError(f"{base}: model.ffn={cfg.model.ffn!r}{' with share_ffn' if cfg.model.share_ffn else ''}; "
                         f"a FlexOlmo base has its own dense FFN in every block (model.ffn=dense)")
    return cfg


def flex_train(base: str | Path, flex: FlexTrainConfig, cfg: RunConfig, resume: bool = False,
               force: bool = False, progress: bool = True) -> RunResult:
    """Train ``flex.source``'s expert on its data only, the base frozen as the anchor expert."""
    base = Path(base)
    run = RunDir.of(cfg)
    if checkpoint_folders(run.checkpoints) and not (resume or force):
        raise ValueError(f"{run.root} has trained already; --resume continues it, --force starts it over")
    train_docs, val_docs = _split(flex, cfg.data.seed)
    questions = read_questions(flex.questions) if flex.questions else []
    public = _texts(flex.public) if flex.public else held_out_docs(base)
    model, tokenizer, _ = load_for_inference(base)
    tok_path = find_tokenizer(RunDir.at(base), base_config(base))
    if not (resume and (run.root / "init").is_dir()):
        public_moments = ffn_input_moments(model, tokenizer, public, cfg.data.seq_len, flex.router_docs,
                                           covariance=flex.router == "lda")
        rows = {"anchor": {n: mean for n, (mean, _) in public_moments.items()},
                "expert": router_embeddings(model, tokenizer, train_docs, cfg.data.seq_len, flex.router_docs)}
        precision = {n: shrunk_inverse(cov, flex.router_shrink) for n, (_, cov) in public_moments.items()} \
            if flex.router == "lda" else None
        weights = coupled_weights(model.state_dict(), cfg.model, rows, precision)
        write_checkpoint(run.root / "init" / "checkpoints", 0, weights, {"step": 0, "flex_base": str(base)},
                         tied=cfg.model.tie_embeddings)
    del model
    for split, docs in (("train", train_docs), ("validation", val_docs)):
        tokenize_to_shards(docs, tok_path, run.split_shards(split), num_workers=1, progress=False)
    _write_docs(run.split_data("validation"), val_docs)
    if questions:
        with atomic_path(run.root / QUESTIONS) as path:
            path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    write_json(run.root / FLEX_JSON, {"kind": "expert", "base": str(base), "source": flex.source,
                                      "train_docs": len(train_docs), "val_docs": len(val_docs),
                                      "questions": len(questions)})
    log(f"flex: expert {flex.source}: {len(train_docs):,} documents, {len(val_docs):,} held out, base {base}")
    return train(cfg, resume=resume, force=force, progress=progress,
                 task=expert_task(cfg, run, tok_path, flex.train_router))


def expert_task(cfg: RunConfig, run: RunDir, tok_path: Path, train_router: bool = True) -> Task:
    """The source's token shards; the loss trains only the expert FFNs and their router rows."""
    t = cfg.train
    loader = TokenLoader(run.split_shards("train"), cfg.data.seq_len, t.batch_size, seed=cfg.data.seed,
                         mode=cfg.data.packing)
    val_dir = run.split_shards("validation")
    val_batches = list(itertools.islice(TokenLoader(val_dir, cfg.data.seq_len, t.batch_size, shuffle=False),
                                        t.eval_batches))
    meta = load_shards(val_dir).meta

    def loss(model, batch):
        # Frozen by requires_grad before each forward: the base then gets no gradient, and AdamW leaves a parameter
        # without one untouched (weight decay included), although the loop built the optimizer over all of them.
        for name, p in model.named_parameters():
            p.requires_grad_(is_expert_param(name) and (train_router or ".router_" not in name))
        return default_loss(model, batch)

    return Task(loader, val_batches, loss, lambda model, batches, device: {
        "val_loss": evaluate_loss(model, batches, device)}, tokenizer=tok_path,
        tokens_per_byte=meta["num_tokens"] / max(meta["num_bytes"], 1))


def is_expert_param(name: str) -> bool:
    """An expert's own weights: its FFNs (``blocks.i.ffn.w13``/``w2``), router rows and biases; the rest is the
    base's."""
    return name.rsplit(".", 2)[-2:] in ([["ffn", k] for k in EXPERT_KEYS])


EXPERT_KEYS = ("w13", "w2", "router_experts", "router_experts_bias")  # per-expert tensors of a flexmoe layer


def router_embeddings(model, tokenizer, texts: list[str], seq_len: int, max_docs: int) -> dict[str, torch.Tensor]:
    """Per FFN (``blocks.i.ffn``): the mean of its input over the tokens of ``texts`` (the first ``max_docs``), (C,)."""
    return {n: mean for n, (mean, _) in ffn_input_moments(model, tokenizer, texts, seq_len, max_docs).items()}


@torch.no_grad()
def ffn_input_moments(model, tokenizer, texts: list[str], seq_len: int, max_docs: int, covariance: bool = False,
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per FFN: the mean (C,) of its input over the tokens of ``texts`` (the first ``max_docs``) and, when asked,
    their covariance (C, C) in float64."""
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    counts = {"tokens": 0}

    def hook(name):
        def add(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.sum(0)
            if covariance:
                squares[name] = squares.get(name, 0) + x.t() @ x
        return add

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n.endswith(".ffn")]
    try:
        ids = [i for text in texts[:max_docs] for i in tokenizer.encode(text) + [tokenizer.eos_id]]
        device = next(model.parameters()).device
        for start in range(0, len(ids), seq_len):
            chunk = torch.tensor(ids[start : start + seq_len], device=device)[None]
            model(chunk)
            counts["tokens"] += chunk.shape[1]
    finally:
        for h in handles:
            h.remove()
    if not counts["tokens"]:
        raise ValueError("router embedding: no text to average (the documents are empty)")
    n = counts["tokens"]
    return {name: ((s / n).float(), squares[name] / n - torch.outer(s / n, s / n) if covariance else None)
            for name, s in sums.items()}


def shrunk_inverse(cov: torch.Tensor, shrink: float) -> torch.Tensor:
    """(cov + shrink * mean variance * I)^-1, float64: a covariance estimate kept invertible."""
    c = cov.shape[0]
    return torch.linalg.inv(cov + shrink * cov.trace() / c * torch.eye(c, dtype=cov.dtype, device=cov.device))


def coupled_weights(base: dict[str, torch.Tensor], model: ModelConfig, rows: dict[str, dict[str, torch.Tensor]],
                    precision: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The 2-expert model's weights: each base FFN as the anchor and as the expert's start; router rows from the
    domain means ``rows`` (``router_row``: whitened by ``precision`` when given); the public mean as
    ``router_prior``."""
    out = anchor_weights(base)
    for ffn in ffn_prefixes(base):
        out[f"{ffn}.w13"] = base[f"{ffn}.w13.weight"].t()[None].clone()  # (1, C, 2H)
        out[f"{ffn}.w2"] = base[f"{ffn}.w2.weight"].t()[None].clone()  # (1, H, C)
        for key in ("anchor", "experts"):
            row, bias = router_row(rows[key.rstrip("s")][ffn], precision[ffn] if precision else None)
            out[f"{ffn}.router_{key}"], out[f"{ffn}.router_{key}_bias"] = row[None], bias[None]
        out[f"{ffn}.router_prior"] = rows["anchor"][ffn][None].clone()  # the public mean: context routing's start
    return out


def router_row(mean: torch.Tensor, precision: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A domain's router row and bias from its mean FFN input ``m``: ``(m, -|m|^2/2)``, with which the router picks
    the nearest domain mean; with the public covariance's inverse ``P``, ``(P m, -m.P m/2)``: the nearest mean in
    Mahalanobis distance (linear discriminant analysis with one shared covariance). Every owner whitens with the
    same public ``P``, so independently made rows stay comparable."""
    m = mean.double()
    w = precision.to(m) @ m if precision is not None else m
    return w.to(mean.dtype).clone(), (-0.5 * (w @ m)).to(mean.dtype).reshape(())


def ffn_prefixes(base: dict[str, torch.Tensor]) -> list[str]:
    """``blocks.i.ffn`` for every dense FFN of a base state dict."""
    return [k[: -len(".w13.weight")] for k in base if k.endswith(".ffn.w13.weight")]


def anchor_weights(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A dense base's weights renamed for flexmoe: ``blocks.i.ffn.X`` becomes ``blocks.i.ffn.anchor.X``."""
    prefixes = tuple(f"{p}." for p in ffn_prefixes(base))
    return {(k.replace(".ffn.", ".ffn.anchor.", 1) if k.startswith(prefixes) else k): v for k, v in base.items()}


def read_questions(path: str | Path) -> list[dict]:
    """Fact probes: one JSON object per line with "prompt", "answer" and optionally "candidates"."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError:
            q = None
        if not isinstance(q, dict) or not {"prompt", "answer"} <= q.keys():
            raise ValueError(f"{path}:{n}: expected a JSON object with \"prompt\" and \"answer\"")
        out.append(q)
    return out


def held_out_docs(run: Path) -> list[str]:
    """A run's held-out documents (data/validation.jsonl, else data/test.jsonl): the public domain of a base."""
    for split in ("validation", "test"):
        path = RunDir.at(run).split_data(split)
        if path.is_file():
            return _texts([str(path)])
    raise ValueError(f"{run}: no held-out documents (data/validation.jsonl or data/test.jsonl); give the public "
                     f"documents with public=PATH")


def _texts(patterns: list[str]) -> list[str]:
    return [d.text for d in read_documents(patterns)]


def _split(flex: FlexTrainConfig, seed: int) -> tuple[list[str], list[str]]:
    docs = _texts(flex.data)
    if flex.val_data:
        return docs, _texts(flex.val_data)
    order = list(range(len(docs)))
    random.Random(f"slmforge.flex:{seed}").shuffle(order)
    cut = max(1, round(len(docs) * flex.val_fraction))
    if cut >= len(docs):
        raise ValueError(f"data: {len(docs)} document(s) cannot be split by val_fraction={flex.val_fraction}; "
                         f"give more documents or val_data=")
    return [docs[i] for i in sorted(order[cut:])], [docs[i] for i in sorted(order[:cut])]


def _write_docs(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

