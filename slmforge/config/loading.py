"""Loading any config dataclass: defaults < YAML file < ``key=value`` overrides, in one function, ``load``.

Values are converted by the field's annotation: ``int``, ``float``, ``bool``, ``str``, ``list[...]`` (YAML lists or
``a,b``), ``X | None``, nested config dataclasses (dotted keys), lists of them (YAML mappings), and
``Literal[...]`` choices, checked here with a did-you-mean hint. Unknown keys name the nearest valid ones. Every
error is one line that starts with where the value came from (the file, or "override") and names the dotted key.
After merging, ``validate`` runs each config's own ``validate(prefix)`` (numbers that would fail later).
``dump_yaml``, which every printed and saved config goes through, masks fields named like secrets (``masked``).
Generic over dataclasses: this module imports nothing from slmforge.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import io
import json
import re
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class Override(str):
    """A ``key=value`` value as typed, read by its field's type: text fields keep it verbatim (``prompt=Q: 3``
    is not YAML), every other field reads it as YAML (``train.lr_peak=3e-3``, ``data.paths=[a.txt, b.txt]``)."""

    def parsed(self, where: str, key: str) -> Any:
        try:
            return yaml.safe_load(self) if self.strip() else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"{where}: {key}={str(self)!r}: not a YAML value ({_yaml_problem(exc)})") from None


def load(cls, path: str | Path | None = None, overrides: list[str] | None = None, where: str | None = None):
    """A ``cls`` config: defaults < YAML file ``path`` (a top-level mapping) < ``key=value`` ``overrides``.

    A node with an ``apply_preset`` method (RunConfig, and so a science config's ``base``) gets its ``preset`` key
    applied first, so that the file's own model keys beat the preset's. Then every node's ``validate`` runs.
    ``where`` names the overrides in error messages (default "override").
    """
    raw = read_yaml(path)
    over = parse_overrides(overrides or [])
    cfg = _apply_presets(cls(), raw, over)
    cfg = merge(cfg, raw, where=str(path) if path else cls.__name__)
    cfg = merge(cfg, over, where=where or "override")
    validate(cfg)
    return cfg


def _apply_presets(cfg, raw: dict, over: dict):
    changes = {}
    for f in dataclasses.fields(cfg):
        child = getattr(cfg, f.name)
        if dataclasses.is_dataclass(child):
            sub_raw, sub_over = raw.get(f.name), over.get(f.name)
            changes[f.name] = _apply_presets(child, sub_raw if isinstance(sub_raw, dict) else {},
                                             sub_over if isinstance(sub_over, dict) else {})
    cfg = dataclasses.replace(cfg, **changes) if changes else cfg
    name = over.get("preset", raw.get("preset"))
    return cfg.apply_preset(str(name)) if name and hasattr(cfg, "apply_preset") else cfg


def validate(cfg, prefix: str = "") -> None:
    """Run the ``validate(prefix)`` method of each config dataclass in ``cfg``'s tree; a node that has one covers
    its own sub-configs, other nodes are walked into."""
    method = getattr(type(cfg), "validate", None)
    if callable(method):
        return method(cfg, prefix) if prefix else method(cfg)
    for f in dataclasses.fields(cfg):
        child = getattr(cfg, f.name)
        if dataclasses.is_dataclass(child):
            validate(child, f"{prefix}{f.name}.")


def check_min(cfg, prefix: str, low: float, keys: str) -> None:
    """Raise naming the first of ``keys`` (space-separated, dotted below ``cfg``) whose value is below ``low``."""
    for key in keys.split():
        value = functools.reduce(getattr, key.split("."), cfg)
        if value < low:
            raise ValueError(f"{prefix}{key}={value!r}: expected a value >= {low}")


def choice_error(key: str, value: Any, choices) -> str:
    """``train.dtype='fp16': choose one of auto, bf16, fp32 (did you mean bf16?)``."""
    near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return f"{key}={value!r}: choose one of {', '.join(map(str, choices))}{hint}"


def check_choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(choice_error(key, value, list(choices)))


def _coerce(value: Any, tp: Any, where: str, key: str) -> Any:
    """Convert a YAML or ``key=value`` value to the annotated field type ``tp`` (``key`` names it in errors)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, Override) and value.strip() in ("null", "~", "none")):
            return None
        return _coerce(value, args[0], where, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):
            value = str(value).lower()  # YAML reads `compile: true` as a boolean
        if isinstance(value, str) and value not in choices and value.lower() in choices:
            value = value.lower()
        if value not in choices:
            raise ValueError(f"{where}: {choice_error(key, value, choices)}")
        return choices[choices.index(value)]
    if origin is list:
        return _coerce_list(value, (typing.get_args(tp) or (str,))[0], where, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{where}: {key}: expected true or false, got {value!r}")
    if tp in (int, float):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(float(value)) if tp is int else tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {key}: expected {tp.__name__}, got {str(value)!r}") from None
    if tp is str:
        return str(value)
    value = _plain(value, where, key)
    if origin is dict and not isinstance(value, dict):
        raise ValueError(f"{where}: {key}: expected a mapping of names to keys, got {value!r}")
    return value


def _coerce_list(value: Any, item: Any, where: str, key: str) -> list:
    if isinstance(value, Override):
        parsed = value.parsed(where, key)
        value = parsed if isinstance(parsed, list) else str(value)
    if isinstance(value, str):  # "a,b" is [a, b], in YAML as on the command line
        value = [v for v in (s.strip() for s in value.split(",")) if v]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: {key}: expected a list, got {value!r}")
    if not dataclasses.is_dataclass(item):
        return [_coerce(v, item, where, f"{key}[{i}]") for i, v in enumerate(value)]
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, (dict, item)):
            names = ", ".join(f.name for f in dataclasses.fields(item))
            raise ValueError(f"{where}: {key}[{i}]: expected a mapping with keys {names}, got {v!r}")
        out.append(merge(item(), v, f"{where}: {key}[{i}]") if isinstance(v, dict) else v)
    return out


