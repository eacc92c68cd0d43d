"""``meshctl ca init|issue|inspect|rotate|bundle|revoke``: the built-in certificate authority.

Each verb works on a CA directory (:class:`meshlib.identity.cadir.CADirectory`); the identity
package loads (and with it ``cryptography``) only when a ``ca`` verb runs.
"""

from __future__ import annotations

import argparse

from meshlib.cli.command import (
    EXIT_OK,
    CommandFailed,
    Registrar,
    Subparsers,
    UsageError,
    add_output_option,
    print_document,
)
from meshlib.config.values import parse_duration

# --- ca ----------------------------------------------------------------------------------------


def _add_ca(sub: Subparsers) -> None:
    p = sub.add_parser(
        "ca",
        help="the built-in certificate authority: roots, SVIDs, bundles, revocation",
        description="A small CA for workload identity (SPIFFE X.509 SVIDs). See docs/security.md.",
    )
    ca = p.add_subparsers(dest="ca_verb", metavar="CA_VERB", required=True)
    init = ca.add_parser("init", help="create a root CA (EC P-256, 10 years) in DIR")
    init.add_argument(
        "--dir", required=True, help="writes DIR/ca.pem, DIR/ca-key.pem (0600), DIR/bundle.pem"
    )
    init.add_argument("--trust-domain", default=None, help="default: cluster.local")
    init.add_argument("--force", action="store_true", help="replace an existing root key")
    init.set_defaults(func=_cmd_ca_init)
    issue = ca.add_parser("issue", help="issue an X.509 SVID for a namespace/service account")
    issue.add_argument("--dir", required=True, help="the CA directory (from 'ca init')")
    issue.add_argument("--namespace", required=True)
    issue.add_argument("--service-account", required=True)
    issue.add_argument(
        "--out",
        required=True,
        help="writes cert.pem, key.pem (0600), bundle.pem (DIR's) and crl.pem (if DIR has one)",
    )
    issue.add_argument("--ttl", default="24h", help="certificate lifetime, e.g. 24h, 90m")
    issue.set_defaults(func=_cmd_ca_issue)
    inspect = ca.add_parser("inspect", help="print subject, SPIFFE ID, validity and issuer")
    inspect.add_argument("file", metavar="FILE", help="a PEM file of one or more certificates")
    inspect.add_argument("--bundle", help="also verify FILE as an SVID chain against these roots")
    add_output_option(inspect)
    inspect.set_defaults(func=_cmd_ca_inspect)
    rotate = ca.add_parser(
        "rotate", help="make a new root, keep the old one, publish bundle {old, new}"
    )
    rotate.add_argument("--dir", required=True, help="the CA directory")
    rotate.set_defaults(func=_cmd_ca_rotate)
    bundle = ca.add_parser("bundle", help="write the published trust bundle (with its sequence)")
    bundle.add_argument("--dir", required=True, help="the CA directory")
    bundle.add_argument("--out", required=True, help="the bundle file to write")
    bundle.add_argument(
        "--drop-old",
        action="store_true",
        help="publish the bundle without the previous root (next sequence) first",
    )
    bundle.add_argument(
        "--force",
        action="store_true",
        help="with --drop-old: even if leaves issued by the previous root are still unexpired",
    )
    bundle.set_defaults(func=_cmd_ca_bundle)
    revoke = ca.add_parser("revoke", help="revoke leaf certificates: re-sign DIR/crl.pem")
    revoke.add_argument("--dir", required=True, help="the CA directory")
    revoke.add_argument(
        "files",
        metavar="CERTFILE",
        nargs="*",
        help="certificates to revoke; none: just re-sign the CRLs (before their nextUpdate)",
    )
    revoke.set_defaults(func=_cmd_ca_revoke)


def _cmd_ca_init(args: argparse.Namespace) -> int:
    from meshlib.identity import DEFAULT_TRUST_DOMAIN, IdentityError
    from meshlib.identity.cadir import CADirectory

    cadir = CADirectory(args.dir)
    try:
        ca = cadir.init(args.trust_domain or DEFAULT_TRUST_DOMAIN, force=args.force)
    except IdentityError as exc:
        raise CommandFailed(exc.reason) from exc
    out = cadir.path
    print(f"{out}/ca.pem: root CA for spiffe://{ca.trust_domain}, key in {out}/ca-key.pem")
    return EXIT_OK


