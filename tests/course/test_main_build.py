"""The main build (slmforge/course/): recipes/main_cpu.yaml at CI size runs every stage, resumes, and reports."""

import json
from pathlib import Path

import pytest
import yaml

from slmforge.cli import main as cli_main
from slmforge.config import load
from slmforge.course import MainConfig, STAGES, main_schedule, run_main
from slmforge.course.build import target_config
from slmforge.course.schedule import stage_plans
from slmforge.curate.filters import GSM8K_TEST
from tests.conftest import needs_data

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def ci_recipe(tmp_path: Path) -> Path:
    """recipes/main_cpu.yaml with every size cut to seconds; the same stages and code paths."""
    raw = yaml.safe_load((RECIPES / "main_cpu.yaml").read_text())
    raw["out_dir"] = str(tmp_path / "runs")
    b = raw["base"]
    b["model"].update(vocab_size=400, max_seq_len=64)
    b["data"].update(num_train_docs=500, num_val_docs=30, num_test_docs=30, seq_len=64)
    b["train"].update(batch_size=4, eval_every=5, ckpt_every=5, eval_batches=2, warmup_steps=2)
    raw["synth"].update(topics=["fractions", "photosynthesis"], audiences=["children"], styles=["a textbook"],
                        samples_per_item=8)
    raw["proxy"].update(model={"d_model": 32, "num_layers": 1}, steps=4)
    raw["scaling"].update(steps=6, batch_size=2, scales=[{"d_model": d, "num_layers": 1} for d in (32, 48, 64, 80)])
    raw["target"].update(model={"d_model": 96, "num_layers": 2}, steps=10)
    raw["post"][0].update(num_examples=60, train={"max_steps": 3, "batch_size": 4})
    raw["post"][1].update(num_examples=8, samples_per_problem=2, max_new_tokens=24, eval_pairs=4,
                          train={"max_steps": 2, "batch_size": 2, "lr_peak": 1e-4})
    raw["evals"].update(gsm8k_limit=6, max_new_tokens=16, niah_lengths=[64, 512], niah_depths=[0.5],
                        niah_samples=1)
    path = tmp_path / "main_ci.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@needs_data(GSM8K_TEST)
def test_main_build_runs_every_stage_and_resumes(tmp_path, capsys):
    recipe = ci_recipe(tmp_path)
    cfg = load(MainConfig, recipe)
    results = run_main(cfg)
    root = tmp_path / "runs" / "main_cpu"
    assert [p.stem for p in sorted((root / "stages").glob("*.json"))] == sorted(name for name, _ in STAGES)
    # synthesizer -> a data source with shards; curation counted per training source
    assert results["synth"]["total_written"] > 0
    assert results["data"]["shards"]["synth/train"]["tokens"] > 0
    assert set(results["data"]["curation"]) == {"dedup", "quality", "decontaminate"}
    # three proxies, the best measured one chosen
    points = results["mix"]["points"]
    assert len(points) == 3
    best = min(points, key=lambda p: p["target_loss"])
    assert results["mix"]["chosen"] == pytest.approx(best["mixture"])
    # four scales fitted, the target trained on the same subset and compared
    s = results["scaling"]
    assert len(s["points"]) == 4
    assert s["target"]["actual"] > 0 and "relative_error" in s["target"]["power_law"]
    ladder = yaml.safe_load((root / "scaling" / "d32_l1_s0" / "config.yaml").read_text())["train"]
    assert (ladder["batch_size"], ladder["max_steps"]) == (2, 6)  # scaling.batch_size over base.train's 4
    # the annealed target beside its control, then SFT and ORPO from it, each evaluated on held-out problems
    assert set(results["target"]["ablation"]) >= {"anneal", "constant", "difference_anneal_minus_constant"}
    assert [r["method"] for r in results["post"]["runs"]] == ["sft", "orpo"]
    math = results["evals"]["math"]
    assert list(math) == ["target", "target without anneal mix", "sft", "orpo"]
    assert all(row["problems"] == 6 for row in math.values())
    assert results["evals"]["niah"]["dropped_lengths"] == [512]  # beyond the 64-token context: said, not run
    assert set(results["evals"]["bits_per_byte"]) == {"validation", "test"}
    report = (root / "report.md").read_text()
    for heading in ("## Data", "## Mixture", "## Forecast", "## Target and anneal", "## Evaluations", "## Time"):
        assert heading in report
    assert f"mean over the {cfg.scaling.seeds} seeds" in report and "seed_mean" in s
    # a rerun reuses every stage; the report is rewritten from the saved numbers
    before = json.loads((root / "stages" / "target.json").read_text())
    again = run_main(load(MainConfig, recipe))
    assert again["target"] == before
    assert "finished earlier, reusing" in capsys.readouterr().out


