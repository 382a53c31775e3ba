"""The HTTP client of the model servers: what run_parallel.py and the pipeline talk to.

    client = RemoteClient.for_caption("http://127.0.0.1:5000")
    emb = client.caption(["a cat", ""])          # {"y", "y_mask", "clip_embedding"} numpy
    vae = RemoteClient.for_vae("127.0.0.1")      # upstream style: host only -> default port 5001
    frames = vae.vae_decode(latents)             # (b, f, 3, H, W) float32

Every call has a connect and a read time-out; connection failures and 503 (busy) are retried a
bounded number of times with exponential back-off (honouring Retry-After, capped); any other
failure raises `RemoteServerError` naming the URL, the status and the server's message.
The token comes from `token=` or the STEPVIDEO_AUTH_TOKEN environment variable.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional, Sequence
from urllib.parse import urlsplit

import numpy as np
import requests

from . import protocol

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 3600.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 ** 3
READ_CHUNK_BYTES = 4 * 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024


START_SERVERS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "scripts", "start_servers.sh")
START_HINT = f"start the servers with: bash {START_SERVERS} --model_dir MODEL_DIR"


class RemoteServerError(RuntimeError):
    def __init__(self, message: str, url: str, status: Optional[int] = None, field: Optional[str] = None):
        super().__init__(message)
        self.url, self.status, self.field = url, status, field


def normalize_url(url: str, default_port: int) -> str:
    """'host', 'host:port' or 'http://host:port[/]' -> 'http://host:port' (scheme http or https)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"server url {url!r} is empty: pass e.g. http://127.0.0.1:{default_port}")
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"server url {url!r} is not http(s)://host[:port]")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"server url {url!r} must not carry a path: give http://host:port, the client adds "
                         "the endpoint")
    try:
        port = parts.port or default_port
    except ValueError:
        raise ValueError(f"server url {url!r} has an invalid port") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


