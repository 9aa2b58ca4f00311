"""A tiny OpenAI-compatible chat-completions server for tests: real HTTP on 127.0.0.1, in a daemon thread.

``POST /v1/chat/completions`` answers ``reply(request_body)`` (a function, or a fixed string) in the standard
schema (``choices[0].message.content``); ``GET /v1/models`` lists ``models``. ``delay_s`` holds every answer
back (to test client timeouts), ``error_status`` answers every request with that HTTP status and an OpenAI-style
error body. Every request is recorded (path, lower-cased headers, JSON body) in ``requests``. Use as a context manager or
through the ``chat_server`` fixture (``from chat_server import chat_server``: tests/ is on the path).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


class ChatServer:
    def __init__(self, reply: str | Callable[[dict[str, Any]], str] = "- collect wood", delay_s: float = 0.0,
                 error_status: int | None = None, models: tuple[str, ...] = ("test-model",)) -> None:
        self.reply, self.delay_s, self.error_status, self.models = reply, delay_s, error_status, models
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()  # wakes handlers sleeping through delay_s at shutdown
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL an OpenAI client takes (``.../v1``)."""
        assert self._httpd is not None, "start() the server first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def count(self, path: str = "/v1/chat/completions") -> int:
        """Requests received for ``path``."""
        with self._lock:
            return sum(r["path"] == path for r in self.requests)

    def start(self) -> ChatServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest's output clean
                pass

            def do_GET(self) -> None:
                self._answer(None)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                self._answer(json.loads(self.rfile.read(length) or b"{}"))

            def _answer(self, body: dict[str, Any] | None) -> None:
                path = self.path.split("?")[0]
                with server._lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    server.requests.append({"path": path, "headers": headers, "body": body})
                if server.delay_s and server._stop.wait(server.delay_s):
                    return
                if server.error_status is not None:
                    status = server.error_status
                    payload = {"error": {"message": "test server error", "type": "server_error",
                                         "param": None, "code": None}}
                elif path == "/v1/models" and body is None:
                    status, payload = 200, {"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in server.models]}
                elif path == "/v1/chat/completions" and body is not None:
                    text = server.reply(body) if callable(server.reply) else server.reply
                    status, payload = 200, {
                        "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion",
                        "created": int(time.time()), "model": body.get("model", ""),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop", "logprobs": None}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                else:
                    status, payload = 404, {"error": {"message": f"no route {path}", "type": "invalid_request_error",
                                                      "param": None, "code": None}}
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@pytest.fixture
def chat_server() -> Iterator[ChatServer]:
    """A started server answering ``- collect wood``; set ``reply``, ``delay_s``, ``error_status`` in the test."""
    with ChatServer() as server:
        yield server
