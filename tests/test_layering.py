"""The import layering of slmforge, read from the source with ``ast``: no import cycles, and the rules of
docs/ARCHITECTURE.md ("What may import what"), which ``RULES`` below states once, as a table.

Every import counts, module-level and function-level alike: a lazy import still ties two parts together.
A module's *part* is its first name under ``slmforge``: ``slmforge.model.ops.cpu`` is in ``model``,
``slmforge.config`` in ``config``, the package ``slmforge/__init__.py`` is ``slmforge``. A part may always
import itself. Implicit imports of parent packages (importing ``a.b.c`` runs ``a/__init__``) are not edges:
Python initialises parents first, so they cannot form a cycle of their own.
"""

from __future__ import annotations

import ast
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "slmforge"


@dataclass(frozen=True)
class AllBut:
    """Every part except these: turns a rule's "imports only X" into "must not import anything else"."""

    parts: frozenset[str] = frozenset()

    def __contains__(self, part: object) -> bool:
        return part not in self.parts


def all_but(*parts: str) -> AllBut:
    return AllBut(frozenset(parts))


@dataclass(frozen=True)
class Rule:
    importers: Container[str]  # the parts the rule binds
    forbidden: Container[str]  # the parts they must not import
    why: str
    allowed: frozenset[str] = frozenset()  # modules they may import all the same (public entry points)


UPPER = frozenset({"train", "serve", "eval", "post", "science", "pipeline", "corpus", "course", "cli"})

# The one table of layering rules; docs/ARCHITECTURE.md prints the same rules.
RULES = (
    Rule({"config"}, all_but("registry"), "config is the ground floor: it imports nothing from slmforge but registry"),
    Rule({"registry", "log", "progress"}, all_but(), "registry, log and progress import nothing from slmforge"),
    Rule({"model"}, all_but("config", "registry"), "model/ imports only config, registry and model/"),
    Rule({"curate", "tokens", "synth"}, UPPER,
         "curate/, tokens/ and synth/ import no train/, serve/, eval/, post/, science/, pipeline, corpus or cli/"),
    Rule({"runs", "checkpoint", "metrics"}, UPPER, "runs, checkpoint and metrics sit below train/, serve/ and eval/"),
    Rule({"plan", "plan_schedule", "info"}, UPPER,
         "plan, plan_schedule and info are arithmetic over the model table, below train/ and serve/"),
    Rule({"serve", "eval"}, {"train", "post", "science", "pipeline"},
         "serve/ and eval/ import no train/ or post/ (inference never imports training)"),
    Rule({"compress"}, all_but("model", "checkpoint", "tokens", "config", "runs", "metrics", "progress", "log",
                               "registry"),
         "compress/ sits beside serve/ and eval/: it loads models through checkpoint and imports no train/, serve/, "
         "eval/ or anything above them"),
    Rule({"post"}, {"science", "pipeline"}, "post/ sits above train/, serve/ and eval/ and below pipeline and science"),
    Rule({"science"}, {"train"}, "science/ uses train/ only through slmforge.train.loop (its entry point train)",
         allowed=frozenset({"slmforge.train.loop"})),
    Rule({"train", "serve", "eval", "post", "science", "pipeline"}, {"course"},
         "course/ (the main build) sits above science/: only cli/ and the Python API import it"),
    Rule({"course"}, {"train"}, "course/ trains only through science/, pipeline and post/"),
    Rule(all_but("__main__"), {"cli"}, "only slmforge/__main__.py imports cli/"),
)


@dataclass(frozen=True)
class Edge:
    src: str  # importing module, e.g. slmforge.serve.hf
    dst: str  # imported module of the same package, e.g. slmforge.train.checkpoint
    where: str  # file:line of the import statement


