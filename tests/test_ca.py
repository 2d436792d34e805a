"""
The interception CA on disk (SPEC §6): creation, reuse, every file-safety
refusal; leaf certificates and their cache.
"""

from __future__ import annotations

import ipaddress
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from codex_proxy.ca import (
    CAError,
    LEAF_REFRESH,
    LeafCache,
    load_or_create_ca,
    mint_leaf,
    write_bundle,
)

NOW = 1_800_000_000.0
KEY = ec.generate_private_key(ec.SECP256R1())


def clock() -> float:
    return NOW


def make(tmp_path, **kw):
    return load_or_create_ca(str(tmp_path / "proxy"), clock, key_source=lambda: KEY, **kw)


def test_created_with_private_modes_and_ca_constraints(tmp_path):
    ca = make(tmp_path)
    directory = tmp_path / "proxy"
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(directory / "ca.key").st_mode) == 0o600
    assert ca.key.curve.name == "secp256r1"
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    years = (ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1


def test_reused_byte_for_byte(tmp_path):
    make(tmp_path)
    files = {n: (tmp_path / "proxy" / n).read_bytes() for n in ("ca.pem", "ca.key")}
    other = ec.generate_private_key(ec.SECP256R1())
    again = load_or_create_ca(str(tmp_path / "proxy"), clock, key_source=lambda: other)
    assert again.key.private_numbers() == KEY.private_numbers()
    assert {n: (tmp_path / "proxy" / n).read_bytes() for n in files} == files


@pytest.mark.parametrize("present, missing", [("ca.pem", "ca.key"), ("ca.key", "ca.pem")])
def test_one_file_of_two_is_an_error_and_not_completed(tmp_path, present, missing):
    make(tmp_path)
    os.remove(tmp_path / "proxy" / missing)
    with pytest.raises(CAError, match=f"{missing}: missing while .*{present} exists"):
        make(tmp_path)
    assert not (tmp_path / "proxy" / missing).exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_key_readable_by_others_is_an_error(tmp_path, mode):
    make(tmp_path)
    os.chmod(tmp_path / "proxy" / "ca.key", mode)
    with pytest.raises(CAError, match="ca.key: .*group or others.*must be 0600"):
        make(tmp_path)


def test_symlinked_key_is_an_error(tmp_path):
    make(tmp_path)
    key = tmp_path / "proxy" / "ca.key"
    os.rename(key, tmp_path / "real.key")
    os.symlink(tmp_path / "real.key", key)
    with pytest.raises(CAError, match="ca.key: the CA key is a symbolic link"):
        make(tmp_path)


def test_mismatched_or_garbage_files_are_errors(tmp_path):
    make(tmp_path)
    other = tmp_path / "other"
    load_or_create_ca(str(other), clock, key_source=lambda: ec.generate_private_key(ec.SECP256R1()))
    (tmp_path / "proxy" / "ca.pem").write_bytes((other / "ca.pem").read_bytes())
    with pytest.raises(CAError, match="ca.pem: the certificate does not match"):
        make(tmp_path)
    (tmp_path / "proxy" / "ca.pem").write_bytes(b"junk")
    with pytest.raises(CAError, match="ca.pem: not a PEM certificate"):
        make(tmp_path)
    (tmp_path / "proxy" / "ca.key").write_bytes(b"junk")
    with pytest.raises(CAError, match="ca.key: not an unencrypted PEM private key"):
        make(tmp_path)


def test_directory_that_is_a_file_is_an_error(tmp_path):
    (tmp_path / "proxy").write_text("")
    with pytest.raises(CAError, match="proxy: "):
        make(tmp_path)


@pytest.mark.parametrize(
    "host, san",
    [
        ("origin.test", x509.DNSName("origin.test")),
        ("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
        ("::1", x509.IPAddress(ipaddress.ip_address("::1"))),
    ],
)
def test_leaf_names_the_host(tmp_path, host, san):
    ca = make(tmp_path)
    leaf = mint_leaf(ca, host, KEY.public_key(), NOW)
    assert list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [san]
    assert leaf.issuer == ca.cert.subject
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days <= 8
    leaf.verify_directly_issued_by(ca.cert)


def test_leaf_cache_hits_refreshes_and_evicts(tmp_path):
    ca = make(tmp_path)
    now = [NOW]
    built = []

    def build(cert, key, host):
        built.append(host)
        return object()

    keys = []

    def key_source():
        keys.append(1)
        return KEY

    cache = LeafCache(ca, build, lambda: now[0], key_source, size=2)
    first = cache.get("a.test")
    assert cache.get("a.test") is first
    assert (built, len(keys)) == (["a.test"], 1)
    cache.get("b.test")
    cache.get("a.test")
    cache.get("c.test")  # evicts b.test, the least recently used
    assert cache.hosts() == ["a.test", "c.test"]
    now[0] += LEAF_REFRESH.total_seconds()
    assert cache.get("a.test") is not first
    assert built == ["a.test", "b.test", "c.test", "a.test"]
    assert len(keys) == 1  # one leaf key for the process, none per host


def test_bundle_is_roots_then_our_ca(tmp_path):
    ca = make(tmp_path)
    roots = tmp_path / "roots.pem"
    roots.write_bytes(b"-----ROOTS-----")
    write_bundle(ca, str(tmp_path / "bundle.pem"), str(roots))
    assert (tmp_path / "bundle.pem").read_bytes() == b"-----ROOTS-----\n" + ca.pem
