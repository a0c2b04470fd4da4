"""`kvroute serve` exports the shadow policies' series on its metrics registry."""

from __future__ import annotations

from prometheus_client import generate_latest

from envoy_extproc.server import PickerServer
from router.config import parse_config
from router.request import RoutingRequest

CONFIG = """\
pods:
  - {endpoint: '127.0.0.1:8001', models: [m]}
  - {endpoint: '127.0.0.1:8002', models: [m]}
shadow_policies: [round-robin, llm-d-default]
"""


def test_serve_registry_exports_the_shadow_series() -> None:
    server = PickerServer(parse_config(CONFIG))
    assert server.scheduler.shadows is not None
    for turn in range(3):
        d = server.scheduler.schedule(RoutingRequest(model="m", prompt="hello " * 40 * (turn + 1)))
        server.scheduler.on_pick(d)
    text = generate_latest(server.metrics.registry).decode()
    assert 'kvroute_shadow_requests_total{policy="round-robin"} 3.0' in text
    assert 'kvroute_shadow_requests_total{policy="llm-d-default"} 3.0' in text
    assert "kvroute_shadow_prefix_tokens_captured_total" in text
    assert "kvroute_shadow_pick_agreement_total" in text
