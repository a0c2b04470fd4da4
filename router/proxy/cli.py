"""`kvroute proxy --config FILE [--host H] [--port P] [--profile NAME]`: serve until SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

import uvloop

from router.config import ConfigError, load_config
from router.proxy.app import ProxyApp, serve
from router.request import ChatTemplate


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "proxy",
        help="serve an OpenAI-compatible API that routes each request to the best pod",
        description="Endpoints: /v1/completions, /v1/chat/completions, /v1/models, /health, "
        "/ready, /metrics, /debug/pods. Send 'x-kvroute-debug: 1' to get the decision in the "
        "'x-kvroute-decision' response header.",
    )
    p.add_argument("--config", required=True, help="router config YAML")
    p.add_argument("--host", default=None, help="listen address (default: proxy.host)")
    p.add_argument("--port", type=int, default=None, help="listen port (default: proxy.port)")
    p.add_argument("--profile", default=None, help="scheduling profile (default: the config's)")
    p.add_argument(
        "--chat-template",
        default=None,
        help="tokenizer_config.json (or model dir) whose chat template renders chat prompts "
        "(default: the one beside blocks.tokenizer_path, if any)",
    )
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"kvroute proxy: {e}", file=sys.stderr)
        return 2
    settings = config.proxy
    changes = {
        k: v
        for k, v in (("host", args.host), ("port", args.port), ("profile", args.profile))
        if v is not None
    }
    settings = dataclasses.replace(settings, **changes)
    if settings.profile is not None and settings.profile not in {p.name for p in config.profiles}:
        print(f"kvroute proxy: no scheduling profile '{settings.profile}'", file=sys.stderr)
        return 2
    template = (
        ChatTemplate.from_tokenizer_config(args.chat_template) if args.chat_template else None
    )
    app = ProxyApp(config, settings, chat_template=template, config_path=args.config)
    uvloop.run(serve(app, settings.host, settings.port, settings.access_log))
    return 0
