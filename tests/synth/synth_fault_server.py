"""A loopback OpenAI-compatible chat server that misbehaves on purpose, for the synthesizer's tests.

A raw asyncio HTTP/1.1 server (keep-alive, Content-Length bodies) in a background thread, because a
framework cannot drop a connection mid-request or stall on demand. What it does with a request is
``plan(request_id, attempt)``, keyed by the ``X-Request-Id`` header the teacher sends and the number of
times that id was seen, so every run of a test sees the same faults. Actions:
  ok         200 with a correct GSM8K-format answer (``math_answer``)
  500        HTTP 500                          429     HTTP 429 with ``Retry-After: retry_after``
  hang       read the request, answer nothing for ``hang_seconds``, then close
  drop       close the connection without answering
  badjson    200 whose body is not JSON          400     HTTP 400 (the request's own fault)
  malformed  200 with a chatty answer that fails the template's checks
  wrong      200 with an answer whose arithmetic is wrong
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import Counter
from typing import Callable


def id_class(request_id: str, num_classes: int = 10) -> int:
    return int(hashlib.blake2b(request_id.encode(), digest_size=8).hexdigest(), 16) % num_classes


def default_plan(request_id: str, attempt: int) -> str:
    """Class of the id -> faults: 0 a 500 first, 1 two 429s, 2 a hang, 3 a drop, 4 malformed, 5 wrong sum,
    6 a non-JSON body first, 7 HTTP 400, 8-9 clean."""
    c = id_class(request_id)
    first = {0: "500", 2: "hang", 3: "drop", 6: "badjson"}
    if c in first:
        return first[c] if attempt == 0 else "ok"
    if c == 1:
        return "429" if attempt < 2 else "ok"
    return {4: "malformed", 5: "wrong", 7: "400"}.get(c, "ok")


EXPECTED_RETRIES = {0: 1, 1: 2, 2: 1, 3: 1, 6: 1}  # retries default_plan causes per id class
REJECTED_CLASSES = {4, 5, 7}


def math_answer(request_id: str, wrong: bool = False) -> str:
    h = int(hashlib.blake2b(request_id.encode(), digest_size=8).hexdigest(), 16)
    a, b = 3 + h % 40, 2 + h // 40 % 30
    s = a + b + (1 if wrong else 0)
    return (f"Question: Tom has {a} apples and buys {b} more at the market. How many apples does he have now?\n"
            f"Solution: He has {a} + {b} = <<{a}+{b}={s}>>{s} apples.\n#### {s}")


class FaultServer:
    def __init__(self, plan: Callable[[str, int], str] = default_plan, delay: float = 0.0,
                 hang_seconds: float = 2.0, retry_after: str = "0.05"):
        self.plan, self.delay, self.hang_seconds, self.retry_after = plan, delay, hang_seconds, retry_after
        self.attempts: Counter = Counter()  # request id -> requests seen
        self.answered: Counter = Counter()  # request id -> 200s sent with a chat completion
        self.actions: Counter = Counter()
        self.authorizations: Counter = Counter()  # Authorization header -> requests that carried it
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "FaultServer":
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self.loop).result(10)
        self.base_url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                headers = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    key, _, value = h.decode().partition(":")
                    headers[key.strip().lower()] = value.strip()
                body = json.loads(await reader.readexactly(int(headers.get("content-length", 0))) or b"{}")
                self.authorizations[headers.get("authorization", "")] += 1
                if not await self._answer(writer, headers.get("x-request-id", ""), body):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, rid: str, body: dict) -> bool:
        """Answer one request; False when the connection must close."""
        attempt, self.attempts[rid] = self.attempts[rid], self.attempts[rid] + 1
        action = self.plan(rid, attempt)
        self.actions[action] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if action == "drop":
            writer.transport.abort()
            return False
        if action == "hang":
            await asyncio.sleep(self.hang_seconds)
            return False
        extra = ""
        if action in ("ok", "malformed", "wrong"):
            text = {"ok": math_answer(rid), "wrong": math_answer(rid, wrong=True),
                    "malformed": "Sure! Here is a fun problem for you, I hope you like it."}[action]
            status, payload = 200, json.dumps({
                "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": 0, "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}})
            self.answered[rid] += 1
        elif action == "badjson":
            status, payload = 200, "{not json"
        else:
            status, payload = int(action), json.dumps({"error": {"message": f"injected {action}"}})
            extra = f"Retry-After: {self.retry_after}\r\n" if action == "429" else ""
        data = payload.encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                     f"{extra}\r\n".encode() + data)
        await writer.drain()
        return True
