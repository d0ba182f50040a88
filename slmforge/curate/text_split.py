"""How plain text splits into documents: paragraphs (blank-line separated) and fixed-size chunks.

``curate/documents.py`` reads .txt/.md files through these for ``text_split`` = "blank_line" and "chunk".
"""

from __future__ import annotations

from typing import Iterable, Iterator


def paragraphs(lines: Iterable[str]) -> Iterator[str]:
    para: list[str] = []
    for line in lines:
        if line.strip():
            para.append(line.rstrip("\r\n"))
        elif para:
            yield "\n".join(para)
            para = []
    if para:
        yield "\n".join(para)


def chunk_text(pieces: Iterable[str], chunk_chars: int) -> Iterator[str]:
    """Cut a stream of text into pieces of at most ``chunk_chars`` characters; joined, they give the text back.

    Each cut falls after the last blank line, else line break, else space, in the second half of the piece,
    so that a piece rarely ends mid-word; a piece with none of them is cut at ``chunk_chars``.
    """
    buffer = ""
    for piece in pieces:
        buffer += piece
        start = 0  # an offset rather than slicing the buffer each time: a huge line stays linear
        while len(buffer) - start > chunk_chars:
            window = buffer[start:start + chunk_chars]
            ends = ((window.rfind(sep, chunk_chars // 2), len(sep)) for sep in ("\n\n", "\n", " "))
            cut = next((i + n for i, n in ends if i >= 0), chunk_chars)
            yield window[:cut]
            start += cut
        buffer = buffer[start:]
    if buffer:
        yield buffer
