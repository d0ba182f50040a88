"""Shared fixtures: tiny configs that make a test take about a second on 2 cores; the ../shared/data gate."""

import os
from pathlib import Path

import pytest
import torch

from slmforge.config import ModelConfig, AttnConfig

# The shared data sets beside the clone (../shared/data); $SLMFORGE_DATA_DIR points the tests elsewhere.
SHARED_DATA = Path(os.environ.get("SLMFORGE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
# CI (.ci/run) sets SLMFORGE_REQUIRE_DATA=1: a test whose shared data is missing then fails instead of skipping.
REQUIRE_DATA_ENV = "SLMFORGE_REQUIRE_DATA"


def data_required() -> bool:
    return os.environ.get(REQUIRE_DATA_ENV, "") not in ("", "0")


def has_data(path: Path) -> bool:
    """Whether ``path`` (under SHARED_DATA) exists; missing while data is required, the calling test fails."""
    if Path(path).exists():
        return True
    if data_required():
        pytest.fail(f"{path} is missing and {REQUIRE_DATA_ENV}=1: copy the shared data sets to {SHARED_DATA} "
                    f"(or point $SLMFORGE_DATA_DIR at them)", pytrace=False)
    return False


def needs_data(*paths: Path):
    """Mark a test (or a module, as ``pytestmark``) that reads these shared-data paths: skipped where one is
    missing, failed instead when $SLMFORGE_REQUIRE_DATA=1 (CI)."""
    return pytest.mark.needs_data(*paths)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_data(*paths): reads these ../shared/data paths (skip or, in CI, fail)")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs_data"):
        missing = [str(p) for p in mark.args if not Path(p).exists()]
        if missing and data_required():
            pytest.fail(f"shared data missing: {', '.join(missing)} ({REQUIRE_DATA_ENV}=1: copy the shared data "
                        f"sets to {SHARED_DATA} or point $SLMFORGE_DATA_DIR at them)", pytrace=False)
        if missing:
            pytest.skip(f"shared data not present: {', '.join(missing)}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _machine_cache(tmp_path_factory):
    """Measurements (model/ops/machine.py: the GEMM ceiling training's CPU MFU uses, ...) go to a per-session
    folder, never the user's ~/.cache; subprocesses inherit it."""
    if "SLMFORGE_CACHE_DIR" not in os.environ:
        os.environ["SLMFORGE_CACHE_DIR"] = str(tmp_path_factory.mktemp("machine_cache"))
    # The fast kernels, forced (tests/model/test_kernel_choice.py tests the measuring): every test runs them, as the
    # demo does where they win, and a test comparing two processes (ranks, a killed run and its resume) never sees
    # two of them choose differently from timings taken at the same moment.
    os.environ.setdefault("SLMFORGE_KERNELS", "train=onednn,decode=gemv,prefill=onednn")


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=97, d_model=32, num_layers=2, max_seq_len=64,
                       attn=AttnConfig(num_heads=4, num_kv_heads=2))


def tiny_run_config(out_dir, name="run", **train):
    """A RunConfig small enough that a whole pipeline run takes a few seconds."""
    from slmforge.config import load_config

    overrides = [
        f"out_dir={out_dir}", f"name={name}", "model.vocab_size=320", "model.d_model=32", "model.num_layers=2",
        "model.attn.num_heads=4", "model.attn.num_kv_heads=2", "model.max_seq_len=64",
        "data.num_train_docs=400", "data.num_val_docs=40", "data.num_test_docs=40", "data.seq_len=32",
        "data.num_workers=1", "train.batch_size=4", "train.max_steps=8", "train.warmup_steps=2",
        "train.eval_every=4", "train.ckpt_every=4", "train.eval_batches=2", "train.lr_peak=1e-2",
        "sample_tokens=8",
    ] + [f"train.{k}={v}" for k, v in train.items()]
    return load_config(None, overrides)


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory):
    """Tokenizer + token shards of a small procedural corpus, built once per test session."""
    from slmforge.pipeline import prepare

    cfg = tiny_run_config(tmp_path_factory.mktemp("corpus"), name="corpus")
    prepare(cfg)
    return cfg.run_dir


def assert_count_params_exact(layers: str, tie: bool) -> None:
    """plan.count_params equals the parameters of the LM built on the meta device."""
    import dataclasses

    from slmforge.config import preset
    from slmforge.model.lm import LM
    from slmforge.plan import count_params

    cfg = dataclasses.replace(preset("tiny"), layers=layers, tie_embeddings=tie)
    with torch.device("meta"):
        model = LM(cfg)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


