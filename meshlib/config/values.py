"""Parsers for the value formats of the policy file: durations, quantities, addresses, service
references, RE2 patterns and inline JSON. Each raises ``ValueError`` with a message fit for a
user, and each bounds its input first, so no input reaches an arithmetic or recursion limit.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from typing import TYPE_CHECKING, Any, cast

from meshlib.config.model import Pattern

if TYPE_CHECKING:
    from decimal import Decimal

    import re2

# decimal and re2 are imported by the parsers that use them, not here: a policy with no
# duration, weight or pattern never loads them, and `Mesh.from_text` of a plain service saves
# their start-up (re2 alone is ~2.6 MB of RSS; docs/performance.md, "Start-up and memory").

#: Longest regular expression accepted (Istio's limit); longer ones are rejected at load.
MAX_REGEX_LENGTH = 1024
#: Default bounds for durations: Istio requires at least 1 ms, and anything past a day is a typo.
MIN_DURATION = 0.001
MAX_DURATION = 86400.0
#: Digits in one number of a duration or a quantity. Far more than any real value needs, and few
#: enough that the decimal arithmetic below is exact (a 400-digit number used to overflow it).
MAX_NUMBER_DIGITS = 18
#: Nesting of inline JSON (a JWKS is 3 levels deep). CPython's decoder recurses once per level,
#: so the depth is checked before decoding, by a scan that does not recurse.
MAX_JSON_DEPTH = 32
#: Longest value quoted back in a message: a 400-digit number is named, not printed in full.
MAX_SHOWN = 40

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
#: Milliseconds per duration unit.
_DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*\.?$"
)
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|k)?$")
_JSON_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]')


@functools.cache
def _re2_options() -> re2.Options:
    import re2

    options = re2.Options()
    options.log_errors = False  # rejected patterns are reported as Problems, not on stderr
    return options


def shown(value: object) -> str:
    """``repr(value)`` for a message, cut to :data:`MAX_SHOWN` characters with its length."""
    return clipped(repr(value))


def clipped(text: str) -> str:
    """``text`` for a message, cut to :data:`MAX_SHOWN` characters with its length."""
    if len(text) <= MAX_SHOWN:
        return text
    return f"{text[: MAX_SHOWN - 10]}… ({len(text)} characters)"


def _decimal(digits: str, what: str) -> Decimal:
    """A decimal literal (``12`` or ``1.5``) of at most :data:`MAX_NUMBER_DIGITS` digits."""
    count = len(digits) - ("." in digits)
    if count > MAX_NUMBER_DIGITS:
        raise ValueError(
            f"{what}: a number of {count} digits, at most {MAX_NUMBER_DIGITS} are allowed"
        )
    from decimal import Decimal

    return Decimal(digits)


def parse_duration(text: str) -> float:
    """``"250ms"``, ``"1.5s"``, ``"1m30s"``, ``"2h"`` → float seconds.

    Precision is one millisecond; negative values, other units and bare numbers are rejected.
    Bounds (such as "at least 1 ms") are the caller's: they depend on the field.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a duration string such as '2s', got {shown(text)}")
    s = text.strip()
    if s.startswith("-"):
        raise ValueError(f"negative duration {shown(text)} is not allowed")
    if s == "0":
        return 0.0
    from decimal import Decimal, localcontext

    pos = 0
    total = Decimal(0)
    # Each part is at most 18 digits times 3,600,000 (the sum is in milliseconds); 60 digits of
    # precision keep the sum of every part an 8 MiB file can hold exact, so the checks below
    # never meet a rounded value.
    with localcontext() as exact:
        exact.prec = 60
        for m in _DURATION_PART.finditer(s):
            if m.start() != pos:
                break
            number = _decimal(m.group(1), f"duration {shown(text)}")
            total += number * _DURATION_UNITS_MS[m.group(2)]
            pos = m.end()
        if pos != len(s) or not s:
            raise ValueError(
                f"invalid duration {shown(text)}: use a number with a unit ms, s, m or h, "
                "such as '250ms', '2s', '1m30s'"
            )
        if total != total.to_integral_value():  # total is in milliseconds
            raise ValueError(f"duration {shown(text)} is finer than the 1ms precision")
        seconds = total / 1000
    return float(seconds)


