"""
The TLS pieces of HTTPS interception (SPEC §6).

Client side: one pyOpenSSL server context per CONNECT host (TLS 1.2+, ALPN
C{http/1.1}, a leaf from L{codex_proxy.ca}), whose SNI callback moves a
handshake naming another host onto a context without a certificate, so the
handshake itself fails. Upstream side: client TLS that trusts the system
store plus C{SSL_CERT_FILE} (never our own CA) and checks the name with
service-identity.

The listener drives the request path; this module only hands it connection
creators for C{startTLS}, and never imports it.
"""

from __future__ import annotations

import collections
import os
import time
import warnings
from typing import Iterable, List, Mapping, Optional, OrderedDict

import attrs
from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import VerificationError
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from codex_proxy.ca import (
    BUNDLE_FILE,
    CAError,
    CertificateAuthority,
    Clock,
    KeySource,
    LeafCache,
    load_or_create_ca,
    new_p256_key,
    system_roots_file,
    write_bundle,
)
from codex_proxy.config import ConfigError, codex_home
from codex_proxy.domains import InvalidHost, normalize_host
from codex_proxy.errors import ProxyError

ALPN = b"http/1.1"


def _refusing_context() -> SSL.Context:
    """
    A server context with no certificate: a handshake moved onto it fails.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    return context


_REFUSE = _refusing_context()


def _select_alpn(conn: SSL.Connection, offered: List[bytes]) -> bytes:
    if ALPN in offered:
        return ALPN
    return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]


def server_context(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, host: str
) -> SSL.Context:
    """
    The finished server context for tunnels to the normalised C{host}.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET)
    context.use_certificate(cert)
    context.use_privatekey(key)
    context.check_privatekey()
    context.set_alpn_select_callback(_select_alpn)

    def check_sni(conn: SSL.Connection) -> None:
        # Raising here would print to stderr: switch contexts instead.
        name = conn.get_servername()
        if name is None:
            return
        try:
            named = normalize_host(name.decode("ascii"))
        except (UnicodeDecodeError, InvalidHost):
            named = None
        if named != host:
            conn.set_context(_REFUSE)

    context.set_tlsext_servername_callback(check_sni)
    return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    A C{startTLS} argument for the client side of one intercepted tunnel.
    """

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tlsProtocol)
        return connection


class UpstreamTrust:
    """
    The certificates an upstream leg trusts, parsed once.

    @ivar root: the same certificates as Twisted's trust root, for
        C{optionsForClientTLS}.
    """

    def __init__(self, certs: Iterable[x509.Certificate]) -> None:
        self.certs = tuple(certs)
        self.root = tssl.trustRootFromCertificates(
            [tssl.Certificate(X509.from_cryptography(c)) for c in self.certs]
        )

    @classmethod
    def from_files(
        cls, paths: Iterable[Optional[str]], exclude: Optional[x509.Certificate] = None
    ) -> "UpstreamTrust":
        """
        Every certificate of the PEM files in C{paths} (C{None}s skipped),
        except C{exclude}: our own CA is never trusted upstream, even when
        C{SSL_CERT_FILE} names the bundle we wrote.

        @raise ValueError: a file is unreadable or holds no certificate.
        """
        certs: List[x509.Certificate] = []
        for path in paths:
            if path is None:
                continue
            try:
                with open(path, "rb") as f, warnings.catch_warnings():
                    # Some system roots predate RFC 5280's positive serials.
                    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                    found = x509.load_pem_x509_certificates(f.read())
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: cannot load trusted certificates: {e}")
            certs.extend(c for c in found if c != exclude and c not in certs)
        return cls(certs)


def trust_files(environ: Mapping[str, str], system_roots: Optional[str]) -> List[Optional[str]]:
    """
    The system roots, plus C{SSL_CERT_FILE} of C{environ} when set (SPEC §6).
    """
    return [system_roots, environ.get("SSL_CERT_FILE") or None]


class InterceptionError(ProxyError):
    """
    HTTPS interception was asked for but its CA or trust store cannot be
    used; the proxy does not start (fail closed).
    """


@attrs.frozen
class Interception:
    """
    What HTTPS interception needs, loaded once at start (SPEC §6): the CA,
    the trust store for upstream legs, and the client bundle's path.
    """

    ca: CertificateAuthority
    trust: UpstreamTrust
    bundle: str


def load_interception(environ: Mapping[str, str] = os.environ) -> Interception:
    """
    Load or create the CA under C{$CODEX_HOME/proxy/}, write the client
    bundle (system roots + our CA) next to it, and load the upstream trust
    (system roots + C{SSL_CERT_FILE}, never our CA). Blocking file I/O, done
    once before listening.

    @raise InterceptionError: the CA files are unsafe or unusable, a file
        cannot be read or written, or C{CODEX_HOME}/C{HOME} cannot be found
        (fail closed); the message says which.
    """
    try:
        directory = os.path.join(codex_home(environ), "proxy")
        ca = load_or_create_ca(directory, time.time)
        roots = system_roots_file()
        bundle = os.path.join(directory, BUNDLE_FILE)
        write_bundle(ca, bundle, roots)
        trust = UpstreamTrust.from_files(trust_files(environ, roots), exclude=ca.cert)
    except (CAError, ConfigError, OSError, ValueError) as e:
        raise InterceptionError(f"mitm: {e}") from None
    return Interception(ca, trust, bundle)


def is_tls_failure(reason: Failure) -> bool:
    """
    Whether an upstream connection ended because TLS failed: a handshake
    error or a certificate that does not name the host.
    """
    return reason.check(SSL.Error, VerificationError) is not None


class OriginTLS:
    """
    Client TLS toward origins (the upstream leg of an intercepted tunnel,
    and absolute-form C{https://} requests): the given trust store with
    host name checks, TLS 1.2+, one connection creator per host (LRU).
    """

    def __init__(self, trust: UpstreamTrust, cache_size: int = 1024) -> None:
        self._trust = trust
        self._size = cache_size
        self._clients: OrderedDict[str, IOpenSSLClientConnectionCreator] = (
            collections.OrderedDict()
        )

    def client_tls(self, host: str) -> IOpenSSLClientConnectionCreator:
        creator = self._clients.get(host)
        if creator is None:
            creator = tssl.optionsForClientTLS(
                host,
                trustRoot=self._trust.root,
                acceptableProtocols=[ALPN],
                extraCertificateOptions={"raiseMinimumTo": tssl.TLSVersion.TLSv1_2},
            )
            self._clients[host] = creator
            while len(self._clients) > self._size:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(host)
        return creator


class Interceptor(OriginTLS):
    """
    What the HTTP listener needs to intercept tunnels: C{server_tls(host)}
    for the client side and C{client_tls(host)} for the upstream leg, both
    built once per host and cached (LRU).
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        trust: UpstreamTrust,
        clock: Clock,
        key_source: KeySource = new_p256_key,
        cache_size: int = 1024,
    ) -> None:
        super().__init__(trust, cache_size)
        self.ca = ca
        self.leaves: LeafCache[ServerTLS] = LeafCache(
            ca,
            lambda cert, key, host: ServerTLS(server_context(cert, key, host)),
            clock,
            key_source,
            cache_size,
        )

    def server_tls(self, host: str) -> ServerTLS:
        return self.leaves.get(host)
