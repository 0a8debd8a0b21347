"""Serve any registered reward over HTTP, and the client reward that calls it.

Why: a reward with dependencies that clash with the training environment (HPSv2 pins ``protobuf<4`` and
``pytest==7.2.0``; ImageReward pins an old transformers) runs from its own virtual environment with only flowrl and
that reward installed, on the same or another machine; training calls it with ``reward=remote
reward.args.url=http://host:port``.

Server (standard library ``ThreadingHTTPServer``, so the reward's environment needs nothing beyond flowrl and the
reward itself)::

    python -m flowrl.reward_server --reward geneval_shapes --port 18085 [--arg key=value ...]

Endpoints: ``GET /health`` → ``{"reward": name}``; ``POST /score`` with an ``.npz`` body (``images`` uint8
``[B, H, W, 3]``, lossless, plus ``request`` = UTF-8 JSON ``{"prompts": [...], "metadata": [...]}`` stored as a uint8
array so that ``allow_pickle=False`` suffices) → ``{"columns": {name: [B floats]}}``; errors → HTTP 4xx/5xx with
``{"error": message}``.
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from flowrl.rewards import check_reward_output, load_reward


def encode_request(images: np.ndarray, prompts: list[str], metadata: list[dict] | None) -> bytes:
    """``.npz`` bytes of a scoring request (images kept bit-exact)."""
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    req = json.dumps({"prompts": list(prompts), "metadata": metadata}).encode()
    buf = io.BytesIO()
    np.savez(buf, images=images, request=np.frombuffer(req, dtype=np.uint8))
    return buf.getvalue()


def decode_request(body: bytes) -> tuple[np.ndarray, list[str], list[dict] | None]:
    """Inverse of :func:`encode_request`. Raises ValueError on a malformed body."""
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as z:
            images, req = z["images"], json.loads(z["request"].tobytes().decode())
    except Exception as e:  # noqa: BLE001 - any parse failure is the client's fault
        raise ValueError(f"malformed scoring request: {e}") from e
    if len(req["prompts"]) != len(images):
        raise ValueError(f"{len(images)} images but {len(req['prompts'])} prompts")
    return images, req["prompts"], req.get("metadata")


def make_server(reward, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server scoring with ``reward`` (one request at a time: rewards are rarely thread-safe)."""
    lock = threading.Lock()
    name = getattr(reward, "name", type(reward).__name__)

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                self._send(200, {"reward": name})
            else:
                self._send(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})

        def do_POST(self):  # noqa: N802
            if self.path != "/score":
                self._send(404, {"error": f"unknown path {self.path}; use POST /score"})
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                images, prompts, metadata = decode_request(body)
            except ValueError as e:
                self._send(400, {"error": str(e)})
                return
            try:
                with lock:
                    cols = check_reward_output(reward(images, prompts, metadata), len(images), name)
            except Exception as e:  # noqa: BLE001 - reported to the client, the server keeps serving
                self._send(500, {"error": f"{type(e).__name__}: {e}"})
                return
            self._send(200, {"columns": {k: v.astype(float).tolist() for k, v in cols.items()}})

        def log_message(self, fmt, *args):  # quiet
            pass

    return ThreadingHTTPServer((host, port), Handler)


class RemoteReward:
    """Client reward: sends batches to a :mod:`flowrl.reward_server` and returns its columns (``reward=remote``).

    Args:
        url: server address, e.g. ``http://127.0.0.1:18085``.
        timeout: seconds per HTTP request.
        retries: extra attempts after a failed request (connection refused/reset, timeout, HTTP 5xx), with
            exponential backoff ``backoff · 2^k`` seconds.
        batch_size: images per request (a large batch is split).

    Raises (from ``__call__``):
        ConnectionError: the server is unreachable or keeps failing after all retries (the message says how to start
            it); HTTP 4xx (a bad request) is not retried.
    """

    name = "remote"

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0,
                 batch_size: int = 64):
        if retries < 0 or timeout <= 0 or batch_size < 1:
            raise ValueError("remote reward: need retries ≥ 0, timeout > 0, batch_size ≥ 1")
        self.url, self.timeout, self.retries, self.backoff, self.batch_size = url.rstrip("/"), timeout, retries, backoff, batch_size

    def _post(self, body: bytes) -> dict[str, Any]:
        import requests

        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = requests.post(f"{self.url}/score", data=body, timeout=self.timeout,
                                  headers={"Content-Type": "application/octet-stream"})
            except (requests.ConnectionError, requests.Timeout) as e:
                last = e
                continue
            if r.status_code >= 500:
                last = RuntimeError(f"HTTP {r.status_code}: {r.text[:500]}")
                continue
            if r.status_code >= 400:
                raise ValueError(f"reward server {self.url} rejected the request: {r.text[:500]}")
            return r.json()["columns"]
        raise ConnectionError(
            f"reward server {self.url} failed {self.retries + 1} times (last error: {last}). Is it running? Start it "
            f"with `python -m flowrl.reward_server --reward <name> --port <port>` in the reward's environment.")

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None) -> dict[str, np.ndarray]:
        parts: list[dict[str, Any]] = []
        for i in range(0, len(images), self.batch_size):
            md = None if metadata is None else list(metadata[i : i + self.batch_size])
            parts.append(self._post(encode_request(images[i : i + self.batch_size], prompts[i : i + self.batch_size], md)))
        return {k: np.concatenate([np.asarray(p[k], dtype=np.float32) for p in parts]) for k in parts[0]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward", required=True, help="registered reward name (entry point group flowrl.rewards)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18085)
    p.add_argument("--arg", action="append", default=[], metavar="KEY=JSON",
                   help="constructor argument, value parsed as JSON if possible (repeatable)")
    a = p.parse_args(argv)
    kwargs = {}
    for item in a.arg:
        k, _, v = item.partition("=")
        try:
            kwargs[k] = json.loads(v)
        except json.JSONDecodeError:
            kwargs[k] = v
    server = make_server(load_reward(a.reward, **kwargs), a.host, a.port)
    print(f"serving reward {a.reward!r} on http://{a.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
