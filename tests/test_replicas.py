"""Several edge replicas behind round_robin: a replica SIGKILLed under load loses no request."""

from __future__ import annotations

import threading
import time
from typing import Any

from meg.recipes.plan import make_plan
from meg.services.background import EdgeProcess
from meg.services.client import ClientConfig, DeviceClient, DeviceRequest

CLIENTS = 32
REQUESTS_EACH = 3


def test_a_replica_killed_under_load_loses_no_request(pipeline: Any) -> None:
    edges = [EdgeProcess(["--model", "tiny-random", "--queue-size", "64", "--torch-threads", "1"], replica_id=f"edge-{k}")
             for k in range(3)]  # fmt: skip
    try:
        for edge in edges:
            edge.wait_ready()
        victim = edges[1]
        plan = make_plan("decoder", steps=4, codec_chain="none")
        config = ClientConfig(runtime="eager", connect_timeout_s=10, retries=2)
        results: list[Any] = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        done = threading.Semaphore(0)

        def device(i: int) -> None:
            with DeviceClient([e.address for e in edges], config, pipeline=pipeline) as client:
                for j in range(REQUESTS_EACH):
                    try:
                        result = client.generate(DeviceRequest(prompt="a red circle", seed=100 * i + j, plan=plan))
                    except BaseException as exc:  # noqa: BLE001 - a lost request fails the test below
                        with lock:
                            errors.append(exc)
                        continue
                    with lock:
                        results.append(result.report)
                    done.release()

        threads = [threading.Thread(target=device, args=(i,)) for i in range(CLIENTS)]
        for th in threads:
            th.start()
        for _ in range(CLIENTS // 2):  # kill while the load is on,
            done.acquire(timeout=120)
        deadline = time.monotonic() + 60
        while victim.metric("meg_requests_in_system") < 1 and time.monotonic() < deadline:
            time.sleep(0.005)  # and while the victim has a request in flight
        victim.kill()
        for th in threads:
            th.join(timeout=300)
    finally:
        for edge in edges:
            edge.stop()
    assert not errors
    assert len(results) == CLIENTS * REQUESTS_EACH  # nothing lost
    assert all(not r.fallback.used for r in results)  # each one served by a replica, none by the device alone
    served = {r.served_by for r in results}
    assert served <= {"edge-0", "edge-1", "edge-2"} and {"edge-0", "edge-2"} <= served
    retried = [r for r in results if r.retries]
    assert retried, "the kill caught no request in flight"
    for report in retried:  # the report names the replica that failed (when it had answered at all) and the one that did
        assert all(line.startswith(("edge-1: ", "unknown replica: ")) for line in report.retries), report.retries
        assert report.served_by in {"edge-0", "edge-2"}
    assert any(line.startswith("edge-1: ") for r in retried for line in r.retries)
