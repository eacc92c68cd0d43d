"""``meshctl gateway serve|validate``: the ingress gateway (docs/features/gateway.md).

``validate`` checks gateway config files (Gateway, Gateway-parented HTTPRoutes, TLS Secrets, CA
ConfigMaps) and prints every problem as ``file:line``. ``serve`` runs the gateway: its listeners
from the config, its mesh (the outbound leg, and the inbound middleware at the edge) from the
environment as :meth:`meshlib.Mesh.from_env` reads it (``MESHLIB_SERVICE``,
``MESHLIB_NAMESPACE``, ``MESHLIB_POLICY`` or ``MESHLIB_REGISTRY``, ``MESHLIB_SVID_DIR``). Once
every port listens it prints one line per listener port, ``listening: PORT -> URL``, and it
stops gracefully on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from meshlib.cli.command import (
    EXIT_INVALID,
    EXIT_OK,
    CommandFailed,
    Registrar,
    Subparsers,
    UsageError,
    positive_seconds,
    print_problems,
)
from meshlib.errors import ConfigError

if TYPE_CHECKING:
    from meshlib.config.gatewaykind import Gateway, GatewayConfig
    from meshlib.config.model import RateLimitPolicy

__all__ = ["VERBS"]


def _add_gateway(sub: Subparsers) -> None:
    group = sub.add_parser(
        "gateway",
        help="the ingress gateway: serve a Gateway API config, or validate one",
        description="Traffic from outside into the mesh: TLS per host name, edge hygiene, "
        "HTTPRoutes whose parent is the Gateway, calls into the mesh over mTLS with the "
        "gateway's own SVID. See docs/features/gateway.md.",
    )
    verbs = group.add_subparsers(dest="gateway_verb", metavar="VERB", required=True)
    serve = verbs.add_parser(
        "serve",
        help="run the gateway's listeners (the mesh from MESHLIB_* environment variables)",
        description="Serve the Gateway of --config. The gateway's mesh comes from the "
        "environment: MESHLIB_SERVICE (the gateway's own Service), MESHLIB_NAMESPACE, "
        "MESHLIB_POLICY or MESHLIB_REGISTRY, MESHLIB_SVID_DIR. Prints 'listening: PORT -> URL' "
        "per listener port once all listen; SIGTERM or SIGINT stops it gracefully.",
    )
    _add_config(serve)
    serve.add_argument(
        "--listen",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="the address to bind every listener to (default 127.0.0.1; 0.0.0.0 for all)",
    )
    serve.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="LISTENER=PORT",
        help="bind listener LISTENER's port to PORT instead (0: a free port); repeatable",
    )
    serve.add_argument(
        "--gateway",
        metavar="NAME",
        help="which Gateway to serve when the config has several ([NAMESPACE/]NAME)",
    )
    serve.add_argument(
        "--header-timeout",
        type=positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="close a connection whose request head is not complete this long (default 10)",
    )
    serve.add_argument(
        "--body-timeout",
        type=positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="close a connection whose request body pauses this long between two reads "
        "(default 60)",
    )
    serve.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve the gateway mesh's Prometheus metrics on 127.0.0.1:PORT/metrics (0: a "
        "free port), for meshctl graph, which draws the gateway as the entry node",
    )
    serve.add_argument(
        "--rate-limit-per-ip",
        type=_rate,
        metavar="N/s[:BURST]",
        help="requests per client address (the socket peer), e.g. 100/s or 100/s:200 "
        "(also /m, /h; the burst defaults to one second's worth); over it: 429",
    )
    serve.add_argument(
        "--rate-limit-per-subject",
        type=_rate,
        metavar="N/s[:BURST]",
        help="requests per end user: the iss/sub of a JWT the gateway's RequestAuthentication "
        "verified (requests without one are not counted here); over it: 429",
    )
    serve.set_defaults(func=_cmd_serve)
    validate = verbs.add_parser(
        "validate",
        help="check gateway config files; print every problem as file:line",
        description="Check Gateway, HTTPRoute, Secret and ConfigMap documents of a gateway "
        "config; exit status 1 and every problem (file:line, field) on standard error when "
        "it is invalid.",
    )
    _add_config(validate)
    validate.set_defaults(func=_cmd_validate)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0..65535)")
    return int(text)


def _rate(text: str) -> RateLimitPolicy:
    from meshlib.gateway.ratelimit import parse_rate

    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="FILE",
        help="a gateway config file (YAML, several documents); repeatable",
    )


def _load(names: Sequence[str]) -> GatewayConfig:
    """The config of ``names``, each file read as a policy file is (its size checked before it
    is read, its bytes UTF-8); every problem printed on stderr, then ConfigError raised."""
    from meshlib.config.gatewaykind import load_gateway_config
    from meshlib.config.loader import read_policy_files

    try:
        return load_gateway_config(read_policy_files(names))
    except ConfigError as exc:
        print_problems(exc)
        raise


def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config)
    except ConfigError:
        return EXIT_INVALID
    gateways = ", ".join(f"{g.namespace}/{g.name}" for g in config.gateways) or "no Gateway"
    print(
        f"{', '.join(args.config)}: ok ({gateways}; {len(config.http_routes)} HTTPRoutes, "
        f"{len(config.secrets)} TLS Secrets, {len(config.configmaps)} CA ConfigMaps)"
    )
    return EXIT_OK


def _pick(config: GatewayConfig, wanted: str | None) -> Gateway:
    if wanted is None:
        if len(config.gateways) != 1:
            names = ", ".join(f"{g.namespace}/{g.name}" for g in config.gateways) or "none"
            raise UsageError(f"the config must hold one Gateway or name it with --gateway: {names}")
        return config.gateways[0]
    namespace, _, name = wanted.rpartition("/")
    for gateway in config.gateways:
        if gateway.name == name and (not namespace or gateway.namespace == namespace):
            return gateway
    raise UsageError(f"no Gateway {wanted!r} in the config")


def _ports(gateway: Gateway, items: Sequence[str]) -> dict[int, int]:
    """``--port LISTENER=PORT`` → {listener port: port to bind}; listeners sharing a port
    must not be sent to different ones."""
    out: dict[int, int] = {}
    for item in items:
        name, sep, text = item.partition("=")
        listener = gateway.listener(name)
        if not sep or not text.isdigit() or int(text) > 65535:
            raise UsageError(f"--port {item!r}: expected LISTENER=PORT (0..65535)")
        if listener is None:
            names = ", ".join(item.name for item in gateway.listeners)
            raise UsageError(f"--port {item!r}: no listener {name!r}; the listeners: {names}")
        port = int(text)
        if out.get(listener.port, port) != port:
            raise UsageError(
                f"--port {item!r}: listener {name!r} shares port {listener.port} with another "
                f"listener given port {out[listener.port]}"
            )
        out[listener.port] = port
    return out


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from meshlib.gateway.app import GatewayApp
    from meshlib.gateway.serve import EdgeTimeouts, GatewayServer
    from meshlib.gateway.tls import GatewayTLSError, listener_contexts
    from meshlib.mesh import Mesh
    from meshlib.observe.exporter import metrics_app

    try:
        config = _load(args.config)
    except ConfigError:
        return EXIT_INVALID
    gateway = _pick(config, args.gateway)
    ports = _ports(gateway, args.port)
    try:
        contexts = listener_contexts(gateway, config)
    except GatewayTLSError as exc:
        raise CommandFailed(str(exc)) from None
    try:
        mesh = Mesh.from_env()
    except (ValueError, ConfigError, OSError) as exc:
        raise CommandFailed(f"the gateway's mesh: {exc}") from None

    def started(server: GatewayServer) -> None:
        for port, bound in sorted(server.bound.items()):
            host = f"[{server.host}]" if ":" in server.host else server.host
            print(f"listening: {port} -> {server.scheme(port)}://{host}:{bound}", flush=True)
        if server.metrics_bound is not None:
            print(f"metrics: http://127.0.0.1:{server.metrics_bound}/metrics", flush=True)

    async def main() -> None:
        transport = mesh.async_transport()
        try:
            app = GatewayApp(
                gateway,
                config,
                mesh=mesh,
                transport=transport,
                rate_limit_per_ip=args.rate_limit_per_ip,
                rate_limit_per_subject=args.rate_limit_per_subject,
            )
            server = GatewayServer(
                app,
                mesh,
                contexts=contexts,
                host=args.listen,
                ports=ports,
                metrics=None if args.metrics_port is None else metrics_app(),
                metrics_port=args.metrics_port or 0,
                timeouts=EdgeTimeouts(
                    header_timeout=args.header_timeout, body_timeout=args.body_timeout
                ),
            )
            await server.run(on_started=started)
        finally:
            await transport.aclose()

    try:
        asyncio.run(main())
    except OSError as exc:
        raise CommandFailed(str(exc)) from None
    finally:
        mesh.close()
    return EXIT_OK


VERBS: tuple[Registrar, ...] = (_add_gateway,)
