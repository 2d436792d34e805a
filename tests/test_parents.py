"""
Choosing the parent proxy from the environment (SPEC §7), table-driven.
"""

from __future__ import annotations

import base64

import pytest

from codex_proxy.parents import NoProxy, ParentProxy, from_environ, parse_parent


@pytest.mark.parametrize(
    "no_proxy, host, port, direct",
    [
        ("", "example.com", 80, False),
        ("*", "example.com", 80, True),
        ("example.com", "example.com", 80, True),
        ("example.com", "api.example.com", 443, True),
        ("example.com", "badexample.com", 80, False),
        (".example.com", "example.com", 80, True),
        (".example.com", "a.b.example.com", 80, True),
        ("*.example.com", "a.example.com", 80, True),
        ("EXAMPLE.COM.", "example.com", 80, True),
        ("example.com:8080", "example.com", 8080, True),
        ("example.com:8080", "example.com", 80, False),
        ("10.1.2.3", "10.1.2.3", 80, True),
        ("10.1.2.3", "10.1.2.4", 80, False),
        ("10.0.0.0/8", "10.200.3.4", 443, True),
        ("10.0.0.0/8", "11.0.0.1", 443, False),
        ("::1", "::1", 80, True),
        ("[::1]:8080", "::1", 8080, True),
        ("[::1]:8080", "::1", 80, False),
        ("fd00::/8", "fd12::5", 80, True),
        ("127.1", "127.0.0.1", 80, True),
        ("a.test, b.test", "b.test", 80, True),
        ("a.test b.test", "sub.b.test", 80, True),
        ("a.test,,", "c.test", 80, False),
        ("bad host!", "example.com", 80, False),
        ("10.0.0.0/8", "ten.example", 80, False),
    ],
)
def test_no_proxy_matching(no_proxy, host, port, direct):
    assert NoProxy.parse(no_proxy).matches(host, port) is direct


@pytest.mark.parametrize(
    "environ, http, https",
    [
        ({}, None, None),
        ({"HTTP_PROXY": "http://p1:3128"}, "p1:3128", None),
        ({"HTTPS_PROXY": "http://p2:3128"}, None, "p2:3128"),
        ({"ALL_PROXY": "http://p3:8080"}, "p3:8080", "p3:8080"),
        ({"HTTP_PROXY": "http://p1", "ALL_PROXY": "http://p3"}, "p1:80", "p3:80"),
        ({"HTTP_PROXY": "http://upper:1", "http_proxy": "http://lower:2"}, "upper:1", None),
        ({"http_proxy": "http://lower:2"}, "lower:2", None),
        ({"HTTPS_PROXY": "", "https_proxy": "https://sec"}, None, "sec:443"),
        ({"HTTP_PROXY": "p4:9"}, "p4:9", None),
        ({"ALL_PROXY": "socks5h://127.0.0.1:1080"}, None, None),
        ({"HTTPS_PROXY": "socks5://s:1", "ALL_PROXY": "http://p3"}, "p3:80", "p3:80"),
        ({"HTTP_PROXY": "http://[::1]:3128"}, "[::1]:3128", None),
    ],
)
def test_environment_selection(environ, http, https):
    parents = from_environ(environ)
    assert (parents.http.address if parents.http else None) == http
    assert (parents.https.address if parents.https else None) == https


def test_other_schemes_warn_once_without_the_value():
    parents = from_environ({"ALL_PROXY": "socks5h://user:secret@127.0.0.1:1080"})
    assert len(parents.warnings) == 1
    assert "ALL_PROXY" in parents.warnings[0] and "socks5h" in parents.warnings[0]
    assert "secret" not in parents.warnings[0]


def test_userinfo_becomes_basic_and_is_never_shown():
    parent = parse_parent("http://us%40er:p%3Ass@proxy.test:3128")
    assert parent.authorization == b"Basic " + base64.b64encode(b"us@er:p:ss")
    assert "p:ss" not in repr(parent) and "cDpzcw" not in repr(parent)
    assert parent == ParentProxy("http", "proxy.test", 3128, parent.authorization)


def test_parent_for_honours_no_proxy_and_the_kind_of_target():
    parents = from_environ(
        {
            "HTTP_PROXY": "http://plain.test:1",
            "HTTPS_PROXY": "http://tls.test:2",
            "NO_PROXY": "direct.test,10.0.0.0/8",
        }
    )
    assert parents.parent_for("example.com", 80, tunnel=False).host == "plain.test"
    assert parents.parent_for("example.com", 443, tunnel=True).host == "tls.test"
    assert parents.parent_for("x.direct.test", 443, tunnel=True) is None
    assert parents.parent_for("10.9.9.9", 80, tunnel=False) is None


def test_lower_case_no_proxy_is_used_when_upper_is_absent():
    parents = from_environ({"HTTP_PROXY": "http://p:1", "no_proxy": "skip.test"})
    assert parents.parent_for("skip.test", 80, tunnel=False) is None


@pytest.mark.parametrize("value", ["ftp://p:21", "http://p:notaport", "http://", "http://bad host:1"])
def test_unusable_parent_urls(value):
    with pytest.raises(ValueError, match="scheme|host or port"):
        parse_parent(value)
