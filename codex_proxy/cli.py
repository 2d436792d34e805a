"""
The C{codexproxy} command: operator tools that read a config without
running the proxy (SPEC §10, issue 7).

  - C{check-config [FILE]}: validate, print the effective policy and where
    each entry came from;
  - C{explain [--config F] [--method M] [--client N] TARGET}: what the
    policy (or one client's) says about one request, and which config line
    would change that, without sending traffic or resolving names
    (L{codex_proxy.explain});
  - C{env [--shell sh|fish|json] [--config F] [--ports-file P] [--client N]}:
    the variables that point a child process at the proxy;
  - C{selftest --proxy URL [--socks H:P] [--port N] [--with-resolve]}:
    replay the bypass corpus against a running proxy (the one command that
    sends traffic); C{selftest --print-resolve} prints the C{--resolve}
    options its resolver cases need;
  - C{report [--config F] [--since W] [--client N] [--top N] [--json] LOG}:
    what an audit log says was blocked, and the allowlist edit for it
    (L{codex_proxy.report}).

Exit status: 0 ok (valid, allowed, printed), 1 blocked or invalid, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

from codex_proxy import report, selftest
from codex_proxy.bypass import BypassError, load_corpus
from codex_proxy.childenv import EnvError, child_env, unknown_client
from codex_proxy.clients import named
from codex_proxy.config import ConfigError, ProxyConfig, default_config_path, load_config
from codex_proxy.configview import policy_document
from codex_proxy.errors import ProxyError
from codex_proxy.explain import UsageError, explain, parse_target
from codex_proxy.model import ProxyRequest
from codex_proxy.policy import client_config, policy_from_config
from codex_proxy.secrets import read_secret

EXIT_OK = 0
EXIT_BLOCKED = 1
EXIT_USAGE = 2


def _load(path: Optional[str]) -> ProxyConfig:
    return load_config(path or default_config_path(os.environ))


# check-config


def check_config(path: Optional[str], out: TextIO) -> int:
    """
    Print the effective policy of the config at C{path}: the text form of
    L{policy_document}, which the operations listener serves as JSON.
    """
    config = _load(path)
    document = policy_document(config)
    out.write(f"{document['source']}: valid\n")
    _table(out, list(document["settings"].items()))
    for title in ("allowed_domains", "denied_domains", "allowed_ranges", "denied_ranges"):
        patterns = document[title]
        out.write(f"{title} ({len(patterns)}):\n")
        width = max((len(p["pattern"]) for p in patterns), default=0)
        for pattern in patterns:
            out.write(f"  {pattern['pattern'].ljust(width)}  {pattern['source']}\n")
        if title == "allowed_domains" and not patterns:
            out.write("  (empty allowlist: every destination is blocked)\n")
    _clients(document, out)
    sockets = document["allow_unix_sockets"]
    out.write(f"allow_unix_sockets ({len(sockets)}):\n")
    for socket_path in sockets:
        out.write(f"  {socket_path}\n")
    for secret in config.secrets:
        # One whose value cannot be read is a config error, as at start.
        read_secret(secret, os.environ)
    out.write(f"secrets ({len(document['secrets'])}):\n")
    for entry in document["secrets"]:
        # Where the value comes from, never the value.
        out.write(f"  {entry['name']}  from {entry['source']}  to {', '.join(entry['hosts'])}\n")
    out.write("limits:\n")
    for name, limit in document["limits"].items():
        origin = "(default)" if limit["default"] else ""
        out.write(f"  {name} = {limit['value']} {origin}".rstrip() + "\n")
    for warning in document["warnings"]:
        out.write(f"warning: {warning}\n")
    return EXIT_OK


def _clients(document: Dict[str, Any], out: TextIO) -> None:
    """
    The clients section of C{check-config}: names, modes and overlays,
    never a token (SPEC §11).
    """
    out.write(f"require_client_auth: {str(document['require_client_auth']).lower()}\n")
    out.write(f"clients ({len(document['clients'])}):\n")
    for client in document["clients"]:
        out.write(f"  {client['name']}: mode {client['mode']}\n")
        for title in ("allowed_domains", "denied_domains"):
            for pattern in client[title]:
                out.write(f"    {title} + {pattern['pattern']}  {pattern['source']}\n")


def _table(out: TextIO, rows: Sequence[Tuple[str, str]]) -> None:
    width = max(len(key) for key, _ in rows) + 1
    for key, value in rows:
        out.write(f"{(key + ':').ljust(width)} {value}\n")


# explain


def run_explain(
    path: Optional[str],
    target: str,
    method: Optional[str],
    out: TextIO,
    client: Optional[str] = None,
) -> int:
    config = _load(path)
    request, inner = parse_target(target, method)
    policy = policy_from_config(config, os.path.realpath)
    title = f"config: {config.source} [{config.section}]"
    if client is not None:
        # What the client's own policy says (SPEC §11).
        own = named(config.clients, client)
        if own is None:
            raise UsageError(unknown_client(config, client))
        config, policy = client_config(config, own), policy.for_client(client)
        title += f" client {client}"
    rows, allowed = explain(config, policy, request, inner)
    out.write(title + "\n")
    _table(out, rows)
    return EXIT_OK if allowed else EXIT_BLOCKED


def _judge(config: ProxyConfig, request: ProxyRequest) -> Tuple[List[Tuple[str, str]], bool]:
    """
    What C{explain} says about C{request} under C{config}: the report's
    judge of each blocked destination and of its own snippet.
    """
    return explain(config, policy_from_config(config, os.path.realpath), request, "GET")


# env


def run_env(
    path: Optional[str],
    ports_file: Optional[str],
    shell: str,
    out: TextIO,
    err: TextIO,
    client: Optional[str] = None,
) -> int:
    config = _load(path)
    bound: Dict[str, Any] = {}
    if ports_file is not None:
        try:
            with open(ports_file) as f:
                bound = json.load(f)
        except (OSError, ValueError) as e:
            raise EnvError(f"{ports_file}: cannot read the ports file: {e}") from None
    bundle = None
    if config.mitm or config.secrets:
        # The proxy makes the CA and bundle at start; make sure they exist
        # now, so the variables never name a missing file. TLS is loaded
        # only by the commands that need it.
        from codex_proxy.mitm import load_interception

        bundle = load_interception(os.environ).bundle
    placeholders: Dict[str, str] = bound.get("placeholders", {})
    missing = [secret.name for secret in config.secrets if secret.name not in placeholders]
    if missing:
        # Random at each start: only the running proxy's ports file has them.
        err.write(f"codexproxy: no placeholder for {', '.join(missing)}: pass the running proxy's --ports-file\n")
    env = child_env(
        config,
        http=bound.get("http"),
        socks=bound.get("socks"),
        ca_bundle=bundle,
        placeholders=placeholders,
        client=client,
    )
    out.write(_FORMATS[shell](env))
    return EXIT_OK


def _sh(env: Dict[str, str]) -> str:
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())


def _fish(env: Dict[str, str]) -> str:
    def quote(value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return "".join(f"set -gx {name} {quote(value)}\n" for name, value in env.items())


def _json(env: Dict[str, str]) -> str:
    return json.dumps(env, indent=2) + "\n"


_FORMATS: Dict[str, Callable[[Dict[str, str]], str]] = {
    "sh": _sh,
    "fish": _fish,
    "json": _json,
}


# ca


def run_ca(bundle: Optional[str], out: TextIO) -> int:
    """
    Create the interception CA if it does not exist yet, and show it: its
    files, fingerprint, validity and the client bundle (also written to
    C{bundle} when given).
    """
    from cryptography.hazmat.primitives import hashes

    from codex_proxy.ca import system_roots_file, write_bundle
    from codex_proxy.mitm import load_interception

    interception = load_interception(os.environ)
    ca = interception.ca
    directory = os.path.dirname(interception.bundle)
    if bundle is not None:
        write_bundle(ca, bundle, system_roots_file())
    fingerprint = ca.cert.fingerprint(hashes.SHA256()).hex(":").upper()
    rows = [
        ("certificate", os.path.join(directory, "ca.pem")),
        ("key", os.path.join(directory, "ca.key")),
        ("subject", ca.cert.subject.rfc4514_string()),
        ("sha256 fingerprint", fingerprint),
        ("valid until", ca.cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%SZ")),
        ("client bundle", bundle or interception.bundle),
    ]
    _table(out, rows)
    return EXIT_OK


# selftest


def run_selftest(args: argparse.Namespace, out: TextIO) -> int:
    corpus = load_corpus()
    if args.print_resolve:
        out.write(" ".join(selftest.resolve_options(corpus)) + "\n")
        return EXIT_OK
    if args.proxy is None:
        raise UsageError("--proxy is required (or --print-resolve)")
    try:
        target = selftest.Target(
            http=selftest.parse_address(args.proxy, "--proxy"),
            socks=None if args.socks is None else selftest.parse_address(args.socks, "--socks"),
            port=args.port,
            timeout=args.timeout,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    _, failed = selftest.run(corpus, target, args.with_resolve, out)
    return EXIT_BLOCKED if failed else EXIT_OK


# the command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codexproxy",
        description="Inspect a codex-proxy configuration without running the"
        " proxy (run the proxy itself with: twistd codexproxy), or test a"
        " running one (selftest). See codexproxy(1).",
        epilog="Exit status: 0 ok, 1 blocked, invalid or a selftest case failed, 2 usage.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check-config",
        help="validate a config and print the effective policy",
        description="Validate FILE and print the effective policy, each"
        " domain pattern with the file and key it came from.",
    )
    check.add_argument(
        "file", nargs="?", metavar="FILE", help="default: $CODEX_HOME/config.toml"
    )
    explain_ = commands.add_parser(
        "explain",
        help="show what the policy decides for one request",
        description="Show the decision for one request, the reason, the"
        " x-proxy-error value, the matching pattern and the config edit that"
        " would change it. Sends no traffic and resolves no names. Exit 0 if"
        " allowed, 1 if blocked.",
    )
    explain_.add_argument("--config", "-c", metavar="FILE")
    explain_.add_argument(
        "--method",
        "-m",
        metavar="M",
        help="the HTTP method (default GET; CONNECT for https:// and host:port)",
    )
    explain_.add_argument(
        "--client", metavar="NAME", help="decide by this configured client's own policy"
    )
    explain_.add_argument("target", metavar="URL-or-host:port")
    env = commands.add_parser(
        "env",
        help="print the environment that points a child process at the proxy",
        description='Print HTTP_PROXY and friends for a child process: eval'
        ' "$(codexproxy env)".',
    )
    env.add_argument("--shell", choices=sorted(_FORMATS), default="sh")
    env.add_argument("--config", "-c", metavar="FILE")
    env.add_argument(
        "--ports-file",
        metavar="FILE",
        help="the proxy's ports file: the bound addresses (needed with port 0)",
    )
    env.add_argument(
        "--client",
        metavar="NAME",
        help="embed this configured client's credentials in the proxy URLs",
    )
    ca = commands.add_parser(
        "ca",
        help="create (if needed) and show the HTTPS interception CA",
        description="Create the CA under $CODEX_HOME/proxy/ if it does not exist"
        " (as the proxy does at start with mitm = true) and print its files,"
        " SHA-256 fingerprint, validity and the client bundle path.",
    )
    ca.add_argument(
        "--bundle",
        metavar="PATH",
        help="also write the client bundle (system roots + the CA) to PATH",
    )
    test = commands.add_parser(
        "selftest",
        help="replay the bypass corpus against a running proxy",
        description="Send every case of the bypass corpus (local and private"
        " destinations in every spelling) through a running proxy: HTTP"
        " absolute-form, CONNECT and, with --socks, SOCKS5 by name and by"
        " address. One line per case, then 'N passed, N failed'. Exit 0 if"
        " every case was refused as expected, 1 otherwise.",
    )
    test.add_argument("--proxy", metavar="URL", help="the HTTP listener (http://127.0.0.1:3128)")
    test.add_argument("--socks", metavar="HOST:PORT", help="the SOCKS5 listener")
    test.add_argument(
        "--port",
        type=int,
        default=80,
        metavar="N",
        help="destination port of every request (default 80); point it at a"
        " local port you watch: nothing may arrive there",
    )
    test.add_argument(
        "--with-resolve",
        action="store_true",
        help="also run the cases that need resolver answers; the proxy must"
        " run with the --print-resolve options and allowlist **.bypass.test",
    )
    test.add_argument(
        "--print-resolve",
        action="store_true",
        help="print the twistd codexproxy --resolve options the resolver cases need",
    )
    test.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="per request (default 10)"
    )
    report.add_arguments(
        commands.add_parser(
            "report",
            help="what an audit log says was blocked, and what to allow",
            description="Totals, most-blocked destinations with the edit that would"
            " allow each, and a TOML allowed_domains snippet. See codexproxy(1).",
        )
    )
    return parser


def main(
    argv: Optional[Sequence[str]] = None,
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
) -> int:
    """
    Run the command line C{argv} (default C{sys.argv[1:]}); returns the exit
    status instead of exiting, so tests can call it.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    try:
        if args.command == "check-config":
            return check_config(args.file, out)
        if args.command == "explain":
            return run_explain(args.config, args.target, args.method, out, args.client)
        if args.command == "ca":
            return run_ca(args.bundle, out)
        if args.command == "selftest":
            return run_selftest(args, out)
        if args.command == "report":
            return report.run_report(args, out, _judge)
        return run_env(args.config, args.ports_file, args.shell, out, err, args.client)
    except (UsageError, report.ReportError) as e:
        err.write(f"codexproxy {args.command}: {e}\n")
        return EXIT_USAGE
    except ConfigError as e:
        err.write(f"codexproxy: config error: {e}\n")
        return EXIT_BLOCKED
    except (EnvError, BypassError) as e:
        err.write(f"codexproxy: {e}\n")
        return EXIT_BLOCKED
    except (ProxyError, OSError) as e:  # the CA's
        err.write(f"codexproxy {args.command}: {e}\n")
        return EXIT_BLOCKED


if __name__ == "__main__":
    raise SystemExit(main())
