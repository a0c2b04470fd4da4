"""The picker exports the prompt's tokenize + key time as `kvroute_tokenize_duration_seconds`."""

from __future__ import annotations

import json

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from extproc_client import MODEL, ExtProcHarness, body_msg, headers_msg, post_headers

from router.blocks import BUNDLED_TOKENIZER


async def test_tokenize_time_is_its_own_histogram_in_token_mode() -> None:
    config = ExtProcHarness.config_text + (
        f"blocks: {{mode: tokens, tokenizer_path: '{BUNDLED_TOKENIZER}'}}\n"
    )
    async with ExtProcHarness(config_text=config) as h:
        for i in range(2):
            body = json.dumps(
                {"model": MODEL, "messages": [{"role": "user", "content": f"{i} words " * 300}]}
            ).encode()
            call = h.open()
            await call.write(headers_msg(post_headers(), mode=ProcessingMode.FULL_DUPLEX_STREAMED))
            await call.write(body_msg(body, True))
            first = await call.read()
            assert first.WhichOneof("response") == "request_headers"
            call.cancel()
        reg = h.metrics.registry
        assert reg.get_sample_value("kvroute_tokenize_duration_seconds_count") == 2
        assert reg.get_sample_value("kvroute_tokenize_duration_seconds_sum") > 0
        scheduling = reg.get_sample_value("kvroute_scheduler_e2e_duration_seconds_count")
        assert scheduling == 2
