"""`meg ui`: the preview–refine session in a browser page.

A small HTTP server (standard library, one session per server) in front of a
`meg.session.PreviewSession`: the page has a prompt box, shows each round's preview as it
is rendered, a refine button that sends the last preview to the edge, and the final image
with its report. JSON endpoints (the page uses them; so can scripts):

- ``POST /api/preview`` ``{"prompt": str}`` → ``{"round": n, "png": base64, "preview_ms": float}``
- ``POST /api/final`` ``{"strength": float | null}`` → ``{"refined": bool, "png": base64, "report": {...}}``
- errors: HTTP 400 ``{"error": message, "field": name}``, the session unchanged.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import click

__all__ = ["UiServer", "make_ui_server", "ui"]

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>MEG preview-refine</title>
<style>body{font-family:sans-serif;margin:2em}img{image-rendering:pixelated;width:256px;height:256px;
border:1px solid #ccc;margin:4px}#rounds img{width:128px;height:128px}#error{color:#b00}</style></head>
<body><h1>Preview &amp; refine</h1>
<form id="form"><input id="prompt" size="60" placeholder="a red circle at the top left" autofocus>
<button id="preview" type="submit">Preview</button>
<label>strength <input id="strength" size="4" placeholder="auto"></label>
<button id="refine" type="button">Refine on the edge</button></form>
<p id="error"></p><div id="rounds"></div>
<h2>Latest preview</h2><img id="live" alt="no preview yet">
<h2>Final</h2><p id="state"></p><img id="final" alt="not refined yet"><pre id="report"></pre>
<script>
async function call(path, body) {
  const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await r.json();
  document.getElementById("error").textContent = r.ok ? "" : data.error;
  return r.ok ? data : null;
}
document.getElementById("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const data = await call("/api/preview", {prompt: document.getElementById("prompt").value});
  if (!data) return;
  const src = "data:image/png;base64," + data.png;
  document.getElementById("live").src = src;
  const img = document.createElement("img");
  img.src = src; img.title = "round " + data.round; img.className = "round";
  document.getElementById("rounds").appendChild(img);
});
document.getElementById("refine").addEventListener("click", async () => {
  const s = document.getElementById("strength").value;
  const data = await call("/api/final", {strength: s ? parseFloat(s) : null});
  if (!data) return;
  document.getElementById("final").src = "data:image/png;base64," + data.png;
  document.getElementById("state").textContent = data.refined ? "refined by the edge" : "edge lost: the last preview is the result";
  document.getElementById("report").textContent = JSON.stringify(data.report, null, 1);
});
</script></body></html>
"""


def _png_base64(image: Any) -> str:
    """[1, 3, H, W] in [0, 1] → base64 of an 8-bit PNG."""
    import torch
    from PIL import Image

    pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class UiServer:
    """A running page: ``url``; `close` stops it."""

    httpd: ThreadingHTTPServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def make_ui_server(session: Any, host: str = "127.0.0.1", port: int = 0) -> UiServer:
    """Serve ``session`` (a `PreviewSession`) on ``host:port`` (0: the OS picks) in a thread."""
    from meg.errors import MegError

    lock = threading.Lock()  # one session: its rounds change one request at a time

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            return

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: dict[str, Any]) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path in ("/", "/index.html"):
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            else:
                self._json(404, {"error": f"no page {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            try:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
                with lock:
                    if self.path == "/api/preview":
                        current = session.preview(str(body.get("prompt", "")))
                        self._json(200, {"round": len(session.rounds), "png": _png_base64(current.image),
                                         "preview_ms": current.preview_s * 1000})
                    elif self.path == "/api/final":
                        strength = body.get("strength")
                        result = session.final(strength=None if strength is None else float(strength))
                        self._json(200, {"refined": result.refined, "png": _png_base64(result.image),
                                         "report": result.report.to_dict()})
                    else:
                        self._json(404, {"error": f"no endpoint {self.path}"})
            except MegError as exc:
                self._json(400, {"error": exc.message, "field": exc.field})
            except (ValueError, TypeError) as exc:
                self._json(400, {"error": str(exc), "field": None})

    httpd = ThreadingHTTPServer((host, port), Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="meg-ui", daemon=True)
    thread.start()
    return UiServer(httpd, thread)


@click.command("ui")
@click.option("--edge", "edge_address", default=None, help="Edge address host:port (default: one on loopback).")
@click.option("--model", default="meg-tiny", show_default=True, help="Model family of device (and loopback edge).")
@click.option("--port", type=int, default=8765, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def ui(edge_address: str | None, model: str, port: int, seed: int) -> None:
    """Preview-refine in the browser: prompt box, live preview, refine button, final image and report."""
    import contextlib

    import torch

    import meg.models  # noqa: F401
    from meg.services.client import ClientConfig, DeviceClient
    from meg.session import PreviewSession
    from meg.session_cli import _loopback_edge
    from meg.split.loading import load_pipeline

    torch.set_num_threads(1)
    pipeline = load_pipeline(model)
    edge = contextlib.nullcontext(edge_address) if edge_address else _loopback_edge(model, pipeline)
    with edge as address, DeviceClient([address], ClientConfig(model=model, runtime="eager"), pipeline=pipeline) as client:
        server = make_ui_server(PreviewSession(client, pipeline, model=model, seed=seed), port=port)
        click.echo(f"open {server.url} (Ctrl-C stops)")
        try:
            server.thread.join()
        except KeyboardInterrupt:
            server.close()
