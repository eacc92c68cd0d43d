"""Server-side TLS for the gateway's HTTPS listeners: one ``ssl.SSLContext`` per listening port,
whose SNI callback picks the certificate for the name the client asked for, with optional
client-certificate verification (``spec.tls.frontend`` of the Gateway) for partners.

Selection (upstream Listener.hostname semantics, gateway_types.go): a listener whose hostname
equals the SNI name wins; then the most specific wildcard listener (``*.example.com`` is a
suffix match: ``a.example.com`` and ``a.b.example.com``, never ``example.com``; the longer the
suffix the more specific); then a listener without hostname (the port's default). With none of
these the handshake is refused with the ``unrecognized_name`` alert: a gateway never presents a
certificate for a name it was not configured for. A client that sends no SNI (an IP address)
gets the default or is refused the same way. Inside a listener with several certificateRefs, the
first certificate whose DNS names cover the SNI name is served, else the listener's first.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509

from meshlib.config.gatewaykind import (
    CaBundle,
    Gateway,
    GatewayConfig,
    ListenerProtocol,
    TlsSecret,
)
from meshlib.identity.tls import load_cert_chain_bytes

__all__ = [
    "MINIMUM_VERSION",
    "GatewayTLSError",
    "ServedCertificate",
    "SniContext",
    "hostname_matches",
    "listener_contexts",
    "select_certificate",
]

#: TLS 1.0 and 1.1 are deprecated (RFC 8996); 1.2 is the floor for every listener.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class GatewayTLSError(ValueError):
    """A certificate, key or CA bundle could not be loaded into a TLS context."""


@dataclass(frozen=True)
class ServedCertificate:
    """A certificate a port may present: ``hostname`` is its listener's (None: the default)."""

    hostname: str | None
    cert_pem: bytes
    key_pem: bytes = field(repr=False)  # never in reprs, logs or exceptions
    listener: str = ""

    def dns_names(self) -> frozenset[str]:
        cert = x509.load_pem_x509_certificates(self.cert_pem)[0]
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return frozenset()
        return frozenset(n.lower() for n in san.get_values_for_type(x509.DNSName))


def hostname_matches(pattern: str, name: str) -> bool:
    """Whether a listener hostname ``pattern`` covers ``name`` (both lower case): equal, or
    ``*.suffix`` and ``name`` ends with ``.suffix`` (one label or more, upstream's rule)."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return pattern == name


def _cert_covers(dns_name: str, name: str) -> bool:
    """RFC 6125 certificate matching: a wildcard covers exactly one label."""
    if dns_name.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == dns_name[2:]
    return dns_name == name


def select_certificate(
    certificates: Sequence[ServedCertificate],
    server_name: str | None,
    dns_names: Sequence[frozenset[str]] | None = None,
) -> int | None:
    """The index in ``certificates`` to present for ``server_name`` (None: no SNI sent), or
    None to refuse the handshake. Pure: the SNI callback's decision, tested without sockets."""
    names = dns_names if dns_names is not None else [c.dns_names() for c in certificates]
    candidates: list[int] = []
    if server_name is not None:
        name = server_name.lower().rstrip(".")
        exact = [i for i, c in enumerate(certificates) if c.hostname == name]
        if exact:
            candidates = exact
        else:
            wild = [
                (len(c.hostname), i)
                for i, c in enumerate(certificates)
                if c.hostname is not None
                and c.hostname.startswith("*.")
                and hostname_matches(c.hostname, name)
            ]
            if wild:
                longest = max(length for length, _ in wild)
                candidates = [i for length, i in wild if length == longest]
    if not candidates:
        candidates = [i for i, c in enumerate(certificates) if c.hostname is None]
    if not candidates:
        return None
    if server_name is not None:
        name = server_name.lower().rstrip(".")
        for i in candidates:
            if any(_cert_covers(d, name) for d in names[i]):
                return i
    return candidates[0]


def _new_context(client_ca_pem: bytes | None) -> ssl.SSLContext:
    # Not ssl.create_default_context(Purpose.CLIENT_AUTH): it loads the system's CAs as
    # trust anchors for client certificates, so any publicly issued certificate would pass.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])
    if client_ca_pem is not None:
        try:
            ctx.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
        except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
            raise GatewayTLSError(f"TLS refused the client CA bundle: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _load_pair(ctx: ssl.SSLContext, served: ServedCertificate) -> None:
    """The listener's certificate and key into ``ctx``; a refusal names the listener."""
    try:
        load_cert_chain_bytes(ctx, served.cert_pem, served.key_pem)
    except ssl.SSLError as exc:
        raise GatewayTLSError(
            f"TLS refused the certificate of listener {served.listener!r}: {exc.reason or exc}"
        ) from exc


class SniContext:
    """The TLS of one listening port: :attr:`context` is what the server wraps sockets with;
    its SNI callback switches each connection to the chosen certificate's context.

    Every per-certificate context carries the same client-certificate settings as the outer
    one, so verification does not depend on which certificate the callback chose (OpenSSL
    keeps the connection's verify mode across the switch and reads the trust store from the
    context switched to).
    """

    def __init__(
        self, certificates: Sequence[ServedCertificate], client_ca_pem: bytes | None = None
    ) -> None:
        if not certificates:
            raise GatewayTLSError("an HTTPS port needs at least one certificate")
        self.certificates = tuple(certificates)
        self.client_ca_pem = client_ca_pem
        self._names = [c.dns_names() for c in self.certificates]
        self._contexts: list[ssl.SSLContext] = []
        for served in self.certificates:
            ctx = _new_context(client_ca_pem)
            _load_pair(ctx, served)
            self._contexts.append(ctx)
        # The outer context needs a certificate of its own only for OpenSSL's sake: the
        # callback runs before any certificate is sent and always switches or refuses.
        self.context = _new_context(client_ca_pem)
        _load_pair(self.context, self.certificates[0])
        self.context.sni_callback = self._on_sni

    def select(self, server_name: str | None) -> int | None:
        return select_certificate(self.certificates, server_name, self._names)

    def _on_sni(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        chosen = self.select(server_name)
        if chosen is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        connection.context = self._contexts[chosen]
        return None


def listener_contexts(gateway: Gateway, config: GatewayConfig) -> dict[int, SniContext]:
    """One :class:`SniContext` per port of ``gateway``'s HTTPS listeners, from the Secrets and
    CA ConfigMaps of ``config`` (already checked by the loader)."""
    return _contexts(gateway, config.secrets, config.configmaps)


def _contexts(
    gateway: Gateway,
    secrets: Mapping[tuple[str, str], TlsSecret],
    configmaps: Mapping[tuple[str, str], CaBundle],
) -> dict[int, SniContext]:
    by_port: dict[int, list[ServedCertificate]] = {}
    for listener in gateway.listeners:
        if listener.protocol is not ListenerProtocol.HTTPS or listener.tls is None:
            continue
        for ref in listener.tls.certificate_refs:
            secret = secrets[ref.key]
            by_port.setdefault(listener.port, []).append(
                ServedCertificate(listener.hostname, secret.cert_pem, secret.key_pem, listener.name)
            )
    out: dict[int, SniContext] = {}
    for port, certificates in by_port.items():
        validation = gateway.validation_for(port)
        ca: bytes | None = None
        if validation is not None:
            ca = b"".join(configmaps[ref.key].ca_pem for ref in validation.ca_refs)
        out[port] = SniContext(certificates, ca)
    return out
