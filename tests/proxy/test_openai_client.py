"""A real OpenAI client works against the proxy unchanged, streaming and not."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture
async def oai(pods, proxy):
    async with (
        proxy(pods) as (_app, client),
        openai.AsyncOpenAI(
            base_url=str(client.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0
        ) as oai_client,
    ):
        yield oai_client


async def test_openai_chat_non_streaming(oai):
    r = await oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert r.choices[0].message.content == "tok tok tok "
    assert r.usage.completion_tokens == 3


async def test_openai_chat_streaming_with_usage(oai):
    stream = await oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "tok tok tok " and usage.completion_tokens == 3


async def test_openai_completions_and_models(oai):
    r = await oai.completions.create(model="m", prompt="hello", max_tokens=2)
    assert r.choices[0].text == "tok tok "
    stream = await oai.completions.create(model="m", prompt="hello", max_tokens=2, stream=True)
    assert [c.choices[0].text async for c in stream] == ["tok ", "tok "]
    assert [m.id async for m in oai.models.list()] == ["m"]


async def test_openai_client_sees_errors_as_its_own_exceptions(oai):
    with pytest.raises(openai.NotFoundError):
        await oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(model="m", messages=[])