_BARE_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def parse_seconds_or_duration(text: str) -> float:
    """A bare number of seconds (``"20"``, ``"1.5"``) or a :func:`parse_duration` duration
    (``"20s"``, ``"15m"``, ``"1m30s"``) → float seconds: for query parameters and command-line
    flags, where bare seconds are the custom (Consul's ``?wait=``). ValueError otherwise."""
    s = text.strip()
    if _BARE_SECONDS.fullmatch(s):
        return float(s)
    return parse_duration(s)


def check_duration_range(
    seconds: float, *, minimum: float = MIN_DURATION, maximum: float = MAX_DURATION
) -> None:
    if seconds < minimum:
        raise ValueError(f"must be at least {format_duration(minimum)}")
    if seconds > maximum:
        raise ValueError(f"must be at most {format_duration(maximum)}")


def format_duration(seconds: float) -> str:
    """Inverse of :func:`parse_duration` for messages and ``explain``: 0.25 → ``"250ms"``."""
    ms = round(seconds * 1000)
    if ms % 3_600_000 == 0 and ms:
        return f"{ms // 3_600_000}h"
    if ms % 60_000 == 0 and ms:
        return f"{ms // 60_000}m"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


def parse_quantity_milli(value: object) -> int:
    """A Kubernetes quantity as SMI v1alpha1 weights use it (``500m``, ``1``) → milli-units."""
    if isinstance(value, bool):
        raise ValueError("a weight must be a quantity such as '500m' or 1, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a weight must not be negative")
        return value * 1000
    if isinstance(value, float):
        value = repr(value)
    if not isinstance(value, str):
        raise ValueError(f"a weight must be a quantity such as '500m' or 1, got {shown(value)}")
    if value.strip().startswith("-"):
        raise ValueError(f"a weight must not be negative, got {shown(value)}")
    m = _QUANTITY.match(value.strip())
    if m is None:
        raise ValueError(
            f"invalid quantity {shown(value)}: use a number like '1' or milli-units '500m'"
        )
    from decimal import localcontext

    number = _decimal(m.group(1), f"quantity {shown(value)}")
    scale = {"m": 1, None: 1000, "k": 1_000_000}[m.group(2)]
    with localcontext() as exact:  # 18 digits times 10**6 fit: the product is exact
        exact.prec = 40
        milli = number * scale
        if milli != milli.to_integral_value():
            raise ValueError(f"quantity {shown(value)} is finer than one milli-unit")
    return int(milli)


