"""
Tests for L{codex_proxy.policy}: the synchronous steps of SPEC §4.1 and the
limited-mode guard of SPEC §4.4.
"""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codex_proxy.domains import PatternError
from codex_proxy.model import Decision, Mode, Protocol, ProxyRequest, Reason, Source
from codex_proxy._httpfields import watched_fields
from codex_proxy._httptarget import method_overrides
from codex_proxy.policy import Policy, admit, decide, is_local_target


def _request(host, port=443, protocol=Protocol.HTTPS_CONNECT, **kwargs):
    return ProxyRequest(protocol=protocol, host=host, port=port, **kwargs)


def _get(host, method="GET", **kwargs):
    return ProxyRequest(
        protocol=Protocol.HTTP, host=host, port=80, method=method, **kwargs
    )


def test_disabled_proxy_denies_everything_first():
    policy = Policy.build(enabled=False, allowed=["example.com"])
    for host in ["example.com", "", "a..b"]:
        verdict = decide(policy, _request(host))
        assert verdict.decision is Decision.DENY
        assert verdict.reason is Reason.PROXY_DISABLED
        assert verdict.source is Source.PROXY_STATE


@pytest.mark.parametrize(
    "host", ["", "  ", "a..b", "exa mple.com", "08", "[::1", "*.x"]
)
def test_invalid_host(host):
    verdict = decide(Policy.build(allowed=["**.example.com"]), _request(host))
    assert verdict.reason is Reason.INVALID_HOST
    assert verdict.source is Source.BASELINE_POLICY
    assert verdict.host == host


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_invalid_port(port):
    policy = Policy.build(allowed=["example.com"])
    verdict = decide(policy, _request("example.com", port))
    assert verdict.reason is Reason.INVALID_HOST


@pytest.mark.parametrize("port", [1, 65535])
def test_edge_ports_are_valid(port):
    policy = Policy.build(allowed=["example.com"])
    assert decide(policy, _request("example.com", port)).allowed


@pytest.mark.parametrize(
    "allowed, denied, host, reason, matched",
    [
        # Step 3: the denylist always wins.
        (["**.example.com"], ["bad.example.com"], "bad.example.com", Reason.DENIED,
         "bad.example.com"),
        (["**.example.com"], ["*.example.com"], "x.y.example.com", Reason.DENIED,
         "*.example.com"),
        (["localhost"], ["localhost"], "localhost", Reason.DENIED, "localhost"),
        (["127.0.0.1"], ["127.0.0.1"], "2130706433", Reason.DENIED, "127.0.0.1"),
        # Step 4: local literals need an exact allowlist entry.
        ([], [], "localhost", Reason.NOT_ALLOWED_LOCAL, None),
        (["**.localhost"], [], "localhost", Reason.NOT_ALLOWED_LOCAL, None),
        (["*.localhost"], [], "app.localhost", Reason.NOT_ALLOWED_LOCAL, None),
        (["127.0.0.1"], [], "127.0.0.2", Reason.NOT_ALLOWED_LOCAL, None),
        (["127.0.0.1"], [], "::ffff:127.0.0.1", Reason.NOT_ALLOWED_LOCAL, None),
        (["::1"], [], "127.0.0.1", Reason.NOT_ALLOWED_LOCAL, None),
        ([], [], "10.0.0.1", Reason.NOT_ALLOWED_LOCAL, None),
        ([], [], "[fe80::1]", Reason.NOT_ALLOWED_LOCAL, None),
        ([], [], "169.254.169.254", Reason.NOT_ALLOWED_LOCAL, None),
        ([], [], "64:ff9b::a00:1", Reason.NOT_ALLOWED_LOCAL, None),
        ([], [], "2002:7f00:1::1", Reason.NOT_ALLOWED_LOCAL, None),
        # Step 5: allowlist misses.
        ([], [], "example.com", Reason.NOT_ALLOWED, None),
        (["example.com"], [], "api.example.com", Reason.NOT_ALLOWED, None),
        (["*.example.com"], [], "example.com", Reason.NOT_ALLOWED, None),
        ([], [], "8.8.8.8", Reason.NOT_ALLOWED, None),
    ],
)
def test_host_denials(allowed, denied, host, reason, matched):
    verdict = decide(Policy.build(allowed=allowed, denied=denied), _request(host))
    assert verdict.decision is Decision.DENY
    assert verdict.reason is reason
    assert verdict.source is Source.BASELINE_POLICY
    assert verdict.matched == matched


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "2130706433", "017700000001", "0x7f.1", "127.1", "0x7f000001",
     "127.0.0.1.", "127.0.0.1:8080"],
)
def test_inet_aton_spellings_are_judged_as_loopback(host):
    blocked = decide(Policy.build(allowed=["**.example.com"]), _request(host))
    assert blocked.reason is Reason.NOT_ALLOWED_LOCAL
    assert blocked.host == "127.0.0.1"
    unlocked = decide(Policy.build(allowed=["127.0.0.1"]), _request(host))
    assert unlocked.allowed
    assert unlocked.addresses == (ipaddress.IPv4Address("127.0.0.1"),)


