"""The proxy exports the prompt's tokenize + key time as `kvroute_tokenize_duration_seconds`."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def _tokenize_samples(text: str) -> dict[str, float]:
    for fam in text_string_to_metric_families(text):
        if fam.name == "kvroute_tokenize_duration_seconds":
            return {s.name: s.value for s in fam.samples if not s.labels.get("le")}
    raise AssertionError("kvroute_tokenize_duration_seconds not exported")


async def test_tokenize_time_is_its_own_histogram(pods, proxy):
    body = {"model": "m", "messages": [{"role": "user", "content": "count me " * 200}]}
    async with proxy(pods) as (_app, client):
        before = _tokenize_samples((await client.get("/metrics")).text)
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        after = _tokenize_samples((await client.get("/metrics")).text)
    count = "kvroute_tokenize_duration_seconds_count"
    assert after[count] - before[count] == 3
    assert after["kvroute_tokenize_duration_seconds_sum"] > 0
