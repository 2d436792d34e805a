"""
Tests for L{codex_proxy.domains}: host normalisation, pattern parsing and
matching (SPEC §3).
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codex_proxy.domains import (
    DomainSet,
    InvalidHost,
    Pattern,
    PatternError,
    PatternKind,
    normalize_host,
    parse_pattern,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("example.com", "example.com"),
        ("  Example.COM  ", "example.com"),
        ("example.com.", "example.com"),
        ("example.com..", "example.com"),
        ("example.com:443", "example.com"),
        ("EXAMPLE.com.:8080", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("ＥＸＡＭＰＬＥ。com", "example.com"),
        ("_dmarc.bücher.example", "_dmarc.xn--bcher-kva.example"),
        ("under_score.example", "under_score.example"),
        ("localhost.", "localhost"),
        ("LocalHost", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0X7F.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f000001:443", "127.0.0.1"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("[::1]:8080", "::1"),
        ("0:0::1", "::1"),
        ("::FFFF:7f00:1", "::ffff:7f00:1"),
        ("[::ffff:127.0.0.1]:80", "::ffff:7f00:1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
    ],
)
def test_normalize_host(raw, expected):
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        ".",
        "a..b",
        ".example.com",
        "exa mple.com",
        "example.com/path",
        "user@example.com",
        "*.example.com",
        "example.com:",
        "example.com:http",
        "[::1",
        "[::1]x",
        "[::1]:",
        "[example.com]",
        "[127.0.0.1]",
        "fe80::1%eth0",
        "[fe80::1%25eth0]",
        "1::2::3",
        "a" * 64 + ".example",
        ".".join(["a" * 60] * 5),
        "08",
        "0x",
        "1.2.3.4.5",
        "256.0.0.1",
        "example.123",
        "xn--.example\u0000",
        "exa\u200dmple.com",
    ],
)
def test_invalid_hosts(raw):
    with pytest.raises(InvalidHost):
        normalize_host(raw)


def test_invalid_host_message_names_the_problem():
    with pytest.raises(InvalidHost, match=r"empty label in 'a\.\.b'"):
        normalize_host("a..b")


def test_longest_valid_name_is_accepted():
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert normalize_host(name + ".") == name


_HOST_CHARS = "aAbü.-_:[]0x9 ％。１*"


@given(
    st.one_of(
        st.text(alphabet=_HOST_CHARS, max_size=20),
        st.lists(st.sampled_from(["a", "Bü", "xn--a", "0", "0x1f", "127", "_s"]),
                 min_size=1, max_size=5).map(".".join),
        st.ip_addresses().map(str),
        st.ip_addresses(v=6).map(lambda ip: f"[{ip}]:443"),
    )
)
def test_normalize_host_is_idempotent(raw):
    try:
        once = normalize_host(raw)
    except InvalidHost:
        return
    assert normalize_host(once) == once


@pytest.mark.parametrize(
    "text, kind, domain, canonical",
    [
        ("example.com", PatternKind.EXACT, "example.com", "example.com"),
        ("Example.COM.", PatternKind.EXACT, "example.com", "example.com"),
        ("*.example.com", PatternKind.SUBDOMAINS, "example.com", "*.example.com"),
        ("**.Example.com", PatternKind.APEX_AND_SUBDOMAINS, "example.com",
         "**.example.com"),
        (" *.bücher.example ", PatternKind.SUBDOMAINS, "xn--bcher-kva.example",
         "*.xn--bcher-kva.example"),
        ("*.com", PatternKind.SUBDOMAINS, "com", "*.com"),
        ("localhost", PatternKind.EXACT, "localhost", "localhost"),
        ("10.0.0.1", PatternKind.EXACT, "10.0.0.1", "10.0.0.1"),
        ("127.1", PatternKind.EXACT, "127.0.0.1", "127.0.0.1"),
        ("::1", PatternKind.EXACT, "::1", "::1"),
        ("[::1]", PatternKind.EXACT, "::1", "::1"),
        ("[0:0::1]", PatternKind.EXACT, "::1", "::1"),
    ],
)
def test_parse_pattern(text, kind, domain, canonical):
    pattern = parse_pattern(text)
    assert pattern == Pattern(kind, domain)
    assert pattern.text == canonical


@pytest.mark.parametrize(
    "text, message",
    [
        ("*", "the global pattern '*' is not allowed"),
        ("**", "the global pattern '**' is not allowed"),
        ("*.", "the global pattern '*.' is not allowed"),
        ("**.", "the global pattern '**.' is not allowed"),
        ("", "empty host"),
        ("a..b", "empty label in 'a..b'"),
        ("***.example.com", "only allowed as a leading"),
        ("*example.com", "only allowed as a leading"),
        ("a*.example.com", "only allowed as a leading"),
        ("a.*.example.com", "only allowed as a leading"),
        ("*.*.example.com", "only allowed as a leading"),
        ("example.*", "only allowed as a leading"),
        ("*.10.0.0.1", "wildcards cannot apply to the IP address"),
        ("*.0.0.1", "wildcards cannot apply to the IP address"),
        ("**.[::1]", "wildcards cannot apply to the IP address"),
        ("*.::1", "wildcards cannot apply to the IP address"),
        ("example.com:0", "invalid port"),
        ("example.com:", "invalid port"),
        ("[::1]:65536", "invalid port"),
        ("example.com:https", "invalid port"),
        ("*:22", "only denied_domains accepts"),
        ("**:22", "global pattern"),
        ("exa mple.com", "invalid character"),
        ("example.com/", "invalid character"),
    ],
)
def test_rejected_patterns(text, message):
    with pytest.raises(PatternError) as raised:
        parse_pattern(text)
    assert message in str(raised.value)


def _set(*texts):
    return DomainSet(parse_pattern(text) for text in texts)


@pytest.mark.parametrize(
    "patterns, host, expected",
    [
        (["example.com"], "example.com", "example.com"),
        (["example.com"], "a.example.com", None),
        (["example.com"], "notexample.com", None),
        (["*.example.com"], "example.com", None),
        (["*.example.com"], "a.example.com", "*.example.com"),
        (["*.example.com"], "a.b.example.com", "*.example.com"),
        (["*.example.com"], "aexample.com", None),
        (["**.example.com"], "example.com", "**.example.com"),
        (["**.example.com"], "a.b.example.com", "**.example.com"),
        (["**.example.com"], "com", None),
        (["*.com"], "example.com", "*.com"),
        # Most specific wins: exact, then the longest suffix.
        (["*.example.com", "api.example.com"], "api.example.com", "api.example.com"),
        (["**.example.com", "*.api.example.com"], "x.api.example.com",
         "*.api.example.com"),
        (["*.com", "**.example.com"], "a.example.com", "**.example.com"),
        (["*.com", "**.example.com"], "example.com", "**.example.com"),
        (["**.example.com", "example.com"], "example.com", "example.com"),
        (["**.example.com", "*.example.com"], "a.example.com", "*.example.com"),
        (["*.example.com", "**.example.com"], "a.example.com", "*.example.com"),
        # IP literals match exact IP patterns only.
        (["127.0.0.1"], "127.0.0.1", "127.0.0.1"),
        (["::1"], "::1", "::1"),
        (["**.localhost"], "localhost", "**.localhost"),
    ],
)
def test_match(patterns, host, expected):
    found = _set(*patterns).match(host)
    assert (found and found.text) == expected


def test_ip_hosts_never_match_suffix_wildcards():
    """
    Even a wildcard built around the parser cannot match an IP literal.
    """
    domains = DomainSet(
        [Pattern(PatternKind.SUBDOMAINS, "0.0.1"), Pattern(PatternKind.SUBDOMAINS, "1")]
    )
    assert domains.match("127.0.0.1") is None
    assert domains.match("::1") is None


def test_exact_only_counts_exact_patterns():
    domains = _set("localhost", "**.example.com", "*.internal", "10.0.0.1")
    assert domains.exact("localhost")
    assert domains.exact("10.0.0.1")
    assert not domains.exact("example.com")
    assert not domains.exact("a.internal")
    assert not domains.exact("10.0.0.2")


def test_len_iter_and_duplicates():
    domains = _set("a.com", "*.a.com", "A.com.", "**.b.com")
    assert len(domains) == 3
    assert [p.text for p in domains] == ["a.com", "*.a.com", "**.b.com"]
    assert domains == _set("**.b.com", "*.a.com", "a.com")
    assert len(DomainSet([])) == 0


_LABELS = st.sampled_from(["a", "b", "example", "com", "x-y"])
_NAMES = st.lists(_LABELS, min_size=1, max_size=4).map(".".join)


@given(domain=_NAMES, host=_NAMES)
def test_apex_and_subdomains_is_exact_plus_subdomains(domain, host):
    both = _set("**." + domain).match(host) is not None
    exact = _set(domain).match(host) is not None
    subdomains = _set("*." + domain).match(host) is not None
    assert both == (exact or subdomains)


def test_hundred_thousand_patterns():
    patterns = []
    for i in range(100_000):
        kind = ("", "*.", "**.")[i % 3]
        patterns.append(parse_pattern(f"{kind}h{i}.zone{i % 97}.example"))
    domains = DomainSet(patterns)
    assert len(domains) == 100_000

    assert domains.match("h0.zone0.example").text == "h0.zone0.example"
    assert domains.match("deep.h1.zone1.example").text == "*.h1.zone1.example"
    assert domains.match("h2.zone2.example").text == "**.h2.zone2.example"
    assert domains.match("a.b.h99998.zone88.example").text == "**.h99998.zone88.example"
    assert domains.match("h99999.zone89.example").text == "h99999.zone89.example"
    # Misses: apex of a '*.' pattern, subdomain of an exact one, wrong zone,
    # unknown names.
    assert domains.match("h1.zone1.example") is None
    assert domains.match("a.h0.zone0.example") is None
    assert domains.match("h0.zone1.example") is None
    assert domains.match("h100000.zone100.example") is None
    assert domains.match("zone0.example") is None
    assert domains.match("example") is None
