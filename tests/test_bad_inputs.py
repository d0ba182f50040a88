"""What a user does wrong to a finished run and its data, and what the machine does to a run's files: each row is
one line on stderr naming the file or key, exit status 2, and nothing changed or left behind.

The rows run through ``cli.main`` in-process on a copy of one tiny finished run (built once for the module). Every
file under the test's folder is hashed before and after: a row may change nothing, not even a ``config.yaml``
(``tests/test_cli_errors.py`` has the rows that need no run). The README's troubleshooting table quotes these
messages; ``test_readme_troubleshooting_is_covered`` keeps the two in step.
"""

import gzip
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from slmforge import pipeline
from slmforge.cli import main
from slmforge.runs import RunDir
from tests.conftest import tiny_run_config
from tests.test_cli_errors import ROWS as NO_RUN_ROWS

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = [{"id": f"d{i}", "text": f"Document number {i} talks about the river and the mill. " * 8} for i in range(30)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    cfg = tiny_run_config(tmp_path_factory.mktemp("bad_inputs"), name="r", max_steps=4, ckpt_every=2, eval_every=2)
    pipeline.run(cfg)
    return Path(cfg.run_dir)


def _ckpt(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _garbage(path: Path) -> None:
    """4 KB of garbage written over the start of ``path``, as a failing disk or a bad copy would."""
    data = bytearray(path.read_bytes())
    data[: 4096] = bytes(range(256)) * 16
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _write_inputs(tmp: Path) -> None:
    (tmp / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp / "body.jsonl").write_text("".join(json.dumps({"id": d["id"], "body": d["text"]}) + "\n" for d in DOCS))
    (tmp / "junk.jsonl").write_text("".join(f"{{not json {i}\n" for i in range(30)))
    (tmp / "empty.txt").write_text("")
    (tmp / "empty.jsonl").write_text("")
    with gzip.open(tmp / "full.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(d) + "\n" for d in DOCS * 20)
    _truncate(tmp / "full.jsonl.gz", 0.6)
    (tmp / "full.jsonl.gz").rename(tmp / "cut.jsonl.gz")


# (id, what is done to the run copy R first (or None), argv, text the error line must contain). {R} is the run
# copy, {tmp} the test's folder (docs.jsonl, body.jsonl, junk.jsonl, empty.txt, empty.jsonl, cut.jsonl.gz).
ROWS = [
    # The run folder and its checkpoints.
    ("run-changed-config", None, ["run", "{R}/config.yaml", "model.d_model=64"], "model.d_model"),
    ("train-existing-run", None, ["train", "--config", "{R}/config.yaml"], "--resume"),
    ("train-batch-size-0", None, ["train", "--config", "{R}/config.yaml", "--resume", "train.batch_size=0"],
     "train.batch_size=0"),
    ("train-dtype-fp16", None, ["train", "--config", "{R}/config.yaml", "--resume", "train.dtype=fp16"],
     "train.dtype='fp16'"),
    ("weights-garbage", lambda r: _garbage(_ckpt(r) / "model.safetensors"), ["generate", "{R}", "prompt=Hi"],
     "model.safetensors"),
    ("weights-truncated", lambda r: _truncate(_ckpt(r) / "model.safetensors"), ["generate", "{R}", "prompt=Hi"],
     "model.safetensors"),
    ("weights-deleted", lambda r: (_ckpt(r) / "model.safetensors").unlink(), ["generate", "{R}", "prompt=Hi"],
     "model.safetensors"),
    ("export-corrupt", lambda r: _garbage(_ckpt(r) / "model.safetensors"), ["export", "{R}", "out={tmp}/hf"],
     "model.safetensors"),
    ("serve-corrupt", lambda r: _garbage(_ckpt(r) / "model.safetensors"), ["serve", "{R}", "port=0"],
     "model.safetensors"),
    ("eval-corrupt", lambda r: _garbage(_ckpt(r) / "model.safetensors"), ["eval", "ppl", "{R}", "{tmp}/docs.jsonl"],
     "model.safetensors"),
    ("no-checkpoint", lambda r: shutil.rmtree(r / "checkpoints"), ["generate", "{R}", "prompt=Hi"],
     "no checkpoint"),
    ("tokenizer-truncated", lambda r: _truncate(r / "tokenizer.json"), ["generate", "{R}", "prompt=Hi"],
     "tokenizer.json"),
    ("config-deleted", lambda r: (r / "config.yaml").unlink(), ["generate", "{R}", "prompt=Hi"], "config.yaml"),
    ("config-broken", lambda r: (r / "config.yaml").write_text("model: [1,\n"), ["generate", "{R}", "prompt=Hi"],
     "config.yaml"),
    # Generation options.
    ("top-p-0", None, ["generate", "{R}", "prompt=Hi", "top_p=0"], "top_p"),
    ("top-k-negative", None, ["generate", "{R}", "prompt=Hi", "top_k=-1"], "top_k"),
    ("temperature-negative", None, ["generate", "{R}", "prompt=Hi", "temperature=-1"], "temperature"),
    ("max-new-tokens-0", None, ["generate", "{R}", "prompt=Hi", "max_new_tokens=0"], "max_new_tokens"),
    ("max-new-tokens-context", None, ["generate", "{R}", "prompt=Hi there", "max_new_tokens=64"], "max_new_tokens"),
    # Data: empty, malformed or misnamed input.
    ("sources-int", None, ["run", "out_dir={tmp}/new", "data.sources=5"], "data.sources"),
    ("dedup-wrong-field", None, ["dedup", "inputs=[{tmp}/body.jsonl]", "out_dir={tmp}/dd"], "text"),
    ("filter-wrong-field", None, ["filter", "inputs=[{tmp}/body.jsonl]", "out_dir={tmp}/ff"], "text"),
    ("dedup-all-malformed", None, ["dedup", "inputs=[{tmp}/junk.jsonl]", "out_dir={tmp}/dd"], "junk.jsonl"),
    ("dedup-empty", None, ["dedup", "inputs=[{tmp}/empty.jsonl]", "out_dir={tmp}/dd"], "empty.jsonl"),
    ("dedup-truncated-gz", None, ["dedup", "inputs=[{tmp}/cut.jsonl.gz]", "out_dir={tmp}/dd"], "cut.jsonl.gz"),
    ("dedup-no-match", None, ["dedup", "inputs=[{tmp}/nothing*.jsonl]", "out_dir={tmp}/dd"], "nothing"),
    ("tokenize-empty", None, ["tokenize", "{tmp}/empty.txt", "tokenizer={R}/tokenizer.json", "out={tmp}/sh"],
     "empty.txt"),
    ("tokenize-wrong-field", None, ["tokenize", "{tmp}/body.jsonl", "tokenizer={R}/tokenizer.json", "out={tmp}/sh"],
     "text"),
    ("retokenize-empty", None, ["tokenize", "{tmp}/empty.txt", "tokenizer={R}/tokenizer.json",
                                "out={R}/shards/train"], "empty.txt"),
    ("tokenize-bad-tokenizer", None, ["tokenize", "{tmp}/docs.jsonl", "tokenizer={tmp}/docs.jsonl", "out={tmp}/sh"],
     "docs.jsonl: not a readable tokenizer file"),
    ("tokenizer-empty", None, ["tokenizer", "{tmp}/empty.txt", "out={tmp}/tok.json", "vocab_size=300"], "empty.txt"),
    ("ppl-empty", None, ["eval", "ppl", "{R}", "{tmp}/empty.txt"], "empty.txt"),
    ("ppl-missing", None, ["eval", "ppl", "{R}", "{tmp}/missing.txt"], "missing.txt: no such file"),
    # The other subcommands.
    ("chat-corrupt", lambda r: _garbage(_ckpt(r) / "model.safetensors"), ["chat", "{R}"], "model.safetensors"),
    ("import-not-hf", None, ["import", "{R}", "out={tmp}/imported"], "config.json"),
    ("forecast-run-config", None, ["forecast", "--config", "{R}/config.yaml"], "unknown key 'preset'"),
    ("gsm8k-no-data", None, ["eval", "gsm8k", "{R}", "data={tmp}/missing.jsonl"], "missing.jsonl"),
]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("mutate,argv,expected", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(finished_run, tmp_path, capsys, mutate, argv, expected):
    run = tmp_path / "R"
    shutil.copytree(finished_run, run)
    _write_inputs(tmp_path)
    if mutate is not None:
        mutate(run)
    before = _tree(tmp_path)
    argv = [a.format(R=run, tmp=tmp_path) for a in argv]
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"slmforge {argv[0]}: error: ") and expected in lines[0], lines[0]
    assert _tree(tmp_path) == before  # nothing changed, nothing half-made left behind


def test_at_least_forty_bad_inputs():
    assert len(ROWS) + len(NO_RUN_ROWS) >= 40 and len({r[0] for r in ROWS + NO_RUN_ROWS}) == len(ROWS + NO_RUN_ROWS)


def test_readme_troubleshooting_is_covered():
    """Each row of the README's troubleshooting table names a row of a table above, and quotes its message."""
    section = README.read_text().split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    ids = re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.M)
    rows = {r[0]: r for r in ROWS + NO_RUN_ROWS}
    assert len(ids) >= 20 and not set(ids) - set(rows), set(ids) - set(rows)


def test_a_bug_is_a_traceback_not_a_user_error(monkeypatch):
    """Only ValueError and OSError are user errors: any other exception (a KeyError from a bug) propagates, so
    that ``python -m slmforge`` prints its traceback and exits 1."""
    import slmforge.info

    def broken(*args, **kwargs):
        return {}["missing"]

    monkeypatch.setattr(slmforge.info, "info", broken)
    with pytest.raises(KeyError):
        main(["info", "tiny"])