def _plain(value: Any, where: str, key: str) -> Any:
    """``value`` with every Override in it read as YAML (fields typed Any or dict keep whatever YAML gives)."""
    if isinstance(value, Override):
        return value.parsed(where, key)
    if isinstance(value, dict):
        return {k: _plain(v, where, f"{key}.{k}") for k, v in value.items()}
    return value


def merge(obj, updates: dict[str, Any], where: str = "config", _path: str = ""):
    """Return a copy of dataclass ``obj`` with nested ``updates`` applied; unknown keys and bad values raise a
    one-line ValueError that starts with ``where`` (a file, "override") and names the dotted key."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for key, value in (updates or {}).items():
        full = f"{_path}{key}"
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            under = f" of {_path[:-1]}" if _path else ""
            raise ValueError(f"{where}: unknown key {full!r}{hint}; valid keys{under}: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {full}: expected a mapping of its keys, got {value!r}")
            changes[key] = merge(current, value, where, f"{full}.")
        else:
            changes[key] = _coerce(value, hints[key], where, full)
    return dataclasses.replace(obj, **changes)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["model.d_model=64", "prompt=Q: 3"]`` -> nested dict of Override values (read later by field type)."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{item!r} is not of the form key=value (a dotted key, e.g. name=value or section.key=value)")
        key, raw = item.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} was already given a value")
        node[parts[-1]] = Override(raw)
    return nested


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """A YAML file's top-level mapping ({} for None or an empty file); a one-line error otherwise."""
    if path is None:
        return {}
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping (key: value lines) at the top level, got {type(raw).__name__}")
    return raw


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def describe(cls, prefix: str = "") -> str:
    """The key list of a subcommand's ``--help``: one line per key of ``cls`` (dotted below nested configs, after
    ``prefix``) with its default, its description (the field's trailing ``# comment``) and, for a choice, the
    choices. Each nested config starts a paragraph headed by its dotted name and what it is."""
    paragraphs: list[list[tuple[str, str]]] = []

    def walk(obj, prefix: str, heading: str) -> None:
        hints, notes = typing.get_type_hints(type(obj)), field_comments(type(obj))
        rows: list[tuple[str, str]] = [(heading, "")] if heading else []
        paragraphs.append(rows)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                about = notes.get(f.name) or _summary(type(value))
                walk(value, f"{prefix}{f.name}.", f"{prefix}{f.name}.*  {about}".rstrip())
                continue
            shown = json.dumps(value) if isinstance(value, (list, dict, bool)) or value in ("", None) else value
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
            note = " ".join(filter(None, [f"({' | '.join(choices)})" if choices else "", notes.get(f.name, "")]))
            rows.append((f"  {prefix}{f.name}={shown}", note))

    walk(cls(), prefix, "")
    lines: list[str] = []
    for rows in filter(None, paragraphs):
        width = min(max(len(key) for key, note in rows if key.startswith("  ")), 40)
        lines += [""] * bool(lines) + [f"{key:<{width}}  {note}".rstrip() if key.startswith("  ") else key
                                        for key, note in rows]
    return "\n".join(lines)


