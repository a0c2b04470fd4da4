"""A router config that disagrees with the real pods: one warning naming both values.

The pods run `--block-size 32`; the router is told 16. vLLM reports 32 in its KV events
(`BlockStored.block_size`) and on `/metrics` (`vllm:cache_config_info`); both pods and every
batch show it, and the router says so once. Likewise a router tokenizer that is not the
pods': their events carry token ids beyond its vocabulary.
"""

from __future__ import annotations

import logging

import httpx

from router.config import parse_config
from router.proxy.app import ProxyApp, RunningServer
from tests.real_vllm.conftest import EVENTS, PLUGINS, SETTINGS, join_feeds, unique_text, wait_for
from tests.real_vllm.vllm_pods import BLOCK_SIZE, MODEL_NAME, VllmFleet


async def test_a_wrong_block_size_in_the_config_is_one_warning_naming_both(
    vllm_fleet: VllmFleet, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="router.feeds")
    text = vllm_fleet.router_config(PLUGINS, EVENTS)
    assert f"block_size: {BLOCK_SIZE}" in text
    config = parse_config(text.replace(f"block_size: {BLOCK_SIZE}", "block_size: 16"), "<test>")
    app = ProxyApp(config, SETTINGS)
    async with RunningServer(app) as server, httpx.AsyncClient(timeout=120) as client:
        await join_feeds(app, vllm_fleet)
        await wait_for(lambda: app.feeds.config_warnings, 15, "the block size warning")
        for _ in range(2):  # more batches from both pods: no second warning
            body = {"model": MODEL_NAME, "prompt": unique_text(60), "max_tokens": 1}
            r = await client.post(f"{server.url}/v1/completions", json=body)
            assert r.status_code == 200, r.text
        await join_feeds(app, vllm_fleet)
        await wait_for(lambda: not app.feeds.subscriber.ingester.stored_samples, 5, "a check")
    lines = [r.getMessage() for r in caplog.records if "block_size" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "blocks.block_size is 16" in lines[0] and "reports 32" in lines[0]
    assert app.feeds.config_warnings == [lines[0].removeprefix("config: ")]


async def test_a_tokenizer_other_than_the_pods_is_one_warning_naming_both(
    vllm_fleet: VllmFleet, tmp_path, caplog
) -> None:
    """A router tokenizer of 1,001 tokens in front of pods whose tokenizer has 8,192: the
    engines' event token ids go past its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(1000)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    caplog.set_level(logging.WARNING, logger="router.feeds")
    text = vllm_fleet.router_config(PLUGINS, EVENTS)
    model_tokenizer = str(vllm_fleet.pods[0].model_dir / "tokenizer.json")
    assert model_tokenizer in text
    app = ProxyApp(parse_config(text.replace(model_tokenizer, str(path)), "<test>"), SETTINGS)
    async with RunningServer(app):
        await join_feeds(app, vllm_fleet)
        await wait_for(lambda: app.feeds.config_warnings, 15, "the tokenizer warning")
        await join_feeds(app, vllm_fleet)  # more batches: no second warning
        await wait_for(lambda: not app.feeds.subscriber.ingester.stored_samples, 5, "a check")
    lines = [r.getMessage() for r in caplog.records if "tokenizer" in r.getMessage()]
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and "1001 tokens" in lines[0] and "token id" in lines[0]
    assert app.feeds.config_warnings == [lines[0].removeprefix("config: ")]
