"""Which of MEG's own modules one `meg demo` request runs through, and who calls whom.

Runs the demo (edge, policy service and device client on loopback, one image) under a
profiler that records every call between two functions of `meg` modules while the device's
`generate` call is in flight, in every thread (edge, policy, device), then prints the
modules whose code ran *for the request* (set-up such as server start, model loading and
ONNX export excluded: the demo runs twice and only the second request is traced) and any
pair of modules that call into each other. docs/architecture.md quotes its output.

    python scripts/trace_request.py [--recipe meg|hybrid-sr] [--model tiny-random]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path


def _module(frame) -> str | None:  # type: ignore[no-untyped-def]
    name = frame.f_globals.get("__name__", "")
    return name if name == "meg" or name.startswith("meg.") else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--runtime", default="onnxruntime")
    args = parser.parse_args()

    from meg.demo import DemoConfig, run_demo

    out = Path(tempfile.mkdtemp())
    config = DemoConfig(model=args.model, runtime=args.runtime, out_dir=out, torch_threads=1)
    run_demo(config)  # warm: imports, model load, ONNX export

    edges: dict[tuple[str, str], int] = defaultdict(int)
    ran: set[str] = set()
    window = threading.Event()  # set while DeviceClient.generate runs (the request itself)

    from meg.services.client import DeviceClient

    generate = DeviceClient.generate

    def traced_generate(self, *a, **k):  # type: ignore[no-untyped-def]
        window.set()
        try:
            return generate(self, *a, **k)
        finally:
            window.clear()

    DeviceClient.generate = traced_generate  # type: ignore[method-assign]

    def profile(frame, event, arg):  # type: ignore[no-untyped-def]
        if event != "call" or not window.is_set():
            return
        callee = _module(frame)
        if callee is None:
            return
        ran.add(callee)
        back = frame.f_back
        while back is not None and _module(back) is None:
            back = back.f_back
        caller = _module(back) if back is not None else None
        if caller is not None and caller != callee:
            edges[(caller, callee)] += 1

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        run_demo(config)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    generated = {m for m in ran if m.startswith("meg.v1")}
    own = sorted(ran - generated - {"scripts.trace_request", "__main__"})
    print(f"{len(own)} hand-written modules ran for the request (plus {len(generated)} generated meg.v1 stubs):")
    for name in own:
        print(f"  {name}")
    mutual = sorted({tuple(sorted(pair)) for pair in edges if (pair[1], pair[0]) in edges})
    print(f"pairs of modules calling into each other: {len(mutual)}")
    for a, b in mutual:
        print(f"  {a} <-> {b}  ({edges[(a, b)]} / {edges[(b, a)]} calls)")


if __name__ == "__main__":
    main()