def _summary(cls) -> str:
    """The first line of a class's own docstring ('' for the signature dataclasses make up without one)."""
    doc = cls.__doc__ or ""
    return "" if doc.startswith(f"{cls.__name__}(") else doc.strip().split("\n")[0].replace("``", "`")


@functools.cache
def field_comments(cls) -> dict[str, str]:
    """Field name -> the ``# comment`` that ends its line in the source of ``cls`` (or of a dataclass base): the
    one-line descriptions ``--help`` shows. Empty when the source cannot be read."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        depth, head, comment = 0, [], ""  # head: the first two tokens of the statement being read
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type in (tokenize.INDENT, tokenize.DEDENT):
                depth += 1 if tok.type == tokenize.INDENT else -1
            elif tok.type == tokenize.COMMENT:
                comment = comment or tok.string.lstrip("#").strip()
            elif tok.type == tokenize.NL and not head:
                comment = ""  # a comment line of its own describes no field
            elif tok.type == tokenize.NEWLINE:
                # a field: `name: type ...` directly in the class body
                if depth == 1 and len(head) == 2 and head[0].type == tokenize.NAME and head[1].string == ":":
                    out[head[0].string] = comment
                head, comment = [], ""
            elif tok.type != tokenize.NL and len(head) < 2:
                head.append(tok)
    return out


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict[str, Any]):
    return merge(cls(), data, where=cls.__name__)


def dump_yaml(cfg) -> str:
    """The config as YAML, secrets masked (``masked``): what every printed and saved config goes through."""
    return yaml.safe_dump(masked(to_dict(cfg)), sort_keys=False)


# A field holding a secret, by its name: api_key, openai_api_key, client_secret, password, hf_token, auth_token,
# token... but not api_key_env / api_key_file (where the secret is) or max_tokens, tokenizer, flops_per_token.
SECRET_NAME = re.compile(r"(^|_)(api_?key|secret(_key)?|private_key|password|passwd|"
                         r"(auth|access|bearer|hf|api|refresh|session)_?token)$|^token$", re.IGNORECASE)


def mask_secret(value: str) -> str:
    """``sk-abcdef123456789`` -> ``sk-...****``; short values -> ``***``; "" stays "" (no key set)."""
    if not value:
        return value
    return f"{value[:3]}...****" if len(value) >= 16 else "***"


def masked(data: Any) -> Any:
    """A copy of a config's dict (``to_dict``) with every string field whose name looks secret (``SECRET_NAME``)
    masked by ``mask_secret``, at any depth."""
    if isinstance(data, dict):
        return {k: mask_secret(v) if isinstance(v, str) and SECRET_NAME.search(str(k)) else masked(v)
                for k, v in data.items()}
    if isinstance(data, list):
        return [masked(v) for v in data]
    return data