@pytest.mark.parametrize(
    "allowed, host",
    [
        (["localhost"], "localhost"),
        (["localhost"], "LOCALHOST."),
        (["app.localhost"], "app.localhost"),
        (["10.0.0.1"], "10.0.0.1"),
        (["[::1]"], "::1"),
        (["::1"], "[0:0::1]:8080"),
        (["::ffff:7f00:1"], "::FFFF:127.0.0.1"),
    ],
)
def test_exact_entries_unlock_local_targets(allowed, host):
    verdict = decide(Policy.build(allowed=allowed), _request(host))
    assert verdict.allowed
    assert verdict.matched == allowed[0].strip("[]")


def test_allow_local_binding_skips_the_local_check_but_not_the_allowlist():
    policy = Policy.build(
        allow_local_binding=True, allowed=["**.localhost", "10.0.0.1"]
    )
    assert decide(policy, _request("localhost")).allowed
    assert decide(policy, _request("a.localhost")).allowed
    assert decide(policy, _request("10.0.0.1")).allowed
    assert decide(policy, _request("10.0.0.2")).reason is Reason.NOT_ALLOWED


def test_allowed_verdict():
    policy = Policy.build(allowed=["*.example.com", "8.8.8.8", "2001:4860:4860::8888"])
    named = decide(policy, _request("API.Example.com.:443"))
    assert named.decision is Decision.ALLOW
    assert named.source is Source.BASELINE_POLICY
    assert named.reason is None
    assert named.host == "api.example.com"
    assert named.matched == "*.example.com"
    assert named.addresses == ()
    assert not named.intercept
    assert decide(policy, _request("8.8.8.8")).addresses == (
        ipaddress.IPv4Address("8.8.8.8"),
    )
    assert decide(policy, _request("[2001:4860:4860:0::8888]")).addresses == (
        ipaddress.IPv6Address("2001:4860:4860::8888"),
    )


def test_idna_hosts_match_a_label_patterns():
    policy = Policy.build(allowed=["bücher.example"])
    verdict = decide(policy, _request("xn--bcher-kva.example"))
    assert verdict.allowed
    assert verdict.matched == "xn--bcher-kva.example"
    assert decide(policy, _request("BÜCHER.example")).allowed


def test_build_rejects_bad_patterns():
    with pytest.raises(PatternError):
        Policy.build(allowed=["*"])
    with pytest.raises(PatternError):
        Policy.build(denied=["a..b"])


_LIMITED = Policy.build(mode=Mode.LIMITED, allowed=["example.com"])
_LIMITED_MITM = Policy.build(mode=Mode.LIMITED, mitm=True, allowed=["example.com"])


