"""Smoke tests for the data-curation subcommands, through ``cli.main`` as a user would call them."""

import json

from slmforge.cli import main
from slmforge.curate.documents import Document, read_documents, write_jsonl

TEXT = ("The farmer walked to the market with a basket of apples and pears, and he sold them to the baker who "
        "lived near the river with his wife and three children. In the evening the whole family sat by the fire, "
        "telling stories about the long winter, the flooded bridge and the old mill that had burned down before "
        "any of them were born, while snow kept falling over the quiet valley.")


def _corpus(tmp_path):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [Document("a", TEXT), Document("b", TEXT.upper()), Document("c", TEXT.replace("pears", "plums")),
                       Document("d", "Short.")])
    return path


def test_dedup_cli(tmp_path, capsys):
    path, out = _corpus(tmp_path), tmp_path / "dedup"
    assert main(["dedup", f"inputs={path}", f"out_dir={out}", "num_workers=1", "--dry-run"]) == 0
    assert "# LSH: 16 bands x 8 rows" in capsys.readouterr().out
    assert main(["dedup", f"inputs={path}", f"out_dir={out}", "num_workers=1", "threshold=0.7"]) == 0
    assert "2 of 4 documents removed (1 exact, 1 near)" in capsys.readouterr().out
    assert [d.id for d in read_documents(out / "kept")] == ["a", "d"]
    assert json.loads((out / "report.json").read_text())["config"]["threshold"] == 0.7
    assert main(["dedup", f"inputs={path}", f"out_dir={out}", "shingle=sentence"]) == 2
    assert "shingle='sentence': choose one of word, char" in capsys.readouterr().err


def test_filter_cli(tmp_path, capsys):
    path, out = _corpus(tmp_path), tmp_path / "filtered"
    recipe = tmp_path / "filter.yaml"
    recipe.write_text(f"inputs: [{path}]\nout_dir: {out}\ndecontaminate: false\n")
    assert main(["filter", "--config", str(recipe), "min_words=5"]) == 0
    assert "removed 1 documents: {'num_words': 1}" in capsys.readouterr().out
    assert len(list(read_documents(out / "kept"))) == 3
    assert main(["filter", "--config", str(recipe), "min_word=5"]) == 2
    assert "unknown key 'min_word'" in capsys.readouterr().err
