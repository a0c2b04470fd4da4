"""Through a real Envoy with a prefill/decode fleet: the decode pod gets `x-prefiller-host-port`.

The picker's P/D decision reaches the decode pod as headers (destination = decode pod,
`x-prefiller-host-port` = prefill pod) for prompts whose uncached part is above the threshold,
and no prefiller header for short prompts, in each body mode. EchoPods stand where the decode
sidecar listens so the headers can be read; test_envoy_pd_sidecar.py runs the real sidecar and
emulated prefill/decode pods end to end.
"""

from __future__ import annotations

import pytest
from envoy_stack import MODES, StackFactory, chat, requires_envoy

from envoy_extproc.messages import DESTINATION_HEADER, PREFILLER_HEADER

pytestmark = requires_envoy

PD_CONFIG = """\
blocks: {mode: chars, chars_per_block: 64}
seed: 7
plugins:
  - type: pd-profile-handler
    parameters: {threshold: 50, decodeProfile: decode, prefillProfile: prefill}
  - type: decode-filter
  - type: prefill-filter
  - type: prefix-cache-scorer
  - type: queue-scorer
  - type: max-score-picker
schedulingProfiles:
  - name: decode
    plugins:
      - {pluginRef: decode-filter}
      - {pluginRef: prefix-cache-scorer, weight: 2}
      - {pluginRef: queue-scorer, weight: 1}
      - {pluginRef: max-score-picker}
  - name: prefill
    plugins:
      - {pluginRef: prefill-filter}
      - {pluginRef: prefix-cache-scorer, weight: 2}
      - {pluginRef: queue-scorer, weight: 1}
      - {pluginRef: max-score-picker}
"""
ROLES = ["prefill", "prefill", "decode", "decode"]


@pytest.mark.parametrize("mode", MODES)
async def test_long_prompt_reaches_decode_pod_with_prefiller_header(
    envoy_stack: StackFactory, mode: str
) -> None:
    async with envoy_stack(mode, n_pods=4, roles=ROLES, config_tail=PD_CONFIG) as s:
        prefill = {p.endpoint for p in s.pods[:2]}
        decode = {p.endpoint for p in s.pods[2:]}
        r = await s.client.post(
            "/v1/chat/completions",
            json=chat("a long document to summarise " * 60),
            headers={PREFILLER_HEADER: "6.6.6.6:6"},
        )
        assert r.status_code == 200, r.text
        got = r.json()
        d = s.decisions[-1]
        assert got["served_by"] == d.target
        assert d.target in decode
        assert got["headers"][DESTINATION_HEADER] == d.target
        assert d.prefill in prefill
        assert got["headers"][PREFILLER_HEADER] == d.prefill
        assert all(not s.pod(ep).received for ep in prefill)


async def test_short_prompt_decodes_locally_without_prefiller_header(
    envoy_stack: StackFactory,
) -> None:
    async with envoy_stack(n_pods=4, roles=ROLES, config_tail=PD_CONFIG) as s:
        r = await s.client.post(
            "/v1/chat/completions", json=chat("hi"), headers={PREFILLER_HEADER: "6.6.6.6:6"}
        )
        assert r.status_code == 200, r.text
        got = r.json()
        assert s.decisions[-1].prefill is None
        assert got["served_by"] in {p.endpoint for p in s.pods[2:]}
        assert PREFILLER_HEADER not in got["headers"]
