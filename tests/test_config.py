import pytest

from slmforge.config import PRESETS, RunConfig, dump_yaml, load_config, preset


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


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.d_modle=3", "did you mean d_model"),
        ("train.max_steps=ten", "expected int"),
        ("model.tie_embeddings=maybe", "expected true or false"),
        ("nokeyvalue", "key=value"),
        ("preset=2b", "choose one of"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ValueError, match="unknown.yaml.*'trian'.*did you mean train"):
        load_config(unknown)


def test_every_recipe_loads():
    from pathlib import Path

    from slmforge.synth.jobs import SynthJob, load_job
    from slmforge.science import ForecastConfig, MixConfig
    from slmforge.science import load_config as load_science

    # A recipe's prefix names the subcommand that reads it; the rest are RunConfigs (`run`, `train`, `anneal`).
    loaders = {"synth_": (load_job, SynthJob), "mix_": (lambda p: load_science(MixConfig, p), MixConfig),
               "forecast_": (lambda p: load_science(ForecastConfig, p), ForecastConfig)}
    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert recipes
    for r in recipes:
        load, kind = next((v for k, v in loaders.items() if r.name.startswith(k)), (load_config, RunConfig))
        assert isinstance(load(r), kind), r


def test_presets_are_ordered_by_size():
    from slmforge.plan import count_params

    sizes = [count_params(preset(n)).total for n in PRESETS]
    assert sizes == sorted(sizes)
    assert sizes[-1] <= 1_000_000_000
