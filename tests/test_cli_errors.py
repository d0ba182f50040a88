"""Every user mistake is one line on stderr, ``slmforge CMD: error: ...`` naming the key, and exit status 2,
before anything is written. Table-driven, through ``cli.main`` in-process."""

from pathlib import Path

import pytest

from slmforge.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# (id, argv, text the error line must contain); {tmp} is the test's folder, {out} a run folder inside it.
ROWS = [
    ("layer-name", ["run", "out_dir={out}", "model.layers=attn,atn"], "model.layers 'atn'"),
    ("ffn-name", ["run", "out_dir={out}", "model.ffn=mox"], "model.ffn 'mox'"),
    ("dtype", ["train", "out_dir={out}", "train.dtype=fp16"], "train.dtype='fp16': choose one of auto, bf16, fp32"),
    ("device", ["train", "out_dir={out}", "train.device=tpu"], "train.device='tpu'"),
    ("schedule", ["run", "out_dir={out}", "train.schedule=cos"], "train.schedule='cos'"),
    ("decay-shape", ["run", "out_dir={out}", "train.decay_shape=x"], "train.decay_shape='x'"),
    ("compile", ["train", "out_dir={out}", "train.compile=maybe"], "train.compile='maybe'"),
    ("parallel", ["train", "out_dir={out}", "train.parallel=zero"], "train.parallel='zero'"),
    ("data-source", ["run", "out_dir={out}", "data.source=web"], "data.source='web'"),
    ("text-split", ["run", "out_dir={out}", "data.text_split=para"], "data.text_split='para'"),
    ("packing", ["run", "out_dir={out}", "data.packing=x"], "data.packing='x'"),
    ("mixture-choice", ["run", "out_dir={out}", "data.mixture.after_last=halt"], "data.mixture.after_last='halt'"),
    ("batch-size", ["train", "out_dir={out}", "train.batch_size=0"], "train.batch_size=0: expected a value >= 1"),
    ("seq-len", ["run", "out_dir={out}", "data.seq_len=0"], "data.seq_len=0"),
    ("heads", ["run", "out_dir={out}", "model.attn.num_kv_heads=3"], "model.attn.num_kv_heads=3"),
    ("unknown-key", ["train", "out_dir={out}", "train.max_stpes=3"], "'train.max_stpes' (did you mean max_steps?)"),
    ("int-value", ["run", "out_dir={out}", "train.max_steps=ten"], "train.max_steps: expected int"),
    ("no-equals", ["run", "{tmp}/ok.yaml", "train.max_steps"], "'train.max_steps' is not of the form key=value"),
    ("not-yaml", ["run", "{tmp}/broken.yaml"], "broken.yaml: not valid YAML"),
    ("yaml-list", ["train", "--config", "{tmp}/list.yaml"], "list.yaml: expected a mapping"),
    ("no-recipe", ["run", "{tmp}/missing.yaml"], "missing.yaml: no such file"),
    ("dry-run-layer", ["train", "--dry-run", "model.layers=atn"], "model.layers 'atn'"),
    ("anneal-layer", ["anneal", "--config", str(RECIPES / "anneal_cpu.yaml"), "model.layers=sm"], "model.layers 'sm'"),
    ("mix-layer", ["mix", "--config", str(RECIPES / "mix_cpu.yaml"), "base.model.layers=atn"], "model.layers 'atn'"),
    ("teacher", ["synth", "--job", str(RECIPES / "synth_math.yaml"), "teacher.name=gpt"], "teacher.name='gpt'"),
    ("math-check", ["synth", "--job", str(RECIPES / "synth_math.yaml"), "math_check=loose"], "math_check='loose'"),
    ("dedup-choice", ["dedup", "inputs={tmp}/ok.yaml", "shingle=sentence"], "shingle='sentence'"),
    ("dedup-keep", ["dedup", "inputs={tmp}/ok.yaml", "keep=last"], "keep='last': choose one of first, longest"),
    ("filter-choice", ["filter", "inputs={tmp}/ok.yaml", "text_split=para"], "text_split='para'"),
    ("plan-gpu", ["plan", "gpu_hours=10", "gpu=h10"], "gpu='h10'"),
    ("plan-mfu", ["plan", "gpu_hours=10", "mfu=40"], "mfu=40.0"),
    ("info-layer", ["info", "tiny", "model.layers=attn,sssm"], "model.layers 'sssm'"),
    ("info-preset", ["info", "2b"], "2b: not a preset"),
    ("generate-missing-run", ["generate", "{tmp}/no-run", "prompt=Hi"], "no-run"),
    ("generate-no-prompt", ["generate", "{tmp}/no-run"], "prompt is required"),
    ("generate-temperature", ["generate", "{tmp}/no-run", "prompt=Hi", "temperature=hot"], "temperature: expected float"),
    ("serve-port", ["serve", "{tmp}/no-run", "port=99999"], "port=99999"),
    ("export-no-out", ["export", "{tmp}/no-run"], "out is required"),
    ("tokenizer-no-out", ["tokenizer", "{tmp}/ok.yaml"], "out is required"),
    ("tokenize-split", ["tokenize", "{tmp}/ok.yaml", "tokenizer=t.json", "out={out}", "text_split=x"], "text_split='x'"),
    ("eval-key", ["eval", "gsm8k", "{tmp}/no-run", "limt=5"], "'limt' (did you mean limit?)"),
]


@pytest.mark.parametrize("argv,expected", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_user_error_is_one_line_and_exit_2(tmp_path, capsys, argv, expected):
    (tmp_path / "ok.yaml").write_text("train:\n  max_steps: 3\n")
    (tmp_path / "broken.yaml").write_text("train: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- train\n- model\n")
    before = sorted(tmp_path.rglob("*"))
    argv = [a.format(tmp=tmp_path, out=tmp_path / "runs") for a in argv]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"slmforge {argv[0]}: error: ") and expected in lines[0], lines[0]
    assert sorted(tmp_path.rglob("*")) == before  # nothing written: no run folder, no data, no tokenizer
