"""Documents, and streaming readers and writers for plain text, JSON Lines and Parquet.

A ``Document`` is the unit every data stage passes along: an id, the text and a free-form ``meta`` dict.
``read_documents`` streams documents from files or globs one at a time (a JSONL file is read line by line
and a Parquet file in record batches, so a big corpus never sits in memory); the writers stream back out,
atomically. A data-engine stage is a ``Step``: ``run(docs, rank, world_size)`` over an iterator of documents;
``curate/steps.py`` runs a list of steps over one shard of the input.

Supported inputs, chosen by suffix:
  .txt .md              plain UTF-8 text; ``text_split`` = "file" (one document per file), "blank_line"
                        (documents separated by one or more blank lines), "line" (one per line) or "chunk"
                        (pieces of at most ``chunk_chars`` characters, cut after a blank line, a line break or
                        a space where there is one in the second half of the piece; joined they give the file)
  .jsonl .json .jsonl.gz .json.gz
                        one JSON object per line, text under ``text_field``; an "id" key becomes the id, a
                        "meta" object and any other keys become ``meta``; blank lines are ignored
  .parquet              column ``text_field``; optional "id" and "meta" (JSON string) columns, other columns
                        go into ``meta``

An empty file yields no documents; it still counts in ``ReadStats.num_files``. Documents whose text is empty
or only whitespace are skipped and counted in ``ReadStats.num_empty_skipped``.

Bad input raises a ValueError naming the file and line by default. With ``on_error="skip"`` (for long curation
jobs that must not stop at one broken record) a malformed record (not JSON, not an object, no text field, an
unreadable Parquet file) is skipped and counted in ``ReadStats.num_malformed_skipped``, and a line that is not
valid UTF-8, or a text with a lone surrogate (a JSON "\\ud800" escape), is dropped and counted in
``ReadStats.num_invalid_utf8_skipped``; the first few messages are kept in ``ReadStats.errors``. Skipped
records keep their index, so the ids of the records after them do not shift. A truncated or corrupt gzip file is
an error in both modes (what follows the break is lost, not one record).

What a stage read is checked (``check_read``, or ``checked`` around its stream): no document at all (empty files,
a wrong ``text_field``, every record malformed) or more than half the records skipped is a one-line error with
the counts, the missing field and the fields the records do have; fewer skips are a warning line
(``read_warning``).

JSON Lines are read in blocks and decoded by msgspec; a line it refuses is read again the stdlib way, so that
documents, counts and messages are those of json.loads. ``keep_raw`` keeps each record's line on its document, and
``write_jsonl`` copies the line of a document that did not change instead of encoding it again.

long: about 670 lines, because the readers of the four formats, the counting of what they skip and the checks
on those counts are one concern (what a stage read, and what it could not); the writers are the other half.
"""

from __future__ import annotations

import functools
import glob
import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Protocol

import msgspec

from slmforge.curate.text_split import chunk_text, paragraphs
from slmforge.runs import atomic_path

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
TEXT_SPLITS = ("file", "blank_line", "line", "chunk")
ON_ERRORS = ("raise", "skip")
MAX_ERROR_MESSAGES = 10


@dataclass(slots=True)
class Document:
    """``raw``: set by ``read_documents(..., keep_raw=True)`` on a JSON Lines record that has a string "id":
    (line bytes, text, id, meta as JSON or None, text field), so that a writer can copy the line as it was when the
    document is unchanged (``jsonl_line``); any change to its text, id or meta makes the writer encode it anew."""

    id: str
    text: str
    meta: dict = field(default_factory=dict)
    raw: tuple | None = field(default=None, repr=False, compare=False)