#: The port a URL's scheme implies, for the example in the message about a URL given as address.
_SCHEME_PORTS = {"http": 80, "https": 443}


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` → (host, port), validating both.

    The likely mistakes each get a message saying what to write instead: a URL (scheme, path),
    no port, an IPv6 host without brackets, more than one port.
    """
    scheme, sep, rest = address.partition("://")
    if sep:
        authority = rest.split("/", 1)[0]
        port = _SCHEME_PORTS.get(scheme.lower())
        if not _has_port(authority) and port is not None:
            authority = f"{authority}:{port}"
        raise ValueError(
            f"address {shown(address)}: drop the scheme: write host:port, like {shown(authority)}"
        )
    if "/" in address:
        host_port, _, path = address.partition("/")
        raise ValueError(
            f"address {shown(address)}: an endpoint address has no path ({shown('/' + path)}):"
            f" write host:port, like {shown(host_port)}"
        )
    if not address:
        raise ValueError("address is empty: write host:port, like 'localhost:9080'")
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise ValueError(
            f"address {shown(address)} has no port: write host:port, like {shown(address + ':80')}"
        )
    if not host:
        raise ValueError(f"address {shown(address)} has no host: write host:port")
    if ":" in host and not host.startswith("["):
        # "::1:80" (the port after the last ':' is the likely intent), "::1", "h:80:90"
        if _is_ipv6(host) and port_text.isascii() and port_text.isdigit():
            like = f"[{host}]:{port_text}"
        elif _is_ipv6(address):
            like = f"[{address}]:80"
        else:
            raise ValueError(
                f"address {shown(address)} has more than one ':': write host:port, one port"
            )
        raise ValueError(
            f"address {shown(address)}: write IPv6 hosts in brackets, like {shown(like)}"
        )
    if not port_text:
        raise ValueError(f"address {shown(address)} has no port after ':': write host:port")
    digits = port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
    port = int(port_text) if digits else 0
    if not 1 <= port <= 65535:
        raise ValueError(f"address {shown(address)} has port {shown(port_text)}, expected 1..65535")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"address {shown(address)}: unclosed '[' around an IPv6 host")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(
                f"address {shown(address)}: {shown(host[1:-1])} is not an IPv6 address"
            ) from None
        return host[1:-1], port
    if not _HOSTNAME.match(host):
        raise ValueError(
            f"address {shown(address)}: {shown(host)} is not a valid host name or IP address"
        )
    return host, port


def _has_port(authority: str) -> bool:
    """Whether a URL's authority (``host``, ``host:port``, ``[v6]:port``) names a port."""
    port = authority.rpartition(":")[2]
    return ":" in authority and port.isascii() and port.isdigit() and not authority.endswith("]")


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def service_key(ref: str, namespace: str) -> str:
    """A service reference relative to ``namespace`` → the canonical key ``name.namespace``.

    ``reviews`` is ``reviews.<namespace>``; ``reviews.shop`` names namespace ``shop``;
    the Kubernetes forms ``reviews.shop.svc`` and ``reviews.shop.svc.cluster.local`` also work.
    """
    parts = ref.split(".")
    if len(parts) == 1:
        parts.append(namespace)
    elif len(parts) > 2 and parts[2] != "svc":
        raise ValueError(
            f"service reference {shown(ref)} must be 'name', 'name.namespace' or "
            "'name.namespace.svc[.domain]'"
        )
    name, ns = parts[0], parts[1]
    for label in (name, ns):
        if not _DNS_LABEL.match(label) or len(label) > 63:
            raise ValueError(
                f"service reference {shown(ref)}: {shown(label)} is not a lower-case DNS label "
                "(a-z, 0-9 and '-')"
            )
    return f"{name}.{ns}"


def compile_regex(pattern: str, *, anchored: bool = False) -> Pattern:
    """Compile with RE2 (linear time); backreferences and lookaround cannot compile."""
    if len(pattern) > MAX_REGEX_LENGTH:
        raise ValueError(
            f"regular expression is {len(pattern)} characters long, at most "
            f"{MAX_REGEX_LENGTH} are allowed"
        )
    source = f"^(?:{pattern})" if anchored else pattern
    import re2

    try:
        compiled = cast(Pattern, re2.compile(source, _re2_options()))
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(
            f"regular expression {shown(pattern)} is not supported by RE2 ({reason}); "
            "backreferences and lookaround are not allowed"
        ) from None
    return compiled


def parse_json(text: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for inline JSON in a policy, nesting checked first (no RecursionError)."""
    depth = 0
    # Strings are skipped whole, so brackets inside them are not counted; an unterminated
    # string ends the scan and json.loads reports it.
    for m in _JSON_STRING_OR_BRACKET.finditer(text):
        token = m.group()
        if token in ("[", "{"):
            depth += 1
            if depth > max_depth:
                raise ValueError(f"JSON nested deeper than {max_depth} levels")
        elif token in ("]", "}"):
            depth -= 1
    return json.loads(text)
