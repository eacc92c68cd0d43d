"""``meshctl token create|list|revoke``: the join tokens of a running registry (admin SVID only;
docs/security.md, "Join tokens"), with the connection options of the other registry verbs.

``create`` prints the token alone on standard output, so ``TOKEN=$(meshctl token create ...)``
works, and what it is for on standard error; the registry shows the secret this once and keeps
only its hash. With ``--join`` it prints the join string instead, which carries the registry's
URL and pins its root CA (the SHA-256 of the root's SubjectPublicKeyInfo), so a new host needs
nothing else to trust the registry on first contact.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshlib.cli.command import (
    EXIT_OK,
    CommandFailed,
    Registrar,
    Subparsers,
    UsageError,
    add_output_option,
    print_document,
)
from meshlib.cli.observe import table
from meshlib.cli.registry_client import (
    add_connection_options,
    connect,
    svid_dir_of,
)
from meshlib.control.wire import JOIN_PREFIX

if TYPE_CHECKING:
    from cryptography import x509

__all__ = ["JOIN_PREFIX", "VERBS", "join_string", "pinned_root"]


def _ttl(text: str) -> float:
    """An argparse ``type=``: ``90s``, ``15m``, ``2h`` or plain seconds."""
    from meshlib.config.values import parse_seconds_or_duration

    try:
        return parse_seconds_or_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration like 90s, 15m or 2h"
        ) from None


def _add_token(sub: Subparsers) -> None:
    group = sub.add_parser(
        "token",
        help="one-time join tokens a new workload trades for its first SVID: create, list, revoke",
        description="Manage the registry's join tokens. Each is bound to one workload SPIFFE ID, "
        "valid once, for 1 min..24 h; the registry stores only its hash. Needs an admin SVID "
        "(the registry's DIR/admin).",
    )
    verbs = group.add_subparsers(dest="token_verb", metavar="VERB", required=True)
    create = verbs.add_parser(
        "create",
        help="a new token for --spiffe-id; prints it (once: it is not stored)",
        description="Create a one-time join token for SPIFFE_ID (spiffe://TD/ns/NS/sa/SA, of the "
        "registry's trust domain) and print it alone on standard output; what it is for goes to "
        "standard error. --join prints the join string instead: "
        f"{JOIN_PREFIX}<registry URL>:<sha256 hex of the root CA's SubjectPublicKeyInfo>:<token>, "
        "the root read from the --svid-dir's bundle.pem (when the bundle holds several roots, as "
        "during a root rotation, the newest one: the latest notBefore).",
    )
    create.add_argument(
        "--spiffe-id",
        required=True,
        metavar="SPIFFE_ID",
        help="the workload identity the token buys, spiffe://TD/ns/NS/sa/SA",
    )
    create.add_argument(
        "--ttl",
        type=_ttl,
        metavar="DURATION",
        help="how long the token may be used: 90s, 15m, 2h (1 min..24 h; default 15m)",
    )
    create.add_argument(
        "--join",
        action="store_true",
        help="print the join string (registry URL, pinned root, token) instead of the token",
    )
    create.set_defaults(func=_cmd_create)
    listed = verbs.add_parser(
        "list",
        help="every token with its state: unused, used, expired, revoked (never a secret)",
        description="List the registry's join tokens, oldest first, with their state.",
    )
    listed.set_defaults(func=_cmd_list)
    revoke = verbs.add_parser(
        "revoke",
        help="revoke a token by its id ('token list' shows them)",
        description="Revoke the join token ID: it can no longer be used. Revoking a revoked token "
        "keeps its first time.",
    )
    revoke.add_argument("id", metavar="ID", help="the token's id (12 hex characters)")
    revoke.set_defaults(func=_cmd_revoke)
    for p in (create, listed, revoke):
        add_connection_options(p)
        add_output_option(p)


def pinned_root(bundle: Path) -> tuple[x509.Certificate, int]:
    """The root a join string pins: the newest of ``bundle``'s roots (latest notBefore), and
    how many roots the bundle holds."""
    from meshlib.identity.bundle import BundleError, load_bundle

    try:
        roots = load_bundle(bundle).roots
    except BundleError as exc:
        raise CommandFailed(f"--join needs the trust bundle: {exc}") from exc
    return max(roots, key=lambda c: c.not_valid_before_utc), len(roots)


def join_string(url: str, root: x509.Certificate, token: str) -> str:
    """``meshlib-join:v1:<url>:<sha256 hex of root's SubjectPublicKeyInfo DER>:<token>``."""
    from cryptography.hazmat.primitives import serialization

    spki = root.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"{JOIN_PREFIX}{url}:{hashlib.sha256(spki).hexdigest()}:{token}"


def _cmd_create(args: argparse.Namespace) -> int:
    from meshlib.control.tokens import when
    from meshlib.identity.bundle import root_label

    root = None
    if args.join:  # read the bundle first: a missing one must not cost a token
        root, count = pinned_root(Path(svid_dir_of(args)) / "bundle.pem")
        if count > 1:
            print(
                f"note: the bundle holds {count} roots; the join string pins the newest, "
                f"{root_label(root)}",
                file=sys.stderr,
            )
    with connect(args) as client:
        issued = client.create_token(args.spiffe_id, ttl=args.ttl)
        # One URL in a join string: the registry that issued the token (replicas share it).
        issuer = client.url
    join = None if root is None else join_string(issuer, root, issued.token)
    if args.output != "text":
        document: dict[str, Any] = {
            **issued.to_json(),
            "expires": when(issued.expires_at),
        }
        if join is not None:
            document["join"] = join
        print_document(document, args.output)
        return EXIT_OK
    print(join if join is not None else issued.token)
    print(
        f"token {issued.id} for {issued.spiffe_id}, valid once until {when(issued.expires_at)} "
        "(shown this once: the registry keeps only its hash)",
        file=sys.stderr,
    )
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    from meshlib.control.tokens import when

    with connect(args) as client:
        tokens = client.tokens()
    if args.output != "text":
        print_document({"tokens": [t.to_json() for t in tokens]}, args.output)
        return EXIT_OK
    if not tokens:
        print("no join tokens")
        return EXIT_OK

    def stamp(value: float | None) -> str:
        return "-" if value is None else when(value)

    rows = [
        (t.id, t.spiffe_id, t.state, when(t.expires_at), stamp(t.used_at), stamp(t.revoked_at))
        for t in tokens
    ]
    print(table(("ID", "SPIFFE_ID", "STATE", "EXPIRES", "USED", "REVOKED"), rows))
    return EXIT_OK


def _cmd_revoke(args: argparse.Namespace) -> int:
    from meshlib.control.client import RegistryNotFound
    from meshlib.control.tokens import when

    if not re.fullmatch(r"[0-9a-f]{12}", args.id):
        raise UsageError(f"a token id is 12 lower-case hex characters, got {args.id!r}")
    with connect(args) as client:
        try:
            revoked_at = client.revoke_token(args.id)
        except RegistryNotFound as exc:
            raise CommandFailed(
                f"no join token {args.id} in the registry (meshctl token list shows them)"
            ) from exc
    if args.output != "text":
        print_document({"id": args.id, "revoked_at": revoked_at}, args.output)
    else:
        print(f"revoked token {args.id} at {when(revoked_at)}")
    return EXIT_OK


VERBS: tuple[Registrar, ...] = (_add_token,)
