import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from slmforge.config import PRESETS, RunConfig, describe, dump_yaml, load, load_config, preset

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_defaults_preset_yaml_overrides_precedence(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: 10m\nmodel:\n  num_layers: 3\ntrain:\n  max_steps: 7\n")
    cfg = load_config(recipe, ["train.max_steps=9", "model.attn.num_heads=8", "data.families=arithmetic,facts"])
    assert cfg.model.d_model == 256  # from the preset
    assert cfg.model.num_layers == 3  # recipe beats preset
    assert cfg.train.max_steps == 9  # override beats recipe
    assert cfg.model.attn.num_heads == 8
    assert cfg.data.families == ["arithmetic", "facts"]
    assert isinstance(cfg.train.lr_peak, float)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["preset=tiny", "train.lr_peak=1e-3", "model.tie_embeddings=false"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


@dataclass
class _Demo:
    text: str = ""
    words: list[str] = field(default_factory=list)
    ratio: float = 0.0
    seed: int | None = 3
    mode: Literal["auto", "true", "false"] = "auto"
    extra: dict = field(default_factory=dict)


def test_values_are_read_by_their_field_type():
    cfg = load(_Demo, None, ["text=Question: Tom has 3", "words=Question:", "ratio=1e-3", "seed=null",
                             "mode=true", "extra={a: [1, 2]}"])
    # Text fields keep what was typed (YAML would read 'Question: Tom' as a mapping); the rest is YAML.
    assert cfg == _Demo("Question: Tom has 3", ["Question:"], 1e-3, None, "true", {"a": [1, 2]})
    assert type(cfg.text) is str and type(cfg.words[0]) is str  # nothing of the parser leaks into the config
    assert load(_Demo, None, ["words=[a, 'b,c']", "text=true", "seed=7"]) == _Demo("true", ["a", "b,c"], seed=7)
    assert load(_Demo, None, ["words=a,b", "words="]).words == []  # the last item wins


def test_a_yaml_boolean_is_a_choice_too(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  compile: true\n")
    assert load_config(recipe).train.compile == "true"


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.d_modle=3", "unknown key 'model.d_modle' (did you mean d_model"),
        ("train.max_steps=ten", "override: train.max_steps: expected int, got 'ten'"),
        ("model.tie_embeddings=maybe", "model.tie_embeddings: expected true or false"),
        ("nokeyvalue", "key=value"),
        ("preset=2b", "choose one of"),
        ("train.dtype=fp16", "override: train.dtype='fp16': choose one of auto, bf16, fp32 (did you mean bf16?)"),
        ("train.schedule=cos", "train.schedule='cos': choose one of wsd, cosine (did you mean cosine?)"),
        ("train.decay_shape=x", "train.decay_shape='x': choose one of linear, sqrt, cosine"),
        ("train.compile=maybe", "train.compile='maybe': choose one of auto, true, false"),
        ("train.parallel=zero", "train.parallel='zero': choose one of ddp, fsdp, none"),
        ("train.device=tpu", "train.device='tpu': choose one of auto, cpu, cuda, cuda:<index>"),
        ("data.source=web", "data.source='web': choose one of procedural, files"),
        ("data.text_split=para", "data.text_split='para': choose one of file, blank_line, line"),
        ("data.packing=x", "data.packing='x': choose one of window, documents"),
        ("data.mixture.on_exhausted=skip", "data.mixture.on_exhausted='skip': choose one of repeat, stop"),
        ("train.batch_size=0", "train.batch_size=0: expected a value >= 1"),
        ("train.grad_accum=0", "train.grad_accum=0: expected a value >= 1"),
        ("train.max_steps=-1", "train.max_steps=-1: expected a value >= 0"),
        ("train.decay_fraction=1.5", "train.decay_fraction=1.5: expected a fraction in [0, 1]"),
        ("data.seq_len=0", "data.seq_len=0: expected a value >= 1"),
        ("data.val_fraction=1", "data.val_fraction=1.0: expected a fraction in [0, 1)"),
        ("model.d_model=0", "model.d_model=0: expected a value >= 1"),
        ("model.num_layers=0", "model.num_layers=0: expected a value >= 1"),
        ("model.attn.num_kv_heads=3", "model.attn.num_heads=4: expected a multiple of model.attn.num_kv_heads=3"),
        ("model.block_repeat=3", "model.num_layers=4: expected a multiple of model.block_repeat=3"),
        ("data.sources={math: {familys: [arithmetic]}}", "data.sources.math: unknown key 'familys'"),
        ("train=3", "override: train: expected a mapping"),
    ],
)
def test_bad_overrides_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cuda_devices_by_index_are_valid():
    assert load_config(None, ["train.device=cuda:1"]).train.device == "cuda:1"


def test_bad_yaml_names_the_file_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml: not valid YAML: .* at line 2, column 1$"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ValueError, match="unknown.yaml.*'trian'.*did you mean train"):
        load_config(unknown)
    listed = tmp_path / "list.yaml"
    listed.write_text("- train\n- model\n")
    with pytest.raises(ValueError, match="list.yaml: expected a mapping .* got list"):
        load_config(listed)


def test_any_config_dataclass_loads_and_checks_its_choices(tmp_path):
    from slmforge.curate.dedup import DedupConfig
    from slmforge.plan import PlanConfig

    recipe = tmp_path / "dedup.yaml"
    recipe.write_text("threshold: 0.7\nshingle: char\n")
    cfg = load(DedupConfig, recipe, ["keep=longest"])
    assert (cfg.threshold, cfg.shingle, cfg.keep) == (0.7, "char", "longest")
    with pytest.raises(ValueError, match=r"override: keep='last': choose one of first, longest"):
        load(DedupConfig, recipe, ["keep=last"])
    assert load(PlanConfig, None, ["gpu=a100", "gpu_hours=10"]).gpu == "a100"
    with pytest.raises(ValueError, match=r"gpu='h10': choose one of .*\(did you mean h100\?\)"):
        load(PlanConfig, None, ["gpu=h10"])


def test_every_recipe_loads():
    from slmforge.course import MainConfig
    from slmforge.post.niah import NiahRecipe
    from slmforge.science import ForecastConfig, MixConfig
    from slmforge.synth.jobs import SynthJob, load_job

    # A recipe's prefix names the subcommand that reads it; the rest are RunConfigs (`run`, `train`, `anneal`).
    loaders = {"synth_": (load_job, SynthJob), "mix_": (lambda p: load(MixConfig, p), MixConfig),
               "forecast_": (lambda p: load(ForecastConfig, p), ForecastConfig),
               "niah_": (lambda p: load(NiahRecipe, p), NiahRecipe),
               "main_": (lambda p: load(MainConfig, p), MainConfig)}
    recipes = sorted(RECIPES.glob("*.yaml"))
    assert recipes
    for r in recipes:
        loader, kind = next((v for k, v in loaders.items() if r.name.startswith(k)), (load_config, RunConfig))
        assert isinstance(loader(r), kind), r


def test_science_base_takes_its_preset_before_the_recipe(tmp_path):
    from slmforge.science import MixConfig

    recipe = tmp_path / "mix.yaml"
    recipe.write_text("base:\n  preset: 10m\n  model: {num_layers: 3}\n")
    cfg = load(MixConfig, recipe, ["base.train.max_steps=5"])
    assert (cfg.base.model.d_model, cfg.base.model.num_layers, cfg.base.train.max_steps) == (256, 3, 5)


def test_mixture_dataclasses_live_in_config_which_imports_no_tokens():
    from slmforge import config
    from slmforge.tokens import mixture

    assert mixture.MixtureConfig is config.MixtureConfig and mixture.Stage is config.Stage
    code = "import sys, slmforge.config; print(sorted(m for m in sys.modules if m.startswith('slmforge.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "tokens" not in loaded and "model." not in loaded and "slmforge.registry" in loaded


def test_describe_lists_every_key_with_default_and_choices():
    lines = [" ".join(line.split()) for line in describe(RunConfig).splitlines()]  # columns padded
    assert "train.dtype=auto (auto | bf16 | fp32) auto: bf16 on GPU, fp32 on CPU (bf16 there warns if emulated)" in lines
    assert "model.attn.num_heads=4" in lines and any(line.startswith("data.paths=[] ") for line in lines)
    assert len(lines) > 60


def test_presets_are_ordered_by_size():
    from slmforge.plan import count_params

    sizes = [count_params(preset(n)).total for n in PRESETS]
    assert sizes == sorted(sizes)
    assert sizes[-1] <= 1_000_000_000
