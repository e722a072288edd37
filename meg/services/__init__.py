"""Edge server, device client and policy service over gRPC.

The public surface, re-exported lazily (importing `meg.services` stays cheap)::

    edge = start_edge(EdgeConfig(port=0))               # or: await create_edge_server(config)
    with DeviceClient(edge.address, ClientConfig()) as device:
        result = device.generate(DeviceRequest(prompt="a red cube"), reference=True)
    result.image, result.report                         # [1, 3, H, W] in [0, 1], GenerationReport
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ClientConfig",
    "DeviceClient",
    "DeviceRequest",
    "EdgeConfig",
    "EdgeServer",
    "GenerationResult",
    "PolicyServer",
    "PolicyServerConfig",
    "RunningServer",
    "ServiceLimits",
    "ServiceLoop",
    "TlsConfig",
    "create_edge_server",
    "create_policy_server",
    "save_png",
    "serve_edge",
    "serve_policy",
    "start_edge",
    "start_policy",
]

_WHERE = {
    "ClientConfig": "client",
    "DeviceClient": "client",
    "DeviceRequest": "client",
    "GenerationResult": "client",
    "save_png": "client",
    "EdgeConfig": "edge",
    "EdgeServer": "edge",
    "create_edge_server": "edge",
    "serve_edge": "edge",
    "PolicyServer": "policy_server",
    "PolicyServerConfig": "policy_server",
    "create_policy_server": "policy_server",
    "serve_policy": "policy_server",
    "RunningServer": "background",
    "ServiceLoop": "background",
    "start_edge": "background",
    "start_policy": "background",
    "ServiceLimits": "limits",
    "TlsConfig": "security",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"meg.services.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'meg.services' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