@dataclass
class Graph:
    package: str
    modules: dict[str, Path] = field(default_factory=dict)  # dotted name -> file
    edges: list[Edge] = field(default_factory=list)
    unknown: list[Edge] = field(default_factory=list)  # imports of package modules that do not exist


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file for every module under the package folder ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: Container[str]) -> list[str]:
    """The modules an import statement loads; ``from a import b`` is ``a.b`` when that is a module, else ``a``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    stem = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        base = module.split(".")
        base = base[: len(base) - node.level + is_package]
        stem = ".".join(base + ([stem] if stem else []))
    return [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]


def build_graph(root: Path) -> Graph:
    """Parse every module under ``root`` (a package folder) and collect its imports of the same package."""
    graph = Graph(root.name, module_names(root))
    for module, path in graph.modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            where = f"{path.relative_to(root.parent)}:{node.lineno}"
            for name in dict.fromkeys(_targets(node, module, path.name == "__init__.py", graph.modules)):
                if name == graph.package or name.startswith(graph.package + "."):
                    edges = graph.edges if name in graph.modules else graph.unknown
                    edges.append(Edge(module, name, where))
    return graph


def part_of(module: str) -> str:
    names = module.split(".")
    return names[1] if len(names) > 1 else names[0]


def part_graph(graph: Graph) -> list[str]:
    """``part -> the parts it imports``, one line per part: the summary docs/ARCHITECTURE.md shows."""
    deps: dict[str, set[str]] = {part_of(m): set() for m in graph.modules}
    for e in graph.edges:
        if part_of(e.src) != part_of(e.dst):
            deps[part_of(e.src)].add(part_of(e.dst))
    return [f"{p:<10} -> {', '.join(sorted(deps[p])) or '-'}" for p in sorted(deps)]


def violations(graph: Graph, rules=RULES) -> list[str]:
    """One line per import that breaks a rule: ``src -> dst (rule: why)  at file:line``."""
    out = []
    for e in graph.edges:
        src, dst = part_of(e.src), part_of(e.dst)
        if src == dst:
            continue
        for rule in rules:
            if src in rule.importers and dst in rule.forbidden and e.dst not in rule.allowed:
                out.append(f"{e.src} -> {e.dst} (rule: {rule.why})  at {e.where}")
    out += [f"{e.src} -> {e.dst} (no such module)  at {e.where}" for e in graph.unknown]
    return sorted(set(out))


def cycles(graph: Graph) -> list[list[str]]:
    """One concrete cycle (a list of modules, first repeated last) per strongly connected component (Tarjan)."""
    succ: dict[str, set[str]] = {m: set() for m in graph.modules}
    for e in graph.edges:
        succ[e.src].add(e.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the number of modules (about 70)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in succ[v]:
                components.append(sorted(component))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return [_cycle_in(set(c), succ) for c in components]


def _cycle_in(component: set[str], succ: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module, by breadth-first search inside the component."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(succ[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle found in the component {sorted(component)}")


def test_no_import_cycles():
    found = cycles(build_graph(PACKAGE))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_layering_rules():
    found = violations(build_graph(PACKAGE))
    assert not found, "layering violations (docs/ARCHITECTURE.md):\n" + "\n".join(found)


def test_every_part_is_known():
    """A new top-level part must be placed in the layering on purpose: named in ARCHITECTURE.md's table."""
    parts = {part_of(m) for m in module_names(PACKAGE)}
    documented = (Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    missing = sorted(p for p in parts if f"`{p}" not in documented)
    assert not missing, f"parts missing from docs/ARCHITECTURE.md: {missing}"


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "slmforge" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "slmforge"


def test_checker_reports_a_layering_violation_and_a_cycle(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "__main__.py": "from slmforge.cli import main\n",
        "config.py": "from slmforge.registry import lookup\n",
        "registry.py": "",
        "model/__init__.py": "",
        "model/lm.py": "from slmforge.config import X\nfrom . import block\n",
        "model/block.py": "def f():\n    from slmforge.train.loop import train\n",  # function-level counts
        "train/__init__.py": "",
        "train/loop.py": "import slmforge.train.optim\n",
        "train/optim.py": "from slmforge.train import loop\n",  # cycle: loop -> optim -> loop
        "science/__init__.py": "",
        "science/sweep.py": "from slmforge.train.loop import train\nfrom slmforge.train.optim import x\n",
        "cli/__init__.py": "from .common import parse\n",
        "cli/common.py": "",
        "eval/__init__.py": "",
        "eval/gsm8k.py": "from slmforge.nowhere import y\n",
    })
    graph = build_graph(pkg)
    assert violations(graph) == [
        "slmforge.eval.gsm8k -> slmforge.nowhere (no such module)  at slmforge/eval/gsm8k.py:1",
        "slmforge.model.block -> slmforge.train.loop (rule: model/ imports only config, registry and model/)"
        "  at slmforge/model/block.py:2",
        "slmforge.science.sweep -> slmforge.train.optim (rule: science/ uses train/ only through "
        "slmforge.train.loop (its entry point train))  at slmforge/science/sweep.py:2",
    ]
    assert cycles(graph) == [["slmforge.train.loop", "slmforge.train.optim", "slmforge.train.loop"]]


def test_checker_finds_a_longer_cycle_and_rejects_other_importers_of_cli(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "config.py": "from slmforge.tokens.mixture import M\n",
        "registry.py": "",
        "tokens/__init__.py": "",
        "tokens/mixture.py": "def f():\n    from slmforge.pipeline import run\n",
        "pipeline.py": "from slmforge.config import RunConfig\nfrom slmforge.cli import main\n",
        "cli/__init__.py": "",
    })
    graph = build_graph(pkg)
    assert cycles(graph) == [["slmforge.config", "slmforge.tokens.mixture", "slmforge.pipeline", "slmforge.config"]]
    assert violations(graph) == [
        "slmforge.config -> slmforge.tokens.mixture (rule: config is the ground floor: it imports nothing from "
        "slmforge but registry)  at slmforge/config.py:1",
        "slmforge.pipeline -> slmforge.cli (rule: only slmforge/__main__.py imports cli/)  at slmforge/pipeline.py:2",
        "slmforge.tokens.mixture -> slmforge.pipeline (rule: curate/, tokens/ and synth/ import no train/, serve/, "
        "eval/, post/, science/, pipeline, corpus or cli/)  at slmforge/tokens/mixture.py:2",
    ]


if __name__ == "__main__":  # `python tests/test_layering.py` prints the part graph for docs/ARCHITECTURE.md
    print("\n".join(part_graph(build_graph(PACKAGE))))
