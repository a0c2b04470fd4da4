"""`kvroute proxy --config FILE [--host H] [--port P] [--profile NAME] [--workers N]`: serve
until SIGTERM. With `--workers N` > 1 this process supervises N worker processes sharing one
listening socket (router/proxy/workers.py)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys

import uvloop

from router.config import ConfigError, load_config
from router.log_setup import apply_logging
from router.proxy.app import ProxyApp, serve
from router.proxy.workers import (
    Supervisor,
    WorkerHeader,
    bind_listener,
    die_with_supervisor,
    listener_from_fd,
)
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
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="proxy processes serving the port (default 1), restarted if one dies. They share "
        "routing state only through the config's shared_state: section; without it each "
        "worker routes on its own state (prefix index, in-flight counts) and cache affinity "
        "drops as N grows",
    )
    p.add_argument(
        "--log-level", default=None, help="debug, info, ... (default: the config's logging.level)"
    )
    # Set by the supervisor for its workers: serve the inherited listening socket FD.
    p.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _worker_argv(args: argparse.Namespace, host: str, port: int) -> list[str]:
    """The argv (after the program name) each worker runs: this command minus --workers."""
    argv = ["proxy", "--config", os.path.abspath(args.config), "--host", host]
    argv += ["--port", str(port)]
    if args.log_level is not None:
        argv += ["--log-level", args.log_level]
    if args.profile is not None:
        argv += ["--profile", args.profile]
    if args.chat_template is not None:
        argv += ["--chat-template", os.path.abspath(args.chat_template)]
    return argv


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"kvroute proxy: {e}", file=sys.stderr)
        return 2
    try:
        # A worker's lines say which worker wrote them (each logs its own state changes).
        tag = f"worker pid {os.getpid()}" if args.listen_fd is not None else None
        apply_logging(config.logging, args.log_level, tag=tag)
    except ValueError as e:
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
    if args.workers < 1:
        print(f"kvroute proxy: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2
    if args.workers > 1 and args.listen_fd is None:
        return _supervise(args, config, settings.host, settings.port)
    template = (
        ChatTemplate.from_tokenizer_config(args.chat_template) if args.chat_template else None
    )
    try:
        app = ProxyApp(
            config, settings, chat_template=template, config_path=args.config, freeze_heap=True
        )
    except ValueError as e:  # e.g. tracing on without the OpenTelemetry packages
        print(f"kvroute proxy: {e}", file=sys.stderr)
        return 2
    if app.reloader is not None:
        app.reloader.log_level_override = args.log_level  # the command line wins
    if args.listen_fd is None:
        uvloop.run(serve(app, settings.host, settings.port, settings.access_log))
    else:
        die_with_supervisor()
        sock = listener_from_fd(args.listen_fd)
        asgi = WorkerHeader(app)
        uvloop.run(serve(asgi, settings.host, settings.port, settings.access_log, sockets=[sock]))
    return 0


def _supervise(args: argparse.Namespace, config: object, host: str, port: int) -> int:
    log = logging.getLogger("kvroute.proxy")
    try:
        sock = bind_listener(host, port)
    except OSError as e:
        print(f"kvroute proxy: {e.strerror}", file=sys.stderr)
        return 2
    port = int(sock.getsockname()[1])
    if getattr(config, "shared_state", None) is None:
        log.warning(
            "%d workers without a shared_state: section in %s: each worker routes on its own "
            "state (prefix index, in-flight counts), so cache affinity and load balance degrade",
            args.workers,
            args.config,
        )
    log.info("serving on %s:%d with %d workers", host, port, args.workers)
    supervisor = Supervisor(args.workers, sock, _worker_argv(args, host, port))

    def forward_sighup(_sig: int, _frame: object) -> None:
        # The supervisor holds no config of its own: each worker reloads it.
        for w in supervisor.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGHUP, forward_sighup)
    return supervisor.run()
