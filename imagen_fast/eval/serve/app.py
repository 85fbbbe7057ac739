"""The rating web app: a WSGI application over a ``Store`` and a threaded stdlib server.

    GET  /                 the rating page (static/index.html + app.js)
    POST /api/raters       {"name": ...} -> {"token": ..., "total": ...}: a new rater
    GET  /api/next         (Authorization: Bearer TOKEN) -> the rater's next trial, or done
    POST /api/answer       (Authorization: Bearer TOKEN) {"trial": id, "answer": ...}
    GET  /img/<id>         an image of the study

Errors are JSON ``{"error": ...}`` with 400 (bad input), 401 (no or unknown token),
403 (another rater's trial), 404, 409 (already answered otherwise).
"""
from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import socketserver
import sys
from importlib import resources
from typing import Callable, Iterable, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .store import Store, StoreError
from .study import QUESTIONS

MAX_BODY = 64 * 1024
STATIC = ("index.html", "app.js", "style.css")
CHOICES = {
    "ab": [{"value": "left", "label": "Left image"}, {"value": "indifferent", "label": "Indifferent"},
           {"value": "right", "label": "Right image"}],
    "alignment": [{"value": "yes", "label": "Yes"}, {"value": "somewhat", "label": "Somewhat"},
                  {"value": "no", "label": "No"}],
}


def _static(name: str) -> bytes:
    return resources.files("imagen_fast.eval.serve").joinpath("static", name).read_bytes()


def _completion_code(token: str) -> str:
    return hashlib.sha256(f"done:{token}".encode()).hexdigest()[:10].upper()


class RatingApp:
    def __init__(self, store: Store):
        if not store.has_study():
            raise ValueError(f"{store.path} holds no study: load one first")
        self.store = store

    def __call__(self, environ, start_response) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/") or "/"
        try:
            status, headers, body = self.route(method, path, environ)
        except StoreError as e:
            status, headers, body = _json(e.status, {"error": str(e)})
        start_response(_status_line(status), headers + [("Content-Length", str(len(body)))])
        return [body]

    def route(self, method: str, path: str, environ):
        if path == "/" or path == "/index.html":
            _allow(method, "GET")
            return 200, [("Content-Type", "text/html; charset=utf-8"),
                         ("Cache-Control", "no-store")], _static("index.html")
        if path.startswith("/static/"):
            _allow(method, "GET")
            name = path[len("/static/"):]
            if name not in STATIC:
                raise StoreError(404, f"no static file {name}")
            ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
            return 200, [("Content-Type", ctype), ("Cache-Control", "no-store")], _static(name)
        if path.startswith("/img/"):
            _allow(method, "GET")
            return self.image(path[len("/img/"):])
        if path == "/api/raters":
            _allow(method, "POST")
            body = _read_json(environ)
            name = body.get("name", "")
            if not isinstance(name, str):
                raise StoreError(400, "name: expected a string")
            r = self.store.create_rater(name)
            return _json(201, {"token": r["token"], "total": r["total"]})
        if path == "/api/next":
            _allow(method, "GET")
            token = _token(environ)
            rater = self.store.rater_of(token)
            trial = self.store.next_trial(rater)
            prog = self.store.progress(rater)
            if trial is None:
                return _json(200, {"done": True, "progress": prog,
                                   "code": _completion_code(token)})
            kind = trial["kind"]
            return _json(200, {"done": False, "progress": prog, "trial": {
                "id": trial["id"], "position": trial["position"], "total": trial["total"],
                "kind": kind, "question": QUESTIONS[kind], "caption": trial["caption"],
                "show_caption": kind != "photorealism",
                "images": [f"/img/{i}" for i in trial["images"]],
                "choices": CHOICES["alignment" if kind == "alignment" else "ab"]}})
        if path == "/api/answer":
            _allow(method, "POST")
            rater = self.store.rater_of(_token(environ))
            body = _read_json(environ)
            trial, answer = body.get("trial"), body.get("answer")
            if not isinstance(trial, int) or isinstance(trial, bool):
                raise StoreError(400, "trial: expected an integer id")
            if not isinstance(answer, str):
                raise StoreError(400, "answer: expected a string")
            self.store.answer(rater, trial, answer)
            return _json(200, {"ok": True, "progress": self.store.progress(rater)})
        raise StoreError(404, f"no such page: {path}")

    def image(self, ident: str):
        if not ident.isdigit():
            raise StoreError(404, f"no image {ident}")
        path = self.store.image_path(int(ident))
        if path is None or not os.path.isfile(path):
            raise StoreError(404, f"no image {ident}")
        with open(path, "rb") as f:
            data = f.read()
        ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return 200, [("Content-Type", ctype), ("Cache-Control", "private, max-age=86400")], data


def _allow(method: str, expected: str) -> None:
    if method != expected:
        raise StoreError(405, f"method {method} not allowed here (use {expected})")


def _token(environ) -> Optional[str]:
    auth = environ.get("HTTP_AUTHORIZATION", "")
    return auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else None


def _read_json(environ) -> dict:
    try:
        n = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise StoreError(400, "bad Content-Length") from None
    if n > MAX_BODY:
        raise StoreError(413, "request body too large")
    raw = environ["wsgi.input"].read(n) if n else b""
    try:
        body = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StoreError(400, "body: not valid JSON") from None
    if not isinstance(body, dict):
        raise StoreError(400, "body: expected a JSON object")
    return body


def _json(status: int, obj) -> tuple:
    return status, [("Content-Type", "application/json"), ("Cache-Control", "no-store")], \
        json.dumps(obj).encode()


_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            413: "Payload Too Large", 500: "Internal Server Error"}


def _status_line(status: int) -> str:
    return f"{status} {_REASONS.get(status, 'Error')}"


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        if os.environ.get("IMAGEN_FAST_SERVE_LOG"):
            super().log_message(format, *args)


def serve(store: Store, host: str = "127.0.0.1", port: int = 8000,
          on_ready: Optional[Callable[[str], None]] = None) -> None:
    """Serve until interrupted. ``on_ready(url)`` is called once the socket listens."""
    app = RatingApp(store)
    with make_server(host, port, app, server_class=ThreadingWSGIServer,
                     handler_class=_QuietHandler) as httpd:
        url = f"http://{host}:{httpd.server_port}/"
        (on_ready or (lambda u: print(f"serving the rating app on {u}", flush=True)))(url)
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