def assert_tiny_lm_learns(model) -> None:
    """30 AdamW steps on one batch: every parameter gets a gradient and the loss drops below 0.5."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 97, (2, 16))
    losses = []
    for step in range(30):
        _, loss = model(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        if step == 0:  # every parameter gets a gradient, the mixer's scalars included
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 < 4 < losses[0]


def forward_and_decode(model, x: torch.Tensor, prefill: int):
    """(logits of one forward pass over x, the same from a ``prefill``-token prefill then one token at a time,
    the caches) for comparing the cached path with the full one."""
    with torch.no_grad():
        full, _ = model(x)
        cache = model.init_cache(x.shape[0], x.shape[1])
        outs = [model(x[:, :prefill], cache=cache)[0]]
        outs += [model(x[:, i : i + 1], cache=cache)[0] for i in range(prefill, x.shape[1])]
    return full, torch.cat(outs, 1), cache


@pytest.fixture
def saved_figures(monkeypatch) -> list[dict]:
    """What every matplotlib figure saved during the test shows, read from the figure as it is saved: one
    dict per save, {"path", "suptitle", "axes": [{"title", "xlabel", "ylabel", "lines": {label: (x, y)},
    "collections", "texts"}]}. Tests check a plot's data and labels instead of its file size."""
    from matplotlib.figure import Figure

    saved, original = [], Figure.savefig

    def savefig(fig, fname, *args, **kwargs):
        axes = [{"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
                 "lines": {line.get_label(): ([float(v) for v in line.get_xdata()],
                                              [float(v) for v in line.get_ydata()]) for line in ax.get_lines()},
                 "collections": len(ax.collections), "texts": [t.get_text() for t in ax.texts]} for ax in fig.axes]
        suptitle = fig._suptitle.get_text() if fig._suptitle else ""
        saved.append({"path": str(fname), "suptitle": suptitle, "axes": axes})
        return original(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def saved_figure(saved: list[dict], name: str) -> dict:
    """The last figure of ``saved_figures`` saved as ``name`` (directly or through runs.atomic_path's temporary)."""
    hits = [f for f in saved if Path(f["path"]).name == name or Path(f["path"]).name.startswith(f".{name}.")]
    assert hits, f"no figure saved as {name}: {[f['path'] for f in saved]}"
    return hits[-1]


def assert_png_drawn(path, min_coloured: int = 200) -> None:
    """``path`` is a PNG with something drawn on it: not one flat colour, and at least ``min_coloured`` pixels of
    a saturated colour (the plotted curves and markers, not just black axes on white)."""
    import matplotlib.image
    import numpy as np

    rgb = matplotlib.image.imread(str(path))[..., :3]
    assert rgb.shape[0] >= 100 and rgb.shape[1] >= 100, rgb.shape
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20, "a (nearly) blank image"
    coloured = int(((rgb.max(-1) - rgb.min(-1)) > 0.3).sum())
    assert coloured >= min_coloured, f"only {coloured} coloured pixels in {path}"


def make_run(root: Path, name: str = "run") -> Path:
    """config.yaml, data/{train,test}.jsonl, tokenizer.json and a checkpoint of an untrained tiny model."""
    import torch

    from slmforge.curate.documents import write_jsonl
    from slmforge.synth.procedural import build_corpus
    from slmforge.tokens.tokenizer import train_tokenizer
    from slmforge.model.lm import LM
    from slmforge.runs import save_config
    from slmforge.train.checkpoint import save_checkpoint

    cfg = tiny_run_config(root, name=name)
    corpus = build_corpus(cfg.data.families, 200, 0, 20, seed=1)
    for split in ("train", "test"):
        write_jsonl(cfg.run_dir / "data" / f"{split}.jsonl", corpus[split])
    train_tokenizer((d.text for d in corpus["train"]), cfg.model.vocab_size, cfg.run_dir / "tokenizer.json")
    torch.manual_seed(0)
    model = LM(cfg.model)
    save_checkpoint(cfg.run_dir / "checkpoints", 0, model, torch.optim.AdamW(model.parameters()), {})
    save_config(cfg.run_dir, cfg)
    return cfg.run_dir


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory):
    """A tiny untrained run folder (built without training, under a second), shared by the eval and serve tests."""
    return make_run(tmp_path_factory.mktemp("eval"), "eval")


@pytest.fixture(scope="session")
def loaded(eval_run):
    """(model, tokenizer) of ``eval_run``; tests that change the model put it back as it was."""
    from slmforge.checkpoint import load_for_inference

    return load_for_inference(eval_run)[:2]


def memorize(model, ids, steps: int = 150, lr: float = 2e-2):
    """Train ``model`` on the one row ``ids`` until it knows it by heart; returns (optimizer, last loss)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        _, loss = model(ids[:, :-1], targets=ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt, loss
