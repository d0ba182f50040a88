"""File and function size limits of docs/STYLE.md ("Keeping files readable"), read from the source with ``ast``.

A module of the package stays within MAX_MODULE_LINES lines unless its docstring has a paragraph that starts
with ``long:`` and gives the reason (``long: one table of 40 templates; splitting it would scatter them``).
A function (or method, nested ones included) stays within MAX_FUNCTION_LINES lines, counted from its ``def``
line to its last line, docstring included; there is no exception for functions.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "slmforge"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# "long:" at the start of a docstring line, then a reason of at least a few words.
LONG_REASON = re.compile(r"^\s*long:\s*\S.{15,}", re.IGNORECASE | re.MULTILINE)


def oversized(root: Path) -> list[str]:
    """One line per module over the line limit without a reason, and per function over its limit."""
    out = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text, filename=str(path))
        name = path.relative_to(root.parent)
        num_lines = len(text.splitlines())
        if num_lines > MAX_MODULE_LINES and not LONG_REASON.search(ast.get_docstring(tree) or ""):
            out.append(f"{name}: {num_lines} lines (limit {MAX_MODULE_LINES}; split it, or give the reason "
                       f"as a 'long:' line in the module docstring)")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{name}:{node.lineno} {node.name}(): {length} lines (limit {MAX_FUNCTION_LINES})")
    return out


def test_modules_and_functions_are_small():
    found = oversized(PACKAGE)
    assert not found, "over the size limits of docs/STYLE.md:\n" + "\n".join(found)


def test_checker_reports_long_modules_and_functions(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()

    def body(indent: str, num_lines: int) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(num_lines))

    # A def line plus 59 lines is exactly at the limit; the method with one line more is over it.
    (pkg / "ok.py").write_text('"""Short."""\n\ndef f():\n' + body("    ", MAX_FUNCTION_LINES - 1))
    (pkg / "big.py").write_text('"""Big."""\n\n\nclass A:\n    def g(self):\n' + body("        ", MAX_FUNCTION_LINES))
    padding = "\n" * MAX_MODULE_LINES
    (pkg / "huge.py").write_text('"""Huge."""\n' + padding)
    (pkg / "vague.py").write_text('"""Vague.\n\nlong: yes\n"""\n' + padding)  # a marker without a reason
    (pkg / "reasoned.py").write_text('"""Reasoned.\n\nlong: one table of templates; a split would scatter it.\n"""\n'
                                     + padding)
    assert oversized(pkg) == [
        f"pkg/big.py:5 g(): {MAX_FUNCTION_LINES + 1} lines (limit {MAX_FUNCTION_LINES})",
        f"pkg/huge.py: {MAX_MODULE_LINES + 1} lines (limit {MAX_MODULE_LINES}; split it, or give the reason as a "
        "'long:' line in the module docstring)",
        f"pkg/vague.py: {MAX_MODULE_LINES + 4} lines (limit {MAX_MODULE_LINES}; split it, or give the reason as a "
        "'long:' line in the module docstring)",
    ]