@pytest.mark.parametrize(
    "policy, request_, reason",
    [
        (_LIMITED, _get("example.com"), None),
        (_LIMITED, _get("example.com", method="HEAD"), None),
        (_LIMITED, _get("example.com", method="OPTIONS"), None),
        (_LIMITED, _get("example.com", method="POST"), Reason.METHOD_NOT_ALLOWED),
        (_LIMITED, _get("example.com", method="PUT"), Reason.METHOD_NOT_ALLOWED),
        (_LIMITED, _get("example.com", method="DELETE"), Reason.METHOD_NOT_ALLOWED),
        (_LIMITED, _get("example.com", method="TRACE"), Reason.METHOD_NOT_ALLOWED),
        (_LIMITED, _get("example.com", method="get"), Reason.METHOD_NOT_ALLOWED),
        (_LIMITED, _get("example.com", method=None), Reason.METHOD_NOT_ALLOWED),
        (_LIMITED, _get("example.com", has_body=True), Reason.METHOD_NOT_ALLOWED),
        (_LIMITED, _get("example.com", upgrade=True), Reason.METHOD_NOT_ALLOWED),
        (_LIMITED, _request("example.com", protocol=Protocol.HTTPS, method="POST"),
         Reason.METHOD_NOT_ALLOWED),
        (_LIMITED, _request("example.com", protocol=Protocol.HTTPS, method="GET"),
         None),
        (_LIMITED, _request("example.com"), Reason.MITM_REQUIRED),
        (_LIMITED_MITM, _request("example.com"), None),
        (_LIMITED_MITM, _request("example.com", port=80, protocol=Protocol.SOCKS5_TCP),
         Reason.METHOD_NOT_ALLOWED),
        (_LIMITED_MITM, _request("example.com", protocol=Protocol.SOCKS5_TCP), None),
        (_LIMITED, _request("example.com", protocol=Protocol.SOCKS5_TCP),
         Reason.METHOD_NOT_ALLOWED),
        (_LIMITED_MITM, _request("example.com", protocol=Protocol.SOCKS5_UDP),
         Reason.METHOD_NOT_ALLOWED),
        (_LIMITED, _request("example.com", protocol=Protocol.SOCKS5_UDP),
         Reason.METHOD_NOT_ALLOWED),
    ],
)
def test_limited_mode_guard(policy, request_, reason):
    verdict = decide(policy, request_)
    if reason is None:
        assert verdict.allowed
        assert verdict.source is Source.BASELINE_POLICY
    else:
        assert verdict.decision is Decision.DENY
        assert verdict.reason is reason
        assert verdict.source is Source.MODE_GUARD
        assert verdict.matched == "example.com"


def test_limited_mode_intercepts_connect_only_with_mitm():
    assert decide(_LIMITED_MITM, _request("example.com")).intercept
    assert decide(_LIMITED_MITM, _request("example.com", protocol=Protocol.SOCKS5_TCP)).intercept
    assert not decide(_LIMITED_MITM, _get("example.com")).intercept


@pytest.mark.parametrize("address", ["203.0.114.10", "2001:4860::8888"])
def test_limited_mode_refuses_socks5_https_given_only_an_address(address):
    # Its SNI could only name a host other than the tunnel's: no handshake
    # could succeed, so it is refused before anything is dialled (REP 0x02).
    policy = Policy.build(mode=Mode.LIMITED, mitm=True, allowed=[address])
    verdict = decide(policy, _request(address, protocol=Protocol.SOCKS5_TCP))
    assert (verdict.decision, verdict.reason, verdict.source) == (
        Decision.DENY,
        Reason.METHOD_NOT_ALLOWED,
        Source.MODE_GUARD,
    )
    assert decide(policy, _request(address)).intercept


@pytest.mark.parametrize(
    "request_",
    [
        _get("example.com", method="POST", has_body=True),
        _get("example.com", method="TRACE", upgrade=True),
        _request("example.com", protocol=Protocol.SOCKS5_TCP),
        _request("example.com", protocol=Protocol.SOCKS5_UDP),
        _request("example.com"),
    ],
)
def test_full_mode_has_no_guard(request_):
    policy = Policy.build(mode=Mode.FULL, mitm=True, allowed=["example.com"])
    verdict = decide(policy, request_)
    assert verdict.allowed
    assert not verdict.intercept


def test_host_decisions_come_before_the_mode_guard():
    post = _get("unlisted.example", method="POST")
    assert decide(_LIMITED, post).reason is Reason.NOT_ALLOWED
    assert decide(_LIMITED, _get("localhost", method="POST")).reason is (
        Reason.NOT_ALLOWED_LOCAL
    )


def test_admit_applies_the_mode_guard_to_overrides():
    post = _get("unlisted.example", method="POST")
    refused = admit(_LIMITED, post, "unlisted.example", override=True)
    assert refused.reason is Reason.METHOD_NOT_ALLOWED
    assert refused.source is Source.MODE_GUARD
    allowed = admit(_LIMITED_MITM, _request("unlisted.example"), "unlisted.example",
                    override=True)
    assert allowed.allowed and allowed.override and allowed.intercept