@dataclass
class ReadStats:
    num_files: int = 0
    num_docs: int = 0  # documents yielded
    num_empty_skipped: int = 0  # documents with empty or whitespace-only text, not yielded
    num_bytes: int = 0  # UTF-8 bytes of the yielded documents' text
    num_malformed_skipped: int = 0  # on_error="skip": records that could not be parsed
    num_invalid_utf8_skipped: int = 0  # on_error="skip": lines not valid UTF-8, texts with a lone surrogate
    num_missing_field: int = 0  # of the malformed records: those without the text field
    other_fields: list[str] = field(default_factory=list)  # the fields those records have (the first few names)
    errors: list[str] = field(default_factory=list)  # the first MAX_ERROR_MESSAGES skip messages

    def skip(self, kind: str, message: str, fields: list[str] | None = None, count: int = 1) -> None:
        """Count ``count`` skipped records (kind "malformed" or "invalid_utf8"; ``fields``: the fields of a record
        without the text field) and keep the message if there is room."""
        setattr(self, f"num_{kind}_skipped", getattr(self, f"num_{kind}_skipped") + count)
        if fields is not None:
            self.num_missing_field += count
            self.other_fields += [f for f in fields if f not in self.other_fields][:20 - len(self.other_fields)]
        if len(self.errors) < MAX_ERROR_MESSAGES:
            self.errors.append(message)

    @property
    def num_skipped(self) -> int:
        return self.num_malformed_skipped + self.num_invalid_utf8_skipped

    @property
    def num_records(self) -> int:
        """Records read: documents, empty ones and skipped ones."""
        return self.num_docs + self.num_empty_skipped + self.num_skipped


class Step(Protocol):
    """A data-engine stage. Each of ``world_size`` workers calls ``run`` with its own ``rank``.

    ``curate.steps.run_steps`` drives a list of them over each shard. A step that drops documents may have an
    ``on_drop(doc, record)`` attribute; the driver points it at the shard's log of removed documents.
    """

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]: ...


class DropStep:
    """A ``Step`` that keeps a document when ``why_dropped(doc)`` is None, and hands the others with that record
    (``{"reason": ..., ...}``) to ``on_drop``: the shape of every per-document filter."""

    on_drop = None

    def why_dropped(self, doc: Document) -> dict | None:
        raise NotImplementedError

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for doc in docs:
            record = self.why_dropped(doc)
            if record is None:
                yield doc
            elif self.on_drop:
                self.on_drop(doc, record)


