"""
The interception CA: load-or-create, leaf minting with a cache, the bundle.

The CA lives in C{$CODEX_HOME/proxy/} as C{ca.pem} and C{ca.key} (SPEC §6).
Every way those files can be unsafe or half-present is a L{CAError}; the
caller stops start-up on it (fail closed). Nothing is ever overwritten.

Leaves share one P-256 key made when the L{LeafCache} is built, so a
handshake never generates a key; the fully-built per-host server context
(built by a function the caller passes, see L{codex_proxy.mitm}) is cached
per host, least recently used first out, and never changed after it is made.
"""

from __future__ import annotations

import collections
import datetime
import ipaddress
import os
import ssl
import stat
from typing import Callable, Generic, List, Optional, OrderedDict, Tuple, TypeVar

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from codex_proxy.errors import ProxyError

#: File names inside C{$CODEX_HOME/proxy/}.
CERT_FILE = "ca.pem"
KEY_FILE = "ca.key"
BUNDLE_FILE = "ca-bundle.pem"

CA_LIFETIME = datetime.timedelta(days=3650)
#: Leaves are short-lived; a cached one is re-minted once this old.
LEAF_LIFETIME = datetime.timedelta(days=7)
LEAF_REFRESH = datetime.timedelta(days=1)
#: Tolerance for clients whose clock is a little behind ours.
BACKDATE = datetime.timedelta(hours=1)

KeySource = Callable[[], ec.EllipticCurvePrivateKey]
Clock = Callable[[], float]


def new_p256_key() -> ec.EllipticCurvePrivateKey:
    """
    The default key source: a fresh ECDSA P-256 key.
    """
    return ec.generate_private_key(ec.SECP256R1())


class CAError(ProxyError):
    """
    The CA files are missing, half-present, unsafe or unreadable. The message
    names the file and what is wrong with it.
    """


@attrs.frozen
class CertificateAuthority:
    """
    The CA certificate and its key, as C{cryptography} objects.
    """

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


def _create(directory: str, clock: Clock, key_source: KeySource) -> CertificateAuthority:
    key = key_source()
    now = _utc(clock())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "codex-proxy"),
            x509.NameAttribute(NameOID.COMMON_NAME, "codex-proxy local interception CA"),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    keyBytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key first, exclusively: if anything races or fails after this, the
    # next start finds one file of two and refuses, never overwrites.
    _write_new(os.path.join(directory, KEY_FILE), keyBytes, 0o600)
    _write_new(
        os.path.join(directory, CERT_FILE), cert.public_bytes(serialization.Encoding.PEM), 0o644
    )
    return CertificateAuthority(cert, key)


def _write_new(path: str, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except OSError as e:
        raise CAError(f"{path}: cannot create: {e.strerror}")
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _read_key(path: str) -> ec.EllipticCurvePrivateKey:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if os.path.islink(path):
            raise CAError(f"{path}: the CA key is a symbolic link; refusing to use it")
        raise CAError(f"{path}: cannot open the CA key: {e.strerror}")
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CAError(f"{path}: the CA key is not a regular file")
        if info.st_mode & 0o077:
            raise CAError(
                f"{path}: the CA key is readable or writable by group or others"
                f" (mode {stat.S_IMODE(info.st_mode):04o}); it must be 0600"
            )
        if info.st_uid != os.geteuid():
            raise CAError(f"{path}: the CA key belongs to uid {info.st_uid}, not to us")
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CAError(f"{path}: not an unencrypted PEM private key: {e}")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CAError(f"{path}: the CA key is not an ECDSA P-256 key")
    return key


def _read_cert(path: str) -> x509.Certificate:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CAError(f"{path}: cannot read the CA certificate: {e.strerror}")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise CAError(f"{path}: not a PEM certificate: {e}")


def load_or_create_ca(
    directory: str, clock: Clock, key_source: KeySource = new_p256_key
) -> CertificateAuthority:
    """
    Load the CA from C{directory}, or create it there when neither file
    exists (the directory too, mode 0700).

    @raise CAError: one file of two, an unsafe key, unreadable or mismatched
        files.
    """
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise CAError(f"{directory}: cannot create the CA directory: {e.strerror}")
    if not os.path.isdir(directory):
        raise CAError(f"{directory}: not a directory")
    certPath = os.path.join(directory, CERT_FILE)
    keyPath = os.path.join(directory, KEY_FILE)
    haveCert = os.path.lexists(certPath)
    haveKey = os.path.lexists(keyPath)
    if not haveCert and not haveKey:
        return _create(directory, clock, key_source)
    if haveCert != haveKey:
        present, missing = (certPath, keyPath) if haveCert else (keyPath, certPath)
        raise CAError(
            f"{missing}: missing while {present} exists; refusing to create one"
            " half of the CA (restore it, or remove both to make a new CA)"
        )
    key = _read_key(keyPath)
    cert = _read_cert(certPath)
    if cert.public_key() != key.public_key():
        raise CAError(f"{certPath}: the certificate does not match {keyPath}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CAError(f"{certPath}: not a CA certificate (basicConstraints CA:TRUE missing)")
    return CertificateAuthority(cert, key)


def system_roots_file() -> Optional[str]:
    """
    The system trust store file OpenSSL was built with (not C{SSL_CERT_FILE}).
    """
    path = ssl.get_default_verify_paths().openssl_cafile
    return path if path and os.path.isfile(path) else None


def write_bundle(ca: CertificateAuthority, path: str, roots_file: Optional[str]) -> None:
    """
    Write system roots plus our CA to C{path} atomically, for the child
    variables of SPEC §6 (C{SSL_CERT_FILE}, C{REQUESTS_CA_BUNDLE}, ...).
    """
    roots = b""
    if roots_file is not None:
        with open(roots_file, "rb") as f:
            roots = f.read()
        if roots and not roots.endswith(b"\n"):
            roots += b"\n"
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(roots + ca.pem)
    os.replace(tmp, path)


def _san_for(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def mint_leaf(
    ca: CertificateAuthority, host: str, public_key: ec.EllipticCurvePublicKey, now: float
) -> x509.Certificate:
    """
    A server certificate for the normalised C{host}: a DNS SAN for a name,
    an IP SAN for a literal.
    """
    start = _utc(now)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(start + LEAF_LIFETIME)
        .add_extension(x509.SubjectAlternativeName([_san_for(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )


T = TypeVar("T")


class LeafCache(Generic[T]):
    """
    Per-host server contexts, minted on first use and kept LRU.

    C{build(cert, key, host)} turns a fresh leaf into the finished object
    (a pyOpenSSL context); it is called once per host per refresh, and its
    result is never touched again here.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        build: Callable[[x509.Certificate, ec.EllipticCurvePrivateKey, str], T],
        clock: Clock,
        key_source: KeySource = new_p256_key,
        size: int = 1024,
    ) -> None:
        self.ca = ca
        self._build = build
        self._clock = clock
        self._size = size
        self.key = key_source()
        self._entries: OrderedDict[str, Tuple[float, T]] = collections.OrderedDict()
        self.minted = 0

    def get(self, host: str) -> T:
        now = self._clock()
        entry = self._entries.get(host)
        if entry is not None and now - entry[0] < LEAF_REFRESH.total_seconds():
            self._entries.move_to_end(host)
            return entry[1]
        cert = mint_leaf(self.ca, host, self.key.public_key(), now)
        self.minted += 1
        built = self._build(cert, self.key, host)
        self._entries[host] = (now, built)
        self._entries.move_to_end(host)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return built

    def hosts(self) -> List[str]:
        """
        Cached hosts, least recently used first.
        """
        return list(self._entries)
