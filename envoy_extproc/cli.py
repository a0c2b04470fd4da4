"""`kvroute serve`: run the Envoy ext_proc endpoint picker until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path

from envoy_extproc.server import PickerServer
from envoy_extproc.settings import GRPC_PORT, HEALTH_PORT, METRICS_PORT, ExtProcSettings
from router.config import ConfigError, load_config
from router.discovery.kubernetes import KubernetesDiscoverySettings
from router.log_setup import apply_logging


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the Envoy ext_proc endpoint picker (gRPC), with health and metrics",
        description="Serves until SIGTERM; then turns not-ready and keeps serving for "
        "--lame-duck seconds, then refuses new streams and lets open ones finish within "
        "--grace-period.",
    )
    p.add_argument("--config", type=Path, required=True, help="router config YAML")
    p.add_argument("--host", default=None, help="address to bind (default 0.0.0.0)")
    p.add_argument("--grpc-port", type=int, default=None, help=f"ext_proc port ({GRPC_PORT})")
    p.add_argument("--health-port", type=int, default=None, help=f"gRPC health ({HEALTH_PORT})")
    p.add_argument("--metrics-port", type=int, default=None, help=f"Prometheus ({METRICS_PORT})")
    p.add_argument(
        "--lame-duck", type=float, default=None, help="seconds not-ready but serving (10)"
    )
    p.add_argument(
        "--grace-period", type=float, default=None, help="seconds to drain open streams (600)"
    )
    k8s = p.add_argument_group(
        "Kubernetes discovery (instead of the config's pods:)",
        "pods come from the API server: with --pool-name, the selector and every target "
        "port of that GAIE InferencePool (inference.networking.k8s.io/v1), followed as it "
        "changes; without the CRD, --pool-selector and --pool-target-port",
    )
    k8s.add_argument("--pool-name", default=None, help="InferencePool to serve, as GAIE's EPP")
    k8s.add_argument("--pool-namespace", default="default", help="namespace of pool and pods")
    k8s.add_argument("--pool-selector", default=None, help="label selector, e.g. app=vllm")
    k8s.add_argument("--pool-target-port", type=int, default=None, help="model server port (8000)")
    k8s.add_argument("--kv-events-port", type=int, default=None, help="pods' KV-event PUB port")
    p.add_argument(
        "--served-model",
        action="append",
        default=[],
        metavar="NAME",
        help="a model the pool serves, kept as a metric label value (repeatable); models "
        "no pod lists and not named here are counted as 'other'",
    )
    p.add_argument(
        "--log-level", default=None, help="debug, info, ... (default: the config's logging.level)"
    )
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace, base: ExtProcSettings) -> ExtProcSettings:
    overrides = {
        "host": args.host,
        "grpc_port": args.grpc_port,
        "health_port": args.health_port,
        "metrics_port": args.metrics_port,
        "lame_duck_s": args.lame_duck,
        "grace_period_s": args.grace_period,
    }
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def kubernetes_from_args(args: argparse.Namespace) -> KubernetesDiscoverySettings | None:
    """Discovery settings from the pool flags; None = the config's `pods:`."""
    if args.pool_name is not None:
        if args.pool_selector is not None or args.pool_target_port is not None:
            raise ValueError(
                "--pool-name reads the selector and ports from the InferencePool; "
                "drop --pool-selector/--pool-target-port (they are for clusters without it)"
            )
        return KubernetesDiscoverySettings(
            namespace=args.pool_namespace,
            pool_name=args.pool_name,
            kv_events_port=args.kv_events_port,
        )
    if args.pool_selector is not None:
        return KubernetesDiscoverySettings(
            namespace=args.pool_namespace,
            label_selector=args.pool_selector,
            target_port=args.pool_target_port or 8000,
            kv_events_port=args.kv_events_port,
        )
    if args.pool_target_port is not None:
        raise ValueError("--pool-target-port needs --pool-selector (or use --pool-name)")
    return None


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        apply_logging(config.logging, args.log_level)
        base = config.extproc
        settings = settings_from_args(args, base)
        kubernetes = kubernetes_from_args(args)
    except (ConfigError, ValueError) as e:
        print(f"kvroute serve: {e}", file=sys.stderr)
        return 2
    try:
        server = PickerServer(
            config,
            settings,
            config_path=args.config,
            kubernetes=kubernetes,
            served_models=args.served_model,
            freeze_heap=True,
        )
    except ValueError as e:  # e.g. tracing on without the OpenTelemetry packages
        print(f"kvroute serve: {e}", file=sys.stderr)
        return 2
    if server.reloader is not None:
        server.reloader.log_level_override = args.log_level  # the command line wins
    try:
        import uvloop  # gRPC aio streams run about twice as fast on it
    except ImportError:
        asyncio.run(server.run_until_signal())
    else:
        uvloop.run(server.run_until_signal())
    return 0
