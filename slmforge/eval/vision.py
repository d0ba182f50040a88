"""``slmforge vision eval RUN data=DIR``: captions of held-out images scored attribute by attribute.

Each test image is described (greedy, KV-cached, batched) and the caption parsed against the generator's truth
(``synth.images.score_caption``). The report gives, for all images and for those with a held-out colour-shape
pair apart (composition, not recall): the share of images whose caption names every attribute right, the accuracy
of each attribute, and its confusion (true word -> said word; ``?`` for a caption of another form). Two
baselines guess from the prior: ``blank`` is the same model shown an empty canvas (what it says with no image
content), ``majority`` says each attribute's most common training value.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from slmforge.checkpoint import load_for_inference
from slmforge.log import log
from slmforge.runs import write_json
from slmforge.serve.vision import describe, load_encoder, read_image
from slmforge.synth.images import BACKGROUND, parse_caption, score_caption


def read_records(data: str | Path, split: str, limit: int = 0) -> list[dict]:
    path = Path(data) / f"{split}.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such manifest; make the images first: slmforge vision data out={data}")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path}: no image records")
    return records[:limit] if limit else records


def score(records: list[dict], captions: list[str]) -> dict:
    """Accuracy of every attribute, the all-correct share and the confusions, over all and held-out images."""
    out = {}
    for group, keep in (("all", lambda r: True), ("held_out", lambda r: r["held_out"]),
                        ("seen", lambda r: not r["held_out"])):
        rows = [(r, c) for r, c in zip(records, captions) if keep(r)]
        if not rows:
            continue
        right, total, confusion = Counter(), Counter(), {}
        complete = 0
        for rec, cap in rows:
            marks = score_caption(cap, rec["kind"], rec["attrs"])
            complete += all(marks.values())
            parsed = parse_caption(cap)
            said = parsed[1] if parsed and parsed[0] == rec["kind"] else {}
            for name, ok in marks.items():
                key = name.rstrip("2")  # colour2 and shape2 count with colour and shape
                right[key] += ok
                total[key] += 1
                pair = f"{rec['attrs'][name]} -> {said.get(name, '?')}"
                confusion.setdefault(key, Counter())[pair] += 1
        out[group] = {"images": len(rows), "all_correct": complete / len(rows),
                      "attributes": {k: right[k] / total[k] for k in sorted(total)},
                      "confusion": {k: dict(v.most_common()) for k, v in sorted(confusion.items())}}
    return out


def majority_captions(train_records: list[dict], records: list[dict]) -> list[str]:
    """Per scene kind, each attribute's most common training value, as a caption of that kind."""
    from slmforge.synth.images import caption_of

    best = {}
    for kind in {r["kind"] for r in train_records}:
        rows = [r["attrs"] for r in train_records if r["kind"] == kind]
        best[kind] = {k: Counter(a[k] for a in rows).most_common(1)[0][0] for k in rows[0]}
    return [caption_of(r["kind"], best.get(r["kind"], r["attrs"])) if r["kind"] in best else "" for r in records]


def evaluate_vision(run: str | Path, data: str | Path, split: str = "test", limit: int = 0,
                    batch_size: int = 64, out: str | Path = "") -> dict:
    """Describe every image of ``<data>/<split>.jsonl``, score the captions and the baselines, write the report
    (``<run>/vision_eval.json`` and its confusion plot) and return it."""
    from PIL import Image

    model, tokenizer, _ = load_for_inference(run)
    if model.projector is None:
        raise ValueError(f"{run}: the model has no vision projector (model.vision.feature_dim=0); "
                         f"train one with slmforge vision train")
    encoder = load_encoder(run)
    records = read_records(data, split, limit)
    images = [read_image(Path(data) / r["image"]) for r in records]
    captions = describe(model, tokenizer, encoder, images, batch_size=batch_size)
    blank = describe(model, tokenizer, encoder, [Image.new("RGB", images[0].size, BACKGROUND)])[0]
    train_records = read_records(data, "train")
    report = {"run": str(run), "data": str(data), "split": split, "model": score(records, captions),
              "blank_image": {"caption": blank, **score(records, [blank] * len(records))},
              "majority": score(records, majority_captions(train_records, records)),
              "examples": [{"image": r["image"], "truth": r["caption"], "said": c}
                           for r, c in list(zip(records, captions))[:20]]}
    out = Path(out) if out else Path(run) / "vision_eval.json"
    write_json(out, report)
    plot_confusion(report["model"]["all"]["confusion"], out.with_suffix(".png"))
    m = report["model"]
    log(f"vision eval: all attributes right in {m['all']['all_correct']:.1%} of {m['all']['images']} images "
        f"({m.get('held_out', {}).get('all_correct', float('nan')):.1%} with a held-out pair); blank image "
        f"{report['blank_image']['all']['all_correct']:.1%}, majority {report['majority']['all']['all_correct']:.1%};"
        f" {out}")
    return report


def plot_confusion(confusion: dict, path: Path) -> None:
    """One confusion matrix per attribute, true word by row, said word by column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(confusion)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4))
    for ax, name in zip(axes if len(names) > 1 else [axes], names):
        pairs = {tuple(k.split(" -> ")): v for k, v in confusion[name].items()}
        truth = sorted({t for t, _ in pairs})
        said = truth + sorted({s for _, s in pairs} - set(truth))
        grid = [[pairs.get((t, s), 0) for s in said] for t in truth]
        ax.imshow(grid, cmap="Blues")
        ax.set_xticks(range(len(said)), said, rotation=90, fontsize=7)
        ax.set_yticks(range(len(truth)), truth, fontsize=7)
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
