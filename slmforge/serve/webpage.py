"""The chat web page of ``slmforge serve``: ``/`` and its script and style sheet, shipped in the package (``static/``).

The page (``static/chat.js``) streams answers from ``/v1/chat/completions`` with ``stream: true``, as any OpenAI
client would; the server needs nothing else for it. The files are plain HTML, JavaScript and CSS: no build step,
no CDN, and a Content-Security-Policy that lets the page load and call nothing but this server. The page itself is
public (it holds no data); the API key it asks for on a 401 stays in the page's memory.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

STATIC = Path(__file__).with_name("static")
FILES = {"index.html": "text/html; charset=utf-8", "chat.js": "text/javascript; charset=utf-8",
         "chat.css": "text/css; charset=utf-8"}
# Only this origin's script, styles and API; no inline script, frames or form posts elsewhere.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def add_webpage(app: FastAPI) -> None:
    """``GET /`` (the page) and ``GET /static/<file>`` for the files in ``FILES``, outside the API key check."""
    app.get("/", include_in_schema=False)(_file("index.html"))
    for name in FILES:
        app.get(f"/static/{name}", include_in_schema=False)(_file(name))


def _file(name: str):
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

    async def get() -> FileResponse:
        return FileResponse(STATIC / name, media_type=FILES[name], headers=headers)

    return get