@pytest.mark.parametrize(
    "host, local",
    [
        ("localhost", True),
        ("x.localhost", True),
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("::1", True),
        ("::ffff:7f00:1", True),
        ("fd00::1", True),
        ("8.8.8.8", False),
        ("2606:4700::1111", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_is_local_target(host, local):
    assert is_local_target(host) is local


_LABELS = st.sampled_from(["a", "b", "example", "com", "localhost"])
_NAMES = st.lists(_LABELS, min_size=1, max_size=3).map(".".join)
_IPS = ["127.0.0.1", "::1", "10.0.0.1", "8.8.8.8"]
_PATTERNS = st.tuples(st.sampled_from(["", "*.", "**."]), _NAMES).map("".join)
_PATTERNS |= st.sampled_from(_IPS)
_HOSTS = _NAMES | st.sampled_from(_IPS + ["2130706433", "[::1]"])


@given(
    host=_HOSTS,
    allowed=st.lists(_PATTERNS, max_size=4),
    extra=st.lists(_PATTERNS, min_size=1, max_size=4),
    denied=st.lists(_PATTERNS, min_size=1, max_size=3),
    local=st.booleans(),
)
def test_adding_allow_patterns_never_unblocks_a_denied_host(
    host, allowed, extra, denied, local
):
    before = Policy.build(allowed=allowed, denied=denied, allow_local_binding=local)
    after = Policy.build(
        allowed=allowed + extra, denied=denied, allow_local_binding=local
    )
    if decide(before, _request(host)).reason is Reason.DENIED:
        assert decide(after, _request(host)).reason is Reason.DENIED


_SOME_POLICY = Policy.build(allowed=["**.example.com", "::1"])


@given(host=st.text(max_size=30), port=st.integers(-10, 70000))
def test_decide_is_total(host, port):
    verdict = decide(_SOME_POLICY, _request(host, port))
    assert verdict.decision in (Decision.ALLOW, Decision.DENY)


@pytest.mark.parametrize("protocol", [Protocol.SOCKS5_TCP, Protocol.SOCKS5_UDP])
@pytest.mark.parametrize(
    "host, reason",
    [
        ("example.com:443", Reason.INVALID_HOST),
        ("[::1]:443", Reason.INVALID_HOST),
        ("127.0.0.1:443", Reason.INVALID_HOST),
        ("example.com\r\n", Reason.INVALID_HOST),
        ("[::1]", None),
        ("example.com", None),
        ("2001:4860::8888", None),
    ],
)
def test_socks_hosts_are_bare_names_or_addresses(protocol, host, reason):
    policy = Policy.build(allowed=["example.com", "2001:4860::8888", "::1"])
    verdict = decide(policy, _request(host, protocol=protocol))
    assert verdict.reason is reason
    if reason is not None:
        assert verdict.host == host


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ((), None),
        (("GET",), None),
        (("HEAD", "OPTIONS"), None),
        (("POST",), Reason.METHOD_NOT_ALLOWED),
        (("GET", "DELETE"), Reason.METHOD_NOT_ALLOWED),
    ],
)
def test_limited_mode_refuses_method_overrides_naming_writes(overrides, reason):
    verdict = decide(_LIMITED, _get("example.com", override_methods=overrides))
    assert verdict.reason is reason
    inner = _request("example.com", protocol=Protocol.HTTPS, method="HEAD",
                     override_methods=overrides)
    assert decide(_LIMITED_MITM, inner).reason is reason
    full = Policy.build(allowed=["example.com"])
    assert decide(full, _get("example.com", override_methods=overrides)).allowed


@pytest.mark.parametrize(
    "headers, target, overrides",
    [
        ((), "/", ()),
        (((b"Accept", b"*/*"),), "/?a=1&b=2", ()),
        (((b"X-HTTP-Method-Override", b"PUT"),), "/", ("PUT",)),
        (((b"x-http-method", b" delete "),), "/", ("DELETE",)),
        (((b"X-Method-Override", b"patch, post"),), "/", ("PATCH", "POST")),
        (((b"X-HTTP-Method-Override", b""),), "/", ()),
        ((), "/items?_method=DELETE", ("DELETE",)),
        ((), "http://origin.test/items?a=1&_method=put#x", ("PUT",)),
        ((), "/items?x=1;_method=post", ("POST",)),
        ((), "/items?%5Fmethod=P%4FST", ("POST",)),
        ((), "/items?_method=+delete+", ("DELETE",)),
        ((), "/items?_METHOD=DELETE", ("DELETE",)),
        ((), "/items?my_method=DELETE&_methods=PUT", ()),
        ((), "/_method=DELETE", ()),
        (((b"X-HTTP-Method-Override", b"GET"),), "/?_method=HEAD", ("GET", "HEAD")),
    ],
)
def test_method_overrides_from_headers_and_query(headers, target, overrides):
    assert method_overrides(watched_fields(headers)[0], target) == overrides
