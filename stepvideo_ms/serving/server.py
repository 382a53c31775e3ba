"""The model server: a Flask app over the services, and a bounded threaded WSGI server to run it.

Request path, in order, each step answering before any model work when it refuses:
auth (401) -> route (404/405) -> content type (415) -> Content-Length present (411) and within
the cap (413) -> decode the message (400) -> check fields, dtypes, shapes, finiteness (400/422)
-> wait for the device in the bounded queue (503 + Retry-After when full) -> run the model
(500 with a message on failure; the server keeps serving) -> stream the response message.
`GET /health` skips the queue, so it answers while the device is busy.
"""
from __future__ import annotations

import hmac
import logging
import socketserver
import threading
import time
import traceback
from typing import Callable, Dict, Optional

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler

from .. import __version__
from . import protocol
from .device_queue import DeviceQueue, QueueFull
from .limits import Limits
from .protocol import RequestError

LOG = logging.getLogger("stepvideo_ms.serving")


def error_response(status: int, message: str, field: Optional[str] = None, headers: Optional[dict] = None) -> Response:
    resp = jsonify({"error": message, "field": field, "status": status})
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _read_body(limits: Limits) -> bytes:
    ctype = (request.mimetype or "").lower()
    if ctype != protocol.CONTENT_TYPE:
        raise RequestError(f"Content-Type is {request.content_type or 'missing'!r}; send {protocol.CONTENT_TYPE!r}",
                           "Content-Type", 415)
    length = request.content_length
    if length is None:
        raise RequestError("the request has no Content-Length: send the body with its length", "Content-Length", 411)
    if length > limits.max_body_bytes:
        raise RequestError(f"the body of {length} bytes exceeds this server's limit of {limits.max_body_bytes} "
                           "bytes (--max_body_mb)", "body", 413)
    body = request.get_data(cache=False)
    if len(body) != length:
        raise RequestError(f"the body ended after {len(body)} of {length} bytes", "body")
    return body


def check_bearer(expected: Optional[str]) -> Optional[Response]:
    """None when the request carries `Authorization: Bearer <expected>` (or no token is set), else the 401."""
    if expected is None:
        return None
    header = request.headers.get("Authorization", "")
    given = header[7:] if header[:7].lower() == "bearer " else ""
    if not given or not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        return error_response(401, "missing or wrong token: send 'Authorization: Bearer <token>' "
                      "(the server's --auth_token)", "Authorization", {"WWW-Authenticate": "Bearer"})
    return None


class ServerState:
    """What one server process holds: its services, device queue, limits and counters."""

    def __init__(self, services: Dict[str, object], queue: DeviceQueue, limits: Limits,
                 auth_token: Optional[str], runtime_info: dict):
        self.services = services
        self.queue = queue
        self.limits = limits
        self.auth_token = auth_token or None
        self.runtime_info = runtime_info
        self.started = time.time()
        self.lock = threading.Lock()
        self.answered: Dict[int, int] = {}

    def count(self, status: int):
        with self.lock:
            self.answered[status] = self.answered.get(status, 0) + 1

    def health(self) -> dict:
        with self.lock:
            answered = {str(k): v for k, v in sorted(self.answered.items())}
        return {
            "status": "ok",
            "version": __version__,
            "protocol": protocol.PROTOCOL,
            **self.runtime_info,
            "loaded": {name: svc.describe() for name, svc in self.services.items()},
            "endpoints": sorted(p for svc in self.services.values() for p in svc.paths()),
            "queue": {"depth": self.queue.depth, **self.queue.stats()},
            "limits": self.limits.as_dict(),
            "auth": self.auth_token is not None,
            "uptime_s": round(time.time() - self.started, 1),
            "answered": answered,
        }