def shard_of(docs: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
    """Every ``world_size``-th document starting at ``rank``: the workers' shards are disjoint and cover all."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    for i, doc in enumerate(docs):
        if i % world_size == rank:
            yield doc


# ---------------------------------------------------------------- paths


def _suffix(path: Path) -> str | None:
    """The supported suffix ``path`` ends with (longest first, so .jsonl.gz beats .gz), or None."""
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _stem(path: Path) -> str:
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def expand_paths(patterns: str | Path | list[str | Path]) -> list[Path]:
    """Expand files, directories and globs into a sorted, de-duplicated list of files.

    Each pattern's matches are sorted, so the order is deterministic. A directory or a glob expands to the
    supported files it matches (so ``data/*`` skips a LICENSE); a file named exactly is kept whatever its
    suffix, and reading it then says what was expected. A pattern that matches nothing raises a ValueError.
    """
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    paths: list[Path] = []
    for pattern in map(str, patterns):
        if Path(pattern).is_dir():
            matches = [p for p in Path(pattern).rglob("*") if p.is_file() and _suffix(p)]
        elif any(c in pattern for c in "*?["):
            matches = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file() and _suffix(Path(p))]
        else:
            matches = [Path(pattern)] if Path(pattern).is_file() else []
        if not matches:
            raise ValueError(f"no files match {pattern!r} (expected a file, a directory or a glob; "
                             f"supported suffixes: {', '.join(SUFFIXES)})")
        paths += sorted(matches)
    return list(dict.fromkeys(paths))


# ---------------------------------------------------------------- reading


Skip = Callable[..., None]  # skip(kind, message[, fields, count]): a skipped record, in on_error="skip" mode


class MissingField(ValueError):
    """A record (or a Parquet file: ``count`` rows) without the text field; ``fields`` are the ones it has."""

    def __init__(self, message: str, fields: list[str], count: int = 1):
        super().__init__(message)
        self.fields, self.count = fields, count


def _decode_utf8(path: Path, raw: bytes, line_no: int, offset: int, skip: Skip | None) -> str | None:
    """``raw`` decoded, or (bad UTF-8) the ValueError naming its byte offset, or None when ``skip`` counts it."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        message = (f"{path} line {line_no}: not valid UTF-8 at byte offset {offset + exc.start} "
                   f"(byte 0x{raw[exc.start]:02x}); expected UTF-8 text")
        if skip is None:
            raise ValueError(message) from None
        skip("invalid_utf8", message)
        return None


def _lines(path: Path, f: IO[bytes], skip: Skip | None = None) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, decoded line) from a binary stream, naming the byte of any bad UTF-8."""
    offset = 0
    for line_no, raw in enumerate(f, 1):
        line = _decode_utf8(path, raw, line_no, offset, skip)
        offset += len(raw)
        if line is None:
            continue
        # A byte-order mark is legal UTF-8 but is not part of the text.
        yield line_no, (line.lstrip("\ufeff") if line_no == 1 else line)


def _read_text(path: Path, text_split: str, chunk_chars: int,
               skip: Skip | None = None) -> Iterator[tuple[str | None, str, dict, None]]:
    with path.open("rb") as f:
        lines = (line for _, line in _lines(path, f, skip))
        if text_split == "line":
            texts = (line.rstrip("\r\n") for line in lines)
        elif text_split == "blank_line":
            texts = paragraphs(lines)
        elif text_split == "chunk":
            texts = chunk_text(lines, chunk_chars)
        else:
            text = "".join(lines)
            # An empty file holds no document; a whitespace-only one holds an empty document.
            texts = [text] if text else []
        for text in texts:
            yield None, text, {}, None


_decode_json = msgspec.json.Decoder().decode
_encode_json = msgspec.json.Encoder().encode
_BLOCK_BYTES = 1 << 22  # JSON Lines are read in blocks of about this many bytes
_BOM = "\ufeff".encode("utf-8")
_NOTHING = object()  # a line that is no record: blank, or not UTF-8 and skipped


def _line_blocks(f) -> Iterator[tuple[list[bytes], bool]]:
    """(lines without their b"\\n", whether the last one had one) per block read from the binary stream ``f``.

    ``read1`` returns what one read (one gzip member piece) gives, so a truncated gzip file fails after the lines
    before the break were yielded, as reading line by line did. A line longer than a block is joined once."""
    pending: list[bytes] = []
    while block := f.read1(_BLOCK_BYTES):
        lines = block.split(b"\n")
        if len(lines) == 1:
            pending.append(block)
            continue
        if pending:
            pending.append(lines[0])
            lines[0], pending = b"".join(pending), []
        last = lines.pop()
        if last:
            pending.append(last)
        yield lines, True
    if pending:
        yield [b"".join(pending)], False


def _read_jsonl(path: Path, text_field: str, skip: Skip | None = None,
                keep_raw: bool = False) -> Iterator[tuple[str | None, str, dict, tuple | None] | None]:
    """Yield (id, text, meta, raw) per record; with ``skip``, None in place of a record that could not be parsed.

    Each line goes to msgspec's decoder; a line it refuses (bad JSON or UTF-8, NaN, a lone surrogate escape, a
    number out of its range, a blank line) or that is not an object with a string text field takes the careful
    path (``_careful_record``: json.loads and the messages), so every outcome and message is the stdlib's."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    line_no = offset = 0
    decode = _FastRecords(text_field)
    try:
        with opener(path, "rb") as f:
            for lines, terminated in _line_blocks(f):
                for raw in lines:
                    line_no += 1
                    body = raw[len(_BOM):] if line_no == 1 and raw.startswith(_BOM) else raw
                    record = decode(body)
                    if record is not None:
                        doc_id, text, meta = record
                        raw_of = _raw_of(body, doc_id, text, meta, text_field) if keep_raw else None
                        yield (None if doc_id is None else str(doc_id)), text, meta, raw_of
                    else:
                        line = raw + b"\n" if terminated else raw  # an unterminated line is a block of its own
                        result = _careful_record(path, line, line_no, offset, text_field, skip)
                        if result is not _NOTHING:
                            yield result
                    offset += len(raw) + 1
    except EOFError:  # gzip: the stream ends before its end-of-stream marker
        raise ValueError(f"{path}: truncated gzip file: the compressed data ends after line {line_no}, before its "
                         f"end marker (an interrupted download or copy?); fetch or compress the file again") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"{path}: not a readable gzip file after line {line_no} ({exc}); "
                         f"expected gzip-compressed JSON Lines") from None


class _FastRecords:
    """msgspec's decoding of a line into (id as found, text, meta), or None where the careful path must decide.

    Records holding only the text field, "id" and "meta" (``write_jsonl``'s) decode into a struct, without a dict
    per record; from the first valid record with other keys on, the file's lines decode into dicts."""

    def __init__(self, text_field: str):
        self.text_field = text_field
        self.struct = None if text_field in ("id", "meta") else _struct_decoder(text_field)

    def __call__(self, body: bytes) -> tuple | None:
        if self.struct is not None:
            try:
                r = self.struct(body)
            except Exception:  # other keys, another type, or no JSON: the dict decoder tells which
                pass
            else:
                return r.id, r.text, r.meta if type(r.meta) is dict else ({} if r.meta is None else {"meta": r.meta})
        try:
            record = _decode_json(body)
        except Exception:  # msgspec.DecodeError, UnicodeDecodeError: the careful path says what
            return None
        if type(record) is not dict or type(record.get(self.text_field)) is not str:
            return None
        self.struct = None
        return _split_record(record, self.text_field)


@functools.cache
def _struct_decoder(text_field: str) -> Callable[[bytes], msgspec.Struct]:
    record = msgspec.defstruct("Record", [("text", str), ("id", object, None), ("meta", object, None)],
                               rename={"text": text_field}, forbid_unknown_fields=True)
    return msgspec.json.Decoder(record).decode


def _careful_record(path: Path, raw: bytes, line_no: int, offset: int, text_field: str, skip: Skip | None):
    """One line (with its b"\\n" if it had one) the stdlib way: a (id, text, meta, None) record, None for a
    malformed one skipped, ``_NOTHING`` for a blank line or one not UTF-8 and skipped; or the ValueError."""
    line = _decode_utf8(path, raw, line_no, offset, skip)
    if line is None:
        return _NOTHING
    if line_no == 1:
        line = line.lstrip("\ufeff")
    if not line.strip():
        return _NOTHING
    record = _parsed_or_skipped(lambda: _parse_json_line(line, text_field, f"{path} line {line_no}"), skip)
    return None if record is None else (*record, None)


def _raw_of(body: bytes, doc_id, text: str, meta: dict, text_field: str) -> tuple | None:
    """``Document.raw`` for a record read from the line ``body``: only with a string id (one made from the file
    name and index would be lost when the line is copied)."""
    if type(doc_id) is not str:
        return None
    return body[:-1] if body.endswith(b"\r") else body, text, doc_id, _meta_json(meta), text_field


def _meta_json(meta: dict) -> bytes | None:
    """``meta`` as JSON to compare (None when empty; b"" when msgspec cannot encode it, which matches nothing)."""
    if not meta:
        return None
    try:
        return _encode_json(meta)
    except Exception:
        return b""


def _parsed_or_skipped(parse: Callable[[], tuple], skip: Skip | None):
    """``parse()``; a ValueError is raised, or with ``skip`` counted as "malformed" and the record is None."""
    try:
        return parse()
    except ValueError as exc:
        if skip is None:
            raise
        if isinstance(exc, MissingField):
            skip("malformed", str(exc), exc.fields, exc.count)
        else:
            skip("malformed", str(exc))
        return None


def _parse_json_line(line: str, text_field: str, where: str) -> tuple[str | None, str, dict]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); "
                         f"expected one JSON object per line") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return _from_record(record, text_field, where)


def _from_record(record: dict, text_field: str, where: str) -> tuple[str | None, str, dict]:
    """Split a JSON object or Parquet row into (id, text, meta), checking the text field."""
    if text_field not in record:
        raise MissingField(f"{where}: missing text field {text_field!r}; available keys: "
                           f"{', '.join(map(repr, record)) or '(none)'}", list(record))
    if not isinstance(record[text_field], str):
        raise ValueError(f"{where}: field {text_field!r} must be a string, got {type(record[text_field]).__name__}")
    doc_id, text, meta = _split_record(record, text_field)
    return (None if doc_id is None else str(doc_id)), text, meta


def _split_record(record: dict, text_field: str) -> tuple:
    """(id as found or None, text, meta) of a record whose text field holds a string; ``record`` is consumed."""
    text = record.pop(text_field)
    doc_id = record.pop("id", None)
    meta = record.pop("meta", None)
    meta = dict(meta) if isinstance(meta, dict) else ({} if meta is None else {"meta": meta})
    meta.update(record)
    return doc_id, text, meta


def _read_parquet(path: Path, text_field: str, skip: Skip | None = None,
                  batch_size: int = 1024) -> Iterator[tuple[str | None, str, dict, None] | None]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        columns = pf.schema_arrow.names
        if text_field not in columns:
            raise MissingField(f"{path}: no column {text_field!r}; columns: {', '.join(map(repr, columns))}",
                               columns, pf.metadata.num_rows)
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        if isinstance(exc, MissingField):
            if skip is None:
                raise
            skip("malformed", str(exc), exc.fields, exc.count)
            return
        message = str(exc) if isinstance(exc, ValueError) else f"{path}: not a readable Parquet file ({exc})"
        if skip is None:
            raise ValueError(message) from None
        skip("malformed", message)
        return
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for record in batch.to_pylist():
            row += 1
            if isinstance(record.get("meta"), str):
                # write_parquet stores meta as a JSON string; another tool's plain string stays as it is.
                try:
                    record["meta"] = json.loads(record["meta"])
                except json.JSONDecodeError:
                    pass
            parsed = _parsed_or_skipped(lambda: _from_record(record, text_field, f"{path} row {row}"), skip)
            yield None if parsed is None else (*parsed, None)


def read_documents(
    patterns: str | Path | list[str | Path],
    text_field: str = "text",
    text_split: str = "file",
    stats: ReadStats | None = None,
    on_error: str = "raise",
    chunk_chars: int = 2000,
    keep_raw: bool = False,
) -> Iterator[Document]:
    """Stream documents from files, directories or globs (see the module docstring for formats).

    Ids come from the record's "id" when present, else ``f"{file_stem}:{index}"`` with the 0-based index of
    the record in its file (skipped empty records keep their index, so ids do not shift). Pass a
    ``ReadStats`` to have it filled in as the iterator advances. Patterns and ``text_split`` are checked
    here, before the first document is read; errors inside files surface as the iterator reaches them, or
    with ``on_error="skip"`` are skipped and counted in ``stats`` (see the module docstring). ``keep_raw`` keeps
    each JSON Lines record's line on its document (``Document.raw``), so that a stage writing the documents it
    keeps copies those lines instead of encoding them again.
    """
    if text_split not in TEXT_SPLITS:
        raise ValueError(f"text_split must be one of {', '.join(TEXT_SPLITS)}, got {text_split!r}")
    if on_error not in ON_ERRORS:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERRORS)}, got {on_error!r}")
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be at least 1, got {chunk_chars}")
    paths = expand_paths(patterns)
    for path in paths:
        if _suffix(path) is None:
            raise ValueError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
    stats = stats if stats is not None else ReadStats()
    return _iter_documents(paths, text_field, text_split, stats, on_error, chunk_chars, keep_raw)


def _iter_documents(paths: list[Path], text_field: str, text_split: str, stats: ReadStats,
                    on_error: str = "raise", chunk_chars: int = 2000, keep_raw: bool = False) -> Iterator[Document]:
    skip = stats.skip if on_error == "skip" else None
    for path in paths:
        suffix = _suffix(path)
        if suffix in TEXT_SUFFIXES:
            records = _read_text(path, text_split, chunk_chars, skip)
        elif suffix in JSONL_SUFFIXES:
            records = _read_jsonl(path, text_field, skip, keep_raw)
        else:
            records = _read_parquet(path, text_field, skip)
        stats.num_files += 1
        stem = _stem(path)
        for index, record in enumerate(records):
            if record is None:
                continue
            doc_id, text, meta, raw = record
            if not text or text.isspace():  # what not text.strip() says, without copying the text
                stats.num_empty_skipped += 1
                continue
            try:
                num_bytes = len(text) if text.isascii() else len(text.encode("utf-8"))
            except UnicodeEncodeError as exc:  # a lone surrogate, which a JSON "\ud800" escape can make
                message = (f"{path} record {index}: text has a lone surrogate at character {exc.start}; "
                           f"expected text that is valid UTF-8")
                if skip is None:
                    raise ValueError(message) from None
                skip("invalid_utf8", message)
                continue
            stats.num_docs += 1
            stats.num_bytes += num_bytes
            yield Document(doc_id if doc_id is not None else f"{stem}:{index}", text, meta, raw)


# ---------------------------------------------------------------- checking what was read

MAX_SKIPPED = 0.5  # a stage that skips more than this fraction of its records stops with an error


def checked(docs: Iterable[Document], stats: ReadStats, label: str, inputs, text_field: str) -> Iterator[Document]:
    """``docs`` as they are, then ``check_read``: a stage writing them through an atomic writer fails before its
    output is renamed into place."""
    yield from docs
    check_read(stats, label, inputs, text_field)


def check_read(stats: ReadStats, label: str, inputs, text_field: str) -> None:
    """A one-line ValueError when reading found no document, or skipped more than ``MAX_SKIPPED`` of the records:
    how many records were read from which files, how many lacked ``text_field`` (and the fields they have) and
    how many were malformed. ``label`` starts the message ("dedup", "filter")."""
    where = _names(inputs)
    if not stats.num_docs:
        if not stats.num_records:
            raise ValueError(f"{label}: {where}: no records at all (empty input); nothing to do")
        raise ValueError(f"{label}: 0 documents read from {where}, {stats.num_records:,} records: "
                         f"{_counts(stats, text_field)}")
    if stats.num_skipped > MAX_SKIPPED * (stats.num_docs + stats.num_skipped):
        raise ValueError(f"{label}: skipped {stats.num_skipped:,} of {stats.num_records:,} records of {where}, "
                         f"more than half: {_counts(stats, text_field)}")


def read_warning(stats: ReadStats, label: str, inputs, text_field: str) -> str | None:
    """One line for stderr when some records were skipped (fewer than ``check_read`` stops at), else None."""
    if not stats.num_skipped:
        return None
    return (f"{label}: warning: skipped {stats.num_skipped:,} of {stats.num_records:,} records of {_names(inputs)}: "
            f"{_counts(stats, text_field)}")


def _names(inputs) -> str:
    names = [str(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _counts(stats: ReadStats, text_field: str) -> str:
    """What the records were: "120 lack the text field 'body' (they have 'id', 'text'; ...); 3 malformed; ..."."""
    parts = []
    if stats.num_missing_field:
        parts.append(f"{stats.num_missing_field:,} lack the text field {text_field!r} (they have "
                     f"{', '.join(map(repr, stats.other_fields)) or 'no fields'}; set text_field to the one with the "
                     f"text)")
    if stats.num_malformed_skipped > stats.num_missing_field:
        parts.append(f"{stats.num_malformed_skipped - stats.num_missing_field:,} malformed")
    if stats.num_invalid_utf8_skipped:
        parts.append(f"{stats.num_invalid_utf8_skipped:,} not valid UTF-8")
    if stats.num_empty_skipped:
        parts.append(f"{stats.num_empty_skipped:,} with empty text")
    first = next((e for e in stats.errors if "missing text field" not in e and "no column" not in e), None)
    return "; ".join(parts) + (f"; the first bad one: {first}" if first and stats.num_skipped else "")


# ---------------------------------------------------------------- writing


def write_jsonl(path: str | Path, docs: Iterable[Document], text_field: str = "text") -> int:
    """Write ``{"id", text_field, "meta"}`` per line (gzip when the name ends in .gz); return the count.

    A document read with ``keep_raw`` and not changed since is written as the line it was read from (the same
    document when read back); the others are encoded by msgspec (``jsonl_line``). Atomic: if ``docs`` raises
    midway, an existing file at ``path`` is left as it was.
    """
    path = Path(path)
    count = 0
    with atomic_path(path) as tmp:
        gz = path.name.lower().endswith(".gz")
        # gzip level 6 (gzip's own default): about 3x faster to write than Python's 9, and 1-2% larger.
        with (gzip.open(tmp, "wb", compresslevel=6) if gz else open(tmp, "wb", buffering=1 << 20)) as f:
            lines: list[bytes] = []
            size = 0
            for doc in docs:
                line = jsonl_line(doc, text_field)
                lines += (line, b"\n")
                size += len(line)
                count += 1
                if size >= _BLOCK_BYTES:
                    f.write(b"".join(lines))
                    lines, size = [], 0
            f.write(b"".join(lines))
    return count


def jsonl_line(doc: Document, text_field: str) -> bytes:
    """The JSON line of ``doc``: the line it was read from when its text, id and meta are those read under the same
    text field, else ``{"id", text_field, "meta"}`` encoded by msgspec. json.dumps encodes instead where msgspec would
    differ from it (NaN or infinity in meta, which msgspec writes as null) or fails (its error is the stdlib's)."""
    raw = doc.raw
    if (raw is not None and raw[1] is doc.text and raw[2] is doc.id and raw[4] == text_field
            and raw[3] == _meta_json(doc.meta)):
        return raw[0]
    record = {"id": doc.id, text_field: doc.text, "meta": doc.meta}
    try:
        if not doc.meta or b"null" not in _encode_json(doc.meta):
            return _encode_json(record)
    except Exception:
        pass
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


def write_parquet(path: str | Path, docs: Iterable[Document], text_field: str = "text",
                  batch_size: int = 10000) -> int:
    """Write columns id, ``text_field`` and meta (a JSON string) in row groups of ``batch_size``; return the count.

    Meta is stored as JSON text rather than a struct column because documents' meta keys differ. Atomic, as
    ``write_jsonl``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), (text_field, pa.string()), ("meta", pa.string())])
    count = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        buffer: list[Document] = []

        def flush() -> None:
            columns = [[d.id for d in buffer], [d.text for d in buffer],
                       [json.dumps(d.meta, ensure_ascii=False) for d in buffer]]
            writer.write_table(pa.Table.from_arrays([pa.array(c, pa.string()) for c in columns], schema=schema))
            buffer.clear()

        for doc in docs:
            buffer.append(doc)
            count += 1
            if len(buffer) >= batch_size:
                flush()
        if buffer:
            flush()
    return count


def write_documents(path: str | Path, docs: Iterable[Document], text_field: str = "text") -> int:
    """Write ``docs`` as JSONL or Parquet, chosen by the suffix of ``path``; return the count."""
    suffix = _suffix(Path(path))
    if suffix in JSONL_SUFFIXES:
        return write_jsonl(path, docs, text_field)
    if suffix in PARQUET_SUFFIXES:
        return write_parquet(path, docs, text_field)
    raise ValueError(f"{path}: cannot write this file type; expected a name ending in "
                     f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}")
