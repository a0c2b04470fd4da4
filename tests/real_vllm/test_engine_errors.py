"""vLLM's own errors pass through `kvroute proxy` with vLLM's status and body."""

from __future__ import annotations

import httpx

from tests.real_vllm.conftest import unique_text
from tests.real_vllm.vllm_pods import MAX_MODEL_LEN, MODEL_NAME, VllmFleet


async def test_prompt_longer_than_max_model_len_gets_vllms_400_and_body(
    real_proxy, vllm_fleet: VllmFleet
) -> None:
    body = {"model": MODEL_NAME, "prompt": unique_text(MAX_MODEL_LEN, seed=5), "max_tokens": 4}
    async with httpx.AsyncClient(timeout=120) as direct:
        want = await direct.post(f"{vllm_fleet.pods[0].url}/v1/completions", json=body)
    assert want.status_code == 400
    assert want.json()["error"]["type"] == "BadRequestError"
    async with real_proxy() as (_app, client):
        got = await client.post("/v1/completions", json=body)
    assert got.status_code == want.status_code
    assert got.json() == want.json()


async def test_unknown_model_is_404_as_vllm_answers_it(real_proxy, vllm_fleet: VllmFleet) -> None:
    body = {"model": "no-such-model", "prompt": "hello", "max_tokens": 1}
    async with httpx.AsyncClient(timeout=60) as direct:
        want = await direct.post(f"{vllm_fleet.pods[0].url}/v1/completions", json=body)
    assert want.status_code == 404
    async with real_proxy() as (_app, client):
        got = await client.post("/v1/completions", json=body)
    assert got.status_code == want.status_code
    err = got.json()["error"]
    assert "no-such-model" in err["message"]
