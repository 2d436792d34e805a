"""
C{--audit-log}: after mixed traffic through a real proxy the file holds one
flat JSON object per decision, nothing else, and no request path or query.
"""

from __future__ import annotations

import json

FIELDS = {
    "event.name",
    "event.timestamp",
    "network.policy.scope",
    "network.policy.decision",
    "network.policy.source",
    "network.policy.reason",
    "network.transport.protocol",
    "server.address",
    "server.port",
    "http.request.method",
    "client.address",
    "network.policy.override",
}


def test_one_line_per_decision_and_no_path(proxy_factory, origin, curl, tmp_path):
    log = tmp_path / "audit.jsonl"
    proxy = proxy_factory(
        {"denied_domains": ["denied.example"], "mode": "limited"},
        args=("--audit-log", str(log)),
    )
    via = proxy.http_url
    port = origin.port
    results = [
        curl.run(origin.url("/bytes/10"), proxy=via),  # allow
        curl.run("http://unlisted.example/private/path?q=s3cret", proxy=via),  # not_allowed
        curl.run("http://denied.example/x", proxy=via),  # denied
        curl.run("http://10.0.0.1/x", proxy=via),  # not_allowed_local
        curl.run(origin.url("/upload"), "-d", "s3cret", proxy=via),  # method (limited)
    ]
    assert [r.status for r in results] == [200, 403, 403, 403, 403]
    proxy.stop()

    text = log.read_text()
    assert "s3cret" not in text and "/bytes" not in text and "/private" not in text
    events = [json.loads(line) for line in text.splitlines()]
    assert len(events) == len(results)
    assert all(set(event) == FIELDS for event in events)
    assert [
        (
            e["server.address"],
            e["server.port"],
            e["network.policy.decision"],
            e["network.policy.reason"],
            e["network.policy.scope"],
        )
        for e in events
    ] == [
        ("127.0.0.1", port, "allow", "allowed", "domain"),
        ("unlisted.example", 80, "deny", "not_allowed", "domain"),
        ("denied.example", 80, "deny", "denied", "domain"),
        ("10.0.0.1", 80, "deny", "not_allowed_local", "domain"),
        ("127.0.0.1", port, "deny", "method_not_allowed", "non_domain"),
    ]