def test_changed_recipe_is_refused_without_force(tmp_path):
    recipe = ci_recipe(tmp_path)
    cfg = load(MainConfig, recipe)
    root = tmp_path / "runs" / "main_cpu"
    root.mkdir(parents=True)
    (root / "config.yaml").write_text("kind: main\nname: other\n")
    with pytest.raises(ValueError, match="different recipe; rerun with --force"):
        run_main(cfg)


def test_target_anneal_stage_spans_the_decay(tmp_path):
    cfg = load(MainConfig, RECIPES / "main_cpu.yaml")
    results = {"data": {"tokenizer": "t.json", "shards_dir": "s"}, "synth": {"paths": ["x.jsonl"]},
               "mix": {"chosen": {"math": 0.5, "text": 0.3, "synth": 0.2}}}
    run = target_config(cfg, results)
    stable, anneal = run.data.mixture.stages
    per_step = run.train.batch_size * run.data.seq_len
    assert stable.tokens + anneal.tokens == cfg.target.steps * per_step
    assert anneal.tokens == round(cfg.target.steps * cfg.target.anneal_fraction) * per_step
    assert run.train.anneal_stage == "anneal" and run.train.decay_fraction == pytest.approx(0.2)
    assert {w.source: w.weight for w in anneal.weights} == cfg.target.anneal_weights


@pytest.mark.parametrize("change, message", [
    ({"proxy": {"mixtures": [[1, 0, 0], [0, 1, 0]]}}, "proxy.mixtures has 2 rows"),
    ({"proxy": {"mixtures": [[1, 0], [0, 1], [1, 1]]}}, r"proxy.mixtures\[0\]"),
    ({"target": {"anneal_weights": {"maths": 1.0}}}, "target.anneal_weights names"),
    ({"synth_source": "books"}, "synth_source='books'"),
])
def test_bad_recipe_is_one_line_naming_the_key(tmp_path, change, message):
    raw = yaml.safe_load((RECIPES / "main_cpu.yaml").read_text())
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message):
        load(MainConfig, path)


def test_plan_and_dry_run_print_the_schedule(capsys):
    for argv in (["plan", "--config", str(RECIPES / "main_cpu.yaml")],
                 ["run", str(RECIPES / "main_cpu.yaml"), "--dry-run"]):
        assert cli_main(argv) == 0
        out = capsys.readouterr().out
        assert "proxy mixtures" in out and "target pre-training" in out and "orpo" in out


def test_plan_prices_the_ladder_at_its_own_batch_size():
    cfg = load(MainConfig, RECIPES / "main_cpu.yaml", ["scaling.batch_size=4", "scaling.steps=100"])
    rows = {r.name: r for r in stage_plans(cfg)}
    assert rows["scaling d48 l2"].tokens == 100 * 4 * cfg.base.data.seq_len
    assert rows["target on the subset (forecast check)"].global_batch_tokens == 4 * cfg.base.data.seq_len
    assert rows["proxy mixtures"].global_batch_tokens == cfg.base.train.batch_size * cfg.base.data.seq_len
    with pytest.raises(ValueError, match="scaling.batch_size=-1"):
        load(MainConfig, RECIPES / "main_cpu.yaml", ["scaling.batch_size=-1"])


def test_gpu_recipe_fits_an_h100_stage_by_stage():
    cfg = load(MainConfig, RECIPES / "main_300m_gpu.yaml")
    plan = main_schedule(cfg)
    for stage in plan["stages"]:
        assert stage["gpus"]["8"]["fits"], stage["name"]
    assert plan["budget"]["within"]