def create_app(state: ServerState) -> Flask:
    """The Flask app: the services' endpoints, /health, and the error handling."""
    app = Flask("stepvideo_ms.serving")
    app.config["MAX_CONTENT_LENGTH"] = None  # the body cap is checked (and reported) by _read_body

    @app.before_request
    def _authorize():
        return check_bearer(state.auth_token)

    @app.after_request
    def _count(resp):
        state.count(resp.status_code)
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if exc.code == 404:
            served = sorted(p for svc in state.services.values() for p in svc.paths())
            return error_response(404, f"no endpoint {request.path}: this server serves {served} and "
                          f"{protocol.HEALTH_PATH} (start it with --enable_llm / --enable_vae for the others)")
        return error_response(exc.code or 500, exc.description or exc.name)

    @app.get(protocol.HEALTH_PATH)
    def _health():
        return jsonify(state.health())

    def endpoint(parse: Callable, run: Callable, path: str):
        def view():
            try:
                body = _read_body(state.limits)
                msg = protocol.decode(body, state.limits.max_header_bytes)
                job = parse(msg)
            except RequestError as exc:
                return error_response(exc.status, exc.message, exc.field, {"Connection": "close"})
            try:
                fields, tensors, bf16 = state.queue.run(run, job)
            except QueueFull as exc:
                return error_response(503, f"{exc}; retry later", None, {"Retry-After": str(exc.retry_after_s)})
            except Exception as exc:  # the model failed: say so, log the trace, keep serving
                LOG.error("%s failed:\n%s", path, traceback.format_exc())
                return error_response(500, f"{path} failed inside the model: {type(exc).__name__}: {exc}")
            pieces, length = protocol.encode_chunks(fields, tensors, bf16)
            return Response(protocol.iter_bytes(pieces), status=200, content_type=protocol.CONTENT_TYPE,
                            headers={"Content-Length": str(length)})

        view.__name__ = "endpoint_" + path.strip("/").replace("-", "_")
        app.add_url_rule(path, view_func=view, methods=["POST"])

    for svc in state.services.values():
        for path, (parse, run) in svc.endpoints(state.limits).items():
            endpoint(parse, run, path)
    return app


_BUSY_BODY = b'{"error": "too many connections; retry later", "field": null, "status": 503}'
_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(_BUSY_BODY)) + _BUSY_BODY


class _Handler(WSGIRequestHandler):
    """werkzeug's handler with a socket time-out (a stalled client cannot hold a thread forever)."""

    timeout = None  # set per server below

    def log_request(self, code="-", size="-"):
        LOG.info('%s "%s" %s', self.address_string(), self.requestline, getattr(code, "value", code))

    def logerror_response(self, format, *args):  # noqa: A002 - http.server's signature
        LOG.warning("%s %s", self.address_string(), format % args)


class CannotListen(Exception):
    """The address cannot be bound or listened on (`errno`, `strerror` as the OSError's). Not an OSError,
    so that werkzeug does not print its own advice and exit: the caller says what to do in its terms."""

    def __init__(self, errno: Optional[int], strerror: Optional[str]):
        super().__init__(strerror)
        self.errno, self.strerror = errno, strerror


class BoundedWSGIServer(socketserver.ThreadingMixIn, BaseWSGIServer):
    """A threaded WSGI server with at most `max_connections` handler threads; a connection beyond
    that gets an immediate 503 and is closed. werkzeug closes every connection after its response,
    so a thread is held for one request at most. An address that cannot be bound raises CannotListen."""

    multithread = True
    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, port: int, app, max_connections: int, socket_timeout_s: float):
        handler = type("StepVideoHandler", (_Handler,), {"timeout": socket_timeout_s})
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(host, port, app, handler=handler)

    def server_bind(self):
        try:
            super().server_bind()
        except OSError as exc:
            raise CannotListen(exc.errno, exc.strerror) from None

    def server_activate(self):
        try:
            super().server_activate()
        except OSError as exc:
            raise CannotListen(exc.errno, exc.strerror) from None

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(_BUSY_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def make_server(state: ServerState, host: str, port: int) -> BoundedWSGIServer:
    """Bind (port 0 picks a free port: read it from `.port`) and return the server, not yet serving."""
    return BoundedWSGIServer(host, port, create_app(state), state.limits.max_connections,
                             state.limits.socket_timeout_s)
