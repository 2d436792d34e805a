"""
Limited mode on the HTTP listener: a read-only request that names a write
through a method-override header field or a C{_method} query parameter is
refused before anything is dialled (SPEC §4.4).
"""

from __future__ import annotations

import json

import pytest

from codex_proxy.model import Mode
from codex_proxy.policy import Policy
from support.http import ALLOW, Harness

LIMITED = Policy.build(mode=Mode.LIMITED, allowed=ALLOW)


@pytest.mark.parametrize(
    "target, field",
    [
        ("http://origin.test/items/1", b"X-HTTP-Method-Override: DELETE\r\n"),
        ("http://origin.test/items/1", b"X-HTTP-Method: put\r\n"),
        ("http://origin.test/items/1", b"x-method-override: PATCH\r\n"),
        ("http://origin.test/items/1?_method=DELETE", b""),
        ("/items/1?a=1&_method=post", b""),
    ],
)
def test_a_method_override_naming_a_write_is_method_not_allowed(trickle, target, field):
    h = Harness(trickle, policy=LIMITED)
    h.send(b"GET " + target.encode() + b" HTTP/1.1\r\nHost: origin.test\r\n" + field + b"\r\n")
    status, headers, body = h.response()
    assert status == 403
    assert headers["x-proxy-error"] == "blocked-by-method-policy"
    assert json.loads(body)["reason"] == "method_not_allowed"
    assert h.dials() == []
    [event] = h.auditor.events
    assert event["network.policy.source"] == "mode_guard"


def test_a_read_only_override_is_forwarded(trickle):
    h = Harness(trickle, policy=LIMITED)
    h.send(
        b"GET http://origin.test/?_method=HEAD HTTP/1.1\r\nHost: origin.test\r\n"
        b"X-HTTP-Method-Override: GET\r\n\r\n"
    )
    assert h.dials() == [("203.0.114.10", 80)]