def _cmd_ca_issue(args: argparse.Namespace) -> int:
    import datetime as dt

    from meshlib.identity import IdentityError, SpiffeID
    from meshlib.identity.cadir import CADirectory

    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise UsageError(f"--ttl: {exc}") from None
    try:
        cadir = CADirectory(args.dir)
        td = cadir.current().trust_domain
        spiffe_id = SpiffeID.for_workload(td, args.namespace, args.service_account)
        svid = cadir.issue(spiffe_id, out=args.out, ttl=dt.timedelta(seconds=ttl))
    except IdentityError as exc:
        raise CommandFailed(exc.reason) from exc
    until = svid.certificate.not_valid_after_utc.isoformat()
    print(f"{args.out}/cert.pem: {spiffe_id} valid until {until}")
    return EXIT_OK


def _cmd_ca_inspect(args: argparse.Namespace) -> int:
    from meshlib.identity import IdentityError, load_certificates, verify_svid
    from meshlib.identity.svid import describe_certificate

    try:
        certs = load_certificates(args.file)
        described = [describe_certificate(cert) for cert in certs]
        spiffe_id = None
        if args.bundle:
            spiffe_id = verify_svid(certs, load_certificates(args.bundle))
    except IdentityError as exc:
        raise CommandFailed(exc.reason) from exc
    if args.output != "text":
        verified = (
            None if spiffe_id is None else {"spiffe_id": str(spiffe_id), "bundle": args.bundle}
        )
        document = {
            "file": args.file,
            # The text's labels as keys ("not before" → not_before), each value as printed but
            # for `ca`, a boolean in a machine-read document.
            "certificates": [
                {
                    label.replace(" ", "_"): (value == "yes") if label == "ca" else value
                    for label, value in lines
                }
                for lines in described
            ],
            "verified": verified,
        }
        print_document(document, args.output)
        return EXIT_OK
    for index, lines in enumerate(described):
        if len(certs) > 1:
            print(f"certificate {index + 1} of {len(certs)}:")
        for label, value in lines:
            print(f"  {label + ':':<12} {value}")
    if spiffe_id is not None:
        print(f"verified:    {spiffe_id} chains to {args.bundle}")
    return EXIT_OK


def _cmd_ca_rotate(args: argparse.Namespace) -> int:
    from meshlib.identity import IdentityError
    from meshlib.identity.bundle import root_label
    from meshlib.identity.cadir import CADirectory

    try:
        new, bundle = CADirectory(args.dir).rotate()
    except IdentityError as exc:
        raise CommandFailed(exc.reason) from exc
    print(f"new root: {root_label(new.certificate)} (the previous one kept for the overlap)")
    print(f"{args.dir}/bundle.pem: {len(bundle.roots)} roots, sequence {bundle.sequence}")
    return EXIT_OK


def _cmd_ca_bundle(args: argparse.Namespace) -> int:
    from meshlib.identity import IdentityError
    from meshlib.identity.cadir import CADirectory

    if args.force and not args.drop_old:
        raise UsageError("--force only applies with --drop-old")
    try:
        bundle = CADirectory(args.dir).export_bundle(
            args.out, drop_old=args.drop_old, force=args.force
        )
    except IdentityError as exc:
        raise CommandFailed(exc.reason) from exc
    print(f"{args.out}: {len(bundle.roots)} root(s), sequence {bundle.sequence}")
    return EXIT_OK


def _cmd_ca_revoke(args: argparse.Namespace) -> int:
    from meshlib.identity import IdentityError
    from meshlib.identity.cadir import CADirectory

    try:
        revoked = CADirectory(args.dir).revoke(args.files)
    except IdentityError as exc:
        raise CommandFailed(exc.reason) from exc
    for serial, root in revoked:
        print(f"revoked serial {serial:x} (issued by {root})")
    print(f"{args.dir}/crl.pem: re-signed; copy it into each SVID directory")
    return EXIT_OK


VERBS: tuple[Registrar, ...] = (_add_ca,)