class RemoteClient:
    def __init__(self, url: str, default_port: int = protocol.DEFAULT_CAPTION_PORT, token: Optional[str] = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S, read_timeout: float = DEFAULT_READ_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF_S,
                 max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES):
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError("connect_timeout and read_timeout must be positive (seconds)")
        if retries < 0 or backoff < 0:
            raise ValueError("retries and backoff must be >= 0")
        self.base_url = normalize_url(url, default_port)
        self.token = token if token is not None else os.environ.get(protocol.AUTH_ENV) or None
        self.timeout = (float(connect_timeout), float(read_timeout))
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_response_bytes = int(max_response_bytes)
        self.session = requests.Session()
        self.session.trust_env = False  # never route model traffic through a proxy from the environment

    @classmethod
    def for_caption(cls, url: str, **kwargs) -> "RemoteClient":
        return cls(url, default_port=protocol.DEFAULT_CAPTION_PORT, **kwargs)

    @classmethod
    def for_vae(cls, url: str, **kwargs) -> "RemoteClient":
        return cls(url, default_port=protocol.DEFAULT_VAE_PORT, **kwargs)

    def close(self):
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the API -------------------------------------------------------------------------
    def caption(self, prompts: Sequence[str]) -> Dict[str, np.ndarray]:
        """prompts -> {"y", "y_mask", "clip_embedding"} (float32, int64, float32)."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError("prompts must be a list of strings: pass [prompt]")
        msg = self._call(protocol.CAPTION_PATH, {"prompts": list(prompts)}, {})
        return {k: msg.float32(k) if msg.wire_dtypes[k] in protocol.FLOAT_WIRE_DTYPES else msg.tensors[k]
                for k in msg.tensors}

    def vae_decode(self, latents: np.ndarray, response_dtype: str = "float32") -> np.ndarray:
        """latents (b, f_lat, z, h, w) -> frames (b, f, 3, H, W) float32 in about [-1, 1]."""
        msg = self._call(protocol.VAE_DECODE_PATH, {"response_dtype": response_dtype},
                         {"latents": np.asarray(latents, np.float32)})
        return msg.float32("frames")

    def vae_encode(self, frames: np.ndarray, seed: int = 0, sample: bool = True,
                   response_dtype: str = "float32") -> np.ndarray:
        """frames (b, f, 3, H, W) in [-1, 1] (f = 1 for an image) -> latents (b, f_lat, z, h, w) float32."""
        fields = {"seed": int(seed), "sample": bool(sample), "response_dtype": response_dtype}
        msg = self._call(protocol.VAE_ENCODE_PATH, fields, {"frames": np.asarray(frames, np.float32)})
        return msg.float32("latents")

    def health(self) -> dict:
        resp = self._send("GET", protocol.HEALTH_PATH, None)
        try:
            return resp.json()
        except ValueError:
            raise RemoteServerError(f"GET {self.base_url}{protocol.HEALTH_PATH} answered something that is not "
                                    "JSON: is this a stepvideo_ms server?", self.base_url + protocol.HEALTH_PATH,
                                    resp.status_code) from None

    # ---- plumbing ------------------------------------------------------------------------
    def _headers(self, body: bool) -> dict:
        headers = {"Accept": protocol.CONTENT_TYPE + ", " + protocol.JSON_CONTENT_TYPE}
        if body:
            headers["Content-Type"] = protocol.CONTENT_TYPE
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _call(self, path: str, fields: dict, tensors: Dict[str, np.ndarray]) -> protocol.Message:
        body = protocol.encode(fields, tensors)
        resp = self._send("POST", path, body)
        url = self.base_url + path
        ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != protocol.CONTENT_TYPE:
            raise RemoteServerError(f"POST {url} answered content type {ctype or 'none'!r}, expected "
                                    f"{protocol.CONTENT_TYPE!r}: is this a stepvideo_ms server?", url, resp.status_code)
        data = self._read_body(resp, url)
        try:
            return protocol.decode(data, max_header_bytes=len(data))
        except protocol.RequestError as exc:
            raise RemoteServerError(f"POST {url} answered a malformed message: {exc}", url, resp.status_code) from None

    def _read_body(self, resp: requests.Response, url: str) -> bytearray:
        """The body into one writable buffer (so the decoded arrays are writable views, no copy)."""
        try:
            length = int(resp.headers.get("Content-Length", "-1"))
            if length > self.max_response_bytes:
                raise RemoteServerError(f"POST {url} answered {length} bytes, above max_response_bytes="
                                        f"{self.max_response_bytes}", url, resp.status_code)
            buf = bytearray()
            for chunk in resp.iter_content(READ_CHUNK_BYTES):
                buf += chunk
                if len(buf) > self.max_response_bytes:
                    raise RemoteServerError(f"POST {url} answered more than max_response_bytes="
                                            f"{self.max_response_bytes}", url, resp.status_code)
        except requests.RequestException as exc:
            raise RemoteServerError(f"POST {url}: the response broke off while reading it: {exc}", url) from None
        finally:
            resp.close()
        if length >= 0 and len(buf) != length:
            raise RemoteServerError(f"POST {url}: the response ended after {len(buf)} of {length} bytes", url)
        return buf

    def _send(self, method: str, path: str, body: Optional[bytes]) -> requests.Response:
        url = self.base_url + path
        what = f"{method} {url}"
        start = time.monotonic()
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                resp = self.session.request(method, url, data=body, headers=self._headers(body is not None),
                                            timeout=self.timeout, stream=True, allow_redirects=False)
            except requests.exceptions.ConnectionError as exc:
                if last:
                    raise RemoteServerError(
                        f"{what} failed: connection failed on {attempt + 1} attempt(s) over "
                        f"{time.monotonic() - start:.1f} s ({_reason(exc)}); is the server running at "
                        f"{self.base_url}? ({START_HINT})", url) from None
                time.sleep(self._delay(attempt, None))
                continue
            except requests.exceptions.Timeout as exc:
                raise RemoteServerError(f"{what} failed: no answer within the read time-out of "
                                        f"{self.timeout[1]:.0f} s ({_reason(exc)})", url) from None
            except requests.RequestException as exc:
                raise RemoteServerError(f"{what} failed: {exc}", url) from None
            if resp.status_code == 503 and not last:
                retry_after = resp.headers.get("Retry-After")
                resp.close()
                time.sleep(self._delay(attempt, retry_after))
                continue
            if resp.status_code != 200:
                raise _status_error(what, url, resp)
            return resp
        raise AssertionError("unreachable")  # the loop returns or raises

    def _delay(self, attempt: int, retry_after: Optional[str]) -> float:
        delay = self.backoff * (2 ** attempt)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        return min(delay, MAX_BACKOFF_S)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "Connection reset"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__


def _status_error(what: str, url: str, resp: requests.Response) -> RemoteServerError:
    raw = b""
    try:
        for chunk in resp.iter_content(4096):
            raw += chunk
            if len(raw) >= MAX_ERROR_BYTES:
                break
    except requests.RequestException:
        pass
    finally:
        resp.close()
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        payload = None
    if isinstance(payload, dict) and "error" in payload:
        message, field = str(payload["error"]), payload.get("field")
    else:
        message, field = raw[:300].decode("utf-8", "replace").strip() or resp.reason, None
    hint = " (set STEPVIDEO_AUTH_TOKEN or pass token= to the client)" if resp.status_code == 401 else ""
    return RemoteServerError(f"{what} failed with HTTP {resp.status_code}: {message}{hint}", url,
                             resp.status_code, field)
