"""
Named clients (SPEC §11): the C{clients} table, per-client policies, and
authentication on both listeners over in-memory transports.
"""

from __future__ import annotations

import base64
import json
import os

import pytest
from hypothesis import given, strategies as st
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.python.failure import Failure

from codex_proxy import _socks5wire as wire
from codex_proxy.childenv import EnvError, child_env
from codex_proxy.config import ConfigError, parse_config
from codex_proxy.connections import Connections
from codex_proxy.policy import Policy, policy_from_config
from codex_proxy.testing import StaticResolver
from support.http import PUBLIC, Harness as HTTPHarness
from support.socks import Harness as SOCKSHarness, connect
from support.http import HalfCloseTransport

TOKEN_A = "alpha-token-0123456789"
TOKEN_B = "bravo-token-0123456789"

BASE = f"""
[network]
enabled = true
proxy_url = "127.0.0.1:3128"
socks_url = "127.0.0.1:8081"
allowed_domains = ["origin.test", "127.0.0.1"]
denied_domains = ["bad.example.com"]

[network.clients.agent-a]
token = "{TOKEN_A}"
allowed_domains = ["**.example.com"]

[network.clients.agent-b]
token = "{TOKEN_B}"
denied_domains = ["origin.test"]
"""


RESOLVER = {"origin.test": [PUBLIC], "www.example.com": [PUBLIC]}


def compiled(text: str = BASE) -> Policy:
    return policy_from_config(parse_config(text.encode(), "c.toml"), os.path.realpath)


def basic(name: str, token: str) -> bytes:
    return b"Proxy-Authorization: Basic " + base64.b64encode(f"{name}:{token}".encode()) + b"\r\n"


def get(host: str, auth: bytes = b"") -> bytes:
    return f"GET http://{host}/p HTTP/1.1\r\nHost: {host}\r\n".encode() + auth + b"\r\n"


def secret_free(*texts: object) -> None:
    for text in texts:
        for token in (TOKEN_A, TOKEN_B):
            assert token not in str(text)
            assert base64.b64encode(token.encode()).decode()[:12] not in str(text)


# -- configuration ------------------------------------------------------------


def test_clients_are_read_with_their_overlays():
    config = parse_config(BASE.encode(), "c.toml")
    a, b = config.clients
    assert (a.name, a.allowed_domains, b.denied_domains) == ("agent-a", ("**.example.com",), ("origin.test",))
    assert config.require_client_auth
    assert config.limits.max_connections_per_client == 1024
    secret_free(repr(config))


@pytest.mark.parametrize(
    "extra, key, words",
    [
        ('[network.clients."a b"]\ntoken = "0123456789abcdefg"', 'network.clients."a b"', "1 to 64"),
        ("[network.clients.c]\nmode = 'limited'", "network.clients.c.token", "token or token_file"),
        ("[network.clients.c]\ntoken = 'short'", "network.clients.c.token", "16 characters"),
        ("[network.clients.c]\ntoken = '0123456789abcdefg'\ncolour = 1", "network.clients.c.colour", "unknown"),
        ("[network.clients.c]\ntoken = '0123456789abcdefg'\nallowed_domains = ['*']", "network.clients.c.allowed_domains[0]", "*"),
    ],
)
def test_bad_client_tables_name_the_key(extra, key, words):
    with pytest.raises(ConfigError) as e:
        parse_config((BASE + extra).encode(), "c.toml")
    assert e.value.key == key
    assert words in e.value.message
    secret_free(str(e.value))


def test_a_client_may_not_be_less_strict_than_the_base():
    text = BASE.replace('enabled = true', 'enabled = true\nmode = "limited"') + (
        "[network.clients.c]\ntoken = '0123456789abcdefg'\nmode = 'full'\n"
    )
    with pytest.raises(ConfigError) as e:
        parse_config(text.encode(), "c.toml")
    assert e.value.key == "network.clients.c.mode"
    assert "network.mode = 'limited'" in e.value.message


def test_require_client_auth_without_clients_is_an_error():
    with pytest.raises(ConfigError) as e:
        parse_config(b"[network]\nrequire_client_auth = true\n", "c.toml")
    assert e.value.key == "network.require_client_auth"


def test_client_policies_are_the_base_plus_the_overlay():
    policy = compiled(BASE + "[network.clients.c]\ntoken = '0123456789abcdefg'\nmode = 'limited'\n")
    a, b, c = (policy.for_client(name) for name in ("agent-a", "agent-b", "c"))
    assert a.allowed.match("x.example.com") and not policy.allowed.match("x.example.com")
    assert not b.allowed.match("x.example.com")
    assert b.denied.match("origin.test") and not a.denied.match("origin.test")
    assert c.mode.value == "limited" and policy.mode.value == "full"
    assert policy.for_client(None) is policy and policy.for_client("nobody") is policy


# -- HTTP -------------------------------------------------------------------------


def http(trickle: bool, text: str = BASE) -> HTTPHarness:
    return HTTPHarness(trickle, policy=compiled(text), resolver=StaticResolver(RESOLVER))


@pytest.mark.parametrize("auth", [b"", basic("agent-a", "wrong-token-000000000"), basic("agent-b", TOKEN_A),
                                  b"Proxy-Authorization: Bearer nope\r\n", b"Proxy-Authorization: Basic !!\r\n"])
def test_missing_or_wrong_credentials_get_407_and_nothing_is_dialled(trickle, auth):
    h = http(trickle)
    h.send(get("origin.test", auth))
    status, headers, body = h.response()
    assert status == 407
    assert headers["proxy-authenticate"] == 'Basic realm="codex-proxy"'
    assert headers["x-proxy-error"] == "proxy-auth-required"
    assert json.loads(body)["reason"] == "client_auth_failed"
    assert h.dials() == []
    [event] = h.auditor.events
    assert (event["network.policy.reason"], event["network.policy.decision"], event["network.policy.source"]) == (
        "client_auth_failed", "deny", "proxy_state")
    assert "client.identity" not in event
    secret_free(h.client.value(), h.auditor.events)


@pytest.mark.parametrize("auth", [basic("agent-a", TOKEN_A), f"Proxy-Authorization: Bearer {TOKEN_A}\r\n".encode()])
def test_right_credentials_are_forwarded_without_them(trickle, auth):
    h = http(trickle)
    h.send(get("origin.test", auth))
    assert h.dials() == [(PUBLIC, 80)]
    server, upstream = h.accept()
    assert b"proxy-authorization" not in upstream.value().lower()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert h.response()[0] == 200
    assert h.auditor.events[-1]["client.identity"] == "agent-a"
    secret_free(h.client.value(), h.auditor.events, upstream.value())


def test_one_clients_extra_allow_does_not_open_the_host_to_another(trickle):
    a = http(trickle)
    a.send(get("www.example.com", basic("agent-a", TOKEN_A)))
    assert a.auditor.events[-1]["network.policy.decision"] == "allow"
    b = http(trickle)
    b.send(get("www.example.com", basic("agent-b", TOKEN_B)))
    assert b.response()[0] == 403
    assert b.auditor.events[-1]["network.policy.reason"] == "not_allowed"
    assert b.auditor.events[-1]["client.identity"] == "agent-b"
    # And B's extra deny does not close A's base allow.
    b.client.clear()
    b.send(get("origin.test", basic("agent-b", TOKEN_B)))
    assert b.auditor.events[-1]["network.policy.reason"] == "denied"
    assert b.dials() == []


def test_anonymous_access_keeps_the_base_policy_when_allowed(trickle):
    h = http(trickle, BASE.replace("enabled = true", "enabled = true\nrequire_client_auth = false"))
    h.send(get("www.example.com"))
    assert h.response()[0] == 403
    h.client.clear()
    h.send(get("www.example.com", basic("agent-a", "wrong-token-000000000")))
    assert h.response()[0] == 407
    h.client.clear()
    h.send(get("www.example.com", basic("agent-a", TOKEN_A)))
    assert h.auditor.events[-1]["network.policy.decision"] == "allow"


def test_a_token_rotated_by_reload_refuses_the_old_one_on_the_next_request(trickle):
    h = http(trickle)
    h.send(get("127.0.0.1", basic("agent-a", TOKEN_A)))
    server, _ = h.accept()
    h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    h.client.clear()
    h.service.reload(compiled(BASE.replace(TOKEN_A, "rotated-token-0123456789")))
    h.send(get("127.0.0.1", basic("agent-a", TOKEN_A)))
    assert h.response()[0] == 407
    assert len(h.dials()) == 1


def test_a_connect_tunnel_keeps_its_client(trickle):
    h = http(trickle)
    h.send(b"CONNECT www.example.com:443 HTTP/1.1\r\nHost: www.example.com:443\r\n" + basic("agent-a", TOKEN_A) + b"\r\n")
    assert h.auditor.events[-1]["client.identity"] == "agent-a"
    assert h.auditor.events[-1]["network.policy.decision"] == "allow"


def test_connections_beyond_the_per_client_limit_get_503(trickle):
    h = http(trickle)
    h.factory.connections = Connections(max_per_client=1)
    first = h.factory.buildProtocol(None)
    first.makeConnection(HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5556)))
    first.dataReceived(get("127.0.0.1", basic("agent-a", TOKEN_A)))
    h.proto = h.factory.buildProtocol(None)
    h.client = HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5557))
    h.proto.makeConnection(h.client)
    h.send(get("127.0.0.1", basic("agent-a", TOKEN_A)))
    status, headers, _ = h.response()
    assert (status, headers["x-proxy-error"]) == (503, "proxy-overloaded")
    assert h.auditor.events[-1]["network.policy.reason"] == "too_many_client_connections"
    assert h.auditor.events[-1]["client.identity"] == "agent-a"


# -- SOCKS5 -------------------------------------------------------------------------


def rfc1929(name: str, token: str) -> bytes:
    return bytes([1, len(name)]) + name.encode() + bytes([len(token)]) + token.encode()


def test_socks_selects_only_username_password_when_clients_are_configured(trickle):
    h = SOCKSHarness(trickle, policy=compiled(), resolver=StaticResolver(RESOLVER))
    h.send(b"\x05\x01\x00")
    assert h.client.value() == b"\x05\xff"
    assert h.client.disconnecting


def test_socks_right_token_names_the_client(trickle):
    h = SOCKSHarness(trickle, policy=compiled(), resolver=StaticResolver(RESOLVER))
    h.send(b"\x05\x02\x00\x02" + rfc1929("agent-a", TOKEN_A) + connect("www.example.com", 443))
    assert h.client.value().startswith(b"\x05\x02\x01\x00")
    assert h.dials() == [(PUBLIC, 443)]
    [event] = h.auditor.events
    assert (event["client.identity"], event["network.policy.decision"]) == ("agent-a", "allow")


@pytest.mark.parametrize("name, token", [("agent-a", TOKEN_B), ("nobody", TOKEN_A)])
def test_socks_wrong_token_fails_the_subnegotiation(trickle, name, token):
    h = SOCKSHarness(trickle, policy=compiled(), resolver=StaticResolver(RESOLVER))
    h.send(b"\x05\x01\x02" + rfc1929(name, token) + connect("origin.test", 443))
    assert h.client.value() == b"\x05\x02" + wire.encode_auth_status(False)
    assert h.client.disconnecting
    assert h.dials() == []
    [event] = h.auditor.events
    assert event["network.policy.reason"] == "client_auth_failed"
    secret_free(h.auditor.events)


# -- child environment ---------------------------------------------------------------


def test_env_embeds_the_clients_credentials():
    env = child_env(parse_config(BASE.encode(), "c.toml"), client="agent-a")
    assert env["HTTP_PROXY"] == f"http://agent-a:{TOKEN_A}@127.0.0.1:3128"
    assert env["ALL_PROXY"] == f"socks5h://agent-a:{TOKEN_A}@127.0.0.1:8081"


def test_env_for_an_unknown_client_names_it_and_no_token():
    with pytest.raises(EnvError) as e:
        child_env(parse_config(BASE.encode(), "c.toml"), client="agent-c")
    assert "'agent-c'" in str(e.value) and "agent-a" in str(e.value)
    secret_free(str(e.value))


def test_check_config_lists_clients_and_never_tokens(tmp_path):
    import io

    from codex_proxy.cli import check_config

    path = tmp_path / "c.toml"
    path.write_text(BASE)
    out = io.StringIO()
    check_config(str(path), out)
    text = out.getvalue()
    assert "clients (2):" in text and "agent-a: mode full (base)" in text
    assert "allowed_domains + **.example.com" in text and "denied_domains + origin.test" in text
    secret_free(text)


def test_two_clients_may_not_share_a_token():
    text = BASE + f"[network.clients.c]\ntoken = '{TOKEN_B}'\n"
    with pytest.raises(ConfigError) as e:
        parse_config(text.encode(), "c.toml")
    assert e.value.key == "network.clients.c.token"
    assert "'agent-b'" in e.value.message
    secret_free(str(e.value))


def test_a_managed_allowlist_ignores_client_allows_with_a_warning():
    from codex_proxy.sources import Sources, effective_config, parse_requirements

    requirements = parse_requirements(
        b'[experimental_network]\nallowed_domains = ["origin.test"]\nmanaged_allowed_domains_only = true\n'
        b'mode = "limited"\n',
        "r.toml",
    )
    config = effective_config(Sources(parse_config(BASE.encode(), "c.toml"), requirements))
    assert any("clients.agent-a.allowed_domains ignored" in w for w in config.warnings)
    policy = policy_from_config(config, os.path.realpath)
    a = policy.for_client("agent-a")
    assert not a.allowed.match("x.example.com")
    # The managed ceiling holds for every client.
    assert a.mode.value == "limited"


def test_the_decider_and_blocked_history_see_the_client(trickle):
    from codex_proxy.decider import Deny

    asked = []
    h = http(trickle)
    h.service.decider = lambda request: asked.append(request) or Deny("no")
    h.send(get("elsewhere.example", basic("agent-b", TOKEN_B)))
    assert h.response()[0] == 403
    assert [request.client_identity for request in asked] == ["agent-b"]
    assert [v.request.client_identity for v in h.service.blocked()] == ["agent-b"]


def test_inside_an_intercepted_tunnel_the_tunnels_client_holds(tmp_path, trickle):
    from support.mitm import World, take

    # Only agent-a may reach origin.test: the inner request is decided as agent-a's.
    text = f"""
[network]
enabled = true
mode = "limited"
mitm = true

[network.clients.agent-a]
token = "{TOKEN_A}"
allowed_domains = ["origin.test"]
"""
    w = World(tmp_path, trickle, policy=compiled(text))
    w.proxy.dataReceived(
        b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n" + basic("agent-a", TOKEN_A) + b"\r\n"
    )
    w.accept()
    assert take(w.downstream) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    w.client()
    w.request(b"GET /read HTTP/1.1\r\nHost: origin.test\r\nProxy-Authorization: Bearer stray-value-000000\r\n\r\n")
    seen = w.origin_saw()
    assert seen.startswith(b"GET /read HTTP/1.1\r\n")
    assert b"proxy-authorization" not in seen.lower()
    assert [(e["network.transport.protocol"], e["client.identity"]) for e in w.auditor.events] == [
        ("https_connect", "agent-a"),
        ("https", "agent-a"),
    ]


def test_socks_anonymous_access_when_not_required(trickle):
    text = BASE.replace("enabled = true", "enabled = true\nrequire_client_auth = false")
    h = SOCKSHarness(trickle, policy=compiled(text), resolver=StaticResolver(RESOLVER))
    h.send(b"\x05\x01\x00" + connect("www.example.com", 443))
    assert h.client.value() == b"\x05\x00" + wire.encode_reply(0x02)
    [event] = h.auditor.events
    assert (event["network.policy.reason"], "client.identity" in event) == ("not_allowed", False)


def test_socks_connections_beyond_the_per_client_limit_get_rep_1(trickle):
    h = SOCKSHarness(trickle, policy=compiled(), resolver=StaticResolver(RESOLVER))
    h.factory.connections = Connections(max_per_client=1)
    hello = b"\x05\x01\x02" + rfc1929("agent-a", TOKEN_A) + connect("origin.test", 443)
    first = h.connectClient(5556)
    h.send(hello, first)
    second = h.connectClient(5557)
    h.send(hello, second)
    assert second.transport.value() == b"\x05\x02\x01\x00" + wire.encode_reply(0x01)
    assert h.auditor.events[-1]["network.policy.reason"] == "too_many_client_connections"
    assert h.auditor.events[-1]["client.identity"] == "agent-a"
    # Once the first goes, the client may connect again.
    first.connectionLost(Failure(error.ConnectionDone()))
    third = h.connectClient(5558)
    h.send(hello, third)
    assert third.transport.value() == b"\x05\x02\x01\x00"
    assert h.dials() == [(PUBLIC, 443), (PUBLIC, 443)]


def test_the_embedding_api_env_takes_a_client():
    from twisted.internet.testing import MemoryReactorClock

    from codex_proxy.api import NetworkProxy

    config = parse_config(BASE.encode(), "c.toml")
    proxy = NetworkProxy.builder().config(config).reactor(MemoryReactorClock()).build().result
    assert proxy.env(client="agent-b")["HTTPS_PROXY"] == f"http://agent-b:{TOKEN_B}@127.0.0.1:3128"
    with pytest.raises(EnvError, match="'nobody'"):
        proxy.env(client="nobody")


def test_a_parent_proxy_gets_its_own_credentials_never_the_clients(trickle):
    from codex_proxy.parents import from_environ
    from codex_proxy.upstream import Upstream

    h = http(trickle)
    h.factory.upstream = Upstream(
        h.reactor, 10, parents=from_environ({"HTTP_PROXY": "http://parent:p4ss@127.0.0.9:3128"})
    )
    h.send(get("origin.test", basic("agent-a", TOKEN_A)))
    server, upstream = h.accept()
    sent = upstream.value()
    assert sent.count(b"Proxy-Authorization") == 1
    assert b"Proxy-Authorization: Basic " + base64.b64encode(b"parent:p4ss") + b"\r\n" in sent
    secret_free(sent)


def test_a_connect_without_credentials_gets_407_and_closes(trickle):
    h = http(trickle)
    h.send(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
    status, headers, _ = h.response()
    assert (status, headers["proxy-authenticate"]) == (407, 'Basic realm="codex-proxy"')
    assert h.dials() == []
    assert h.client.disconnecting


def test_a_token_file_is_read_and_must_be_private(tmp_path):
    path = tmp_path / "c.token"
    path.write_text(TOKEN_A + "\n")
    path.chmod(0o600)
    text = f'[network]\n[network.clients.c]\ntoken_file = "{path}"\n'
    assert [c.name for c in parse_config(text.encode(), "c.toml").clients] == ["c"]
    assert compiled(text).credentials.http(basic("c", TOKEN_A)[len("Proxy-Authorization: "):-2]) == (True, "c")
    path.chmod(0o640)
    with pytest.raises(ConfigError) as e:
        parse_config(text.encode(), "c.toml")
    assert e.value.key == "network.clients.c.token_file"
    assert "chmod 600" in e.value.message
    secret_free(str(e.value))


@given(st.binary(max_size=200))
def test_any_proxy_authorization_bytes_are_refused_without_raising(value):
    credentials = compiled().credentials
    assert credentials.http(value) == (False, None)
    assert credentials.http(b"Basic " + base64.b64encode(value)) == (False, None)


def test_udp_datagrams_are_decided_by_the_associations_client(trickle):
    h = SOCKSHarness(trickle, policy=compiled(), resolver=StaticResolver(RESOLVER))
    h.send(b"\x05\x01\x02" + rfc1929("agent-a", TOKEN_A) + connect("0.0.0.0", 7000, wire.CMD_UDP_ASSOCIATE))
    proto = h.reactor.udp[0].protocol
    datagram = b"\x00\x00\x00" + connect("www.example.com", 53)[3:] + b"query"
    proto.datagramReceived(datagram, ("127.0.0.1", 7000))
    # www.example.com is agent-a's own allow: the base policy would drop it.
    assert h.reactor.udp[1].written == [(b"query", (PUBLIC, 53))]
    [event] = h.auditor.events
    assert (event["network.transport.protocol"], event["client.identity"]) == ("socks5_udp", "agent-a")


def test_explain_judges_by_a_clients_own_policy(tmp_path):
    import io

    from codex_proxy.cli import main

    path = tmp_path / "c.toml"
    path.write_text(BASE)
    outputs = []
    for client in ("agent-a", "agent-b"):
        out, err = io.StringIO(), io.StringIO()
        status = main(["explain", "--config", str(path), "--client", client, "http://www.example.com/"], out, err)
        outputs.append((status, out.getvalue()))
    (a_status, a_text), (b_status, b_text) = outputs
    assert (a_status, b_status) == (0, 1)
    assert "client agent-a" in a_text and "network.clients.agent-a.allowed_domains[0]" in a_text
    err = io.StringIO()
    assert main(["explain", "--config", str(path), "--client", "nobody", "http://origin.test/"], io.StringIO(), err) == 2
    assert "'nobody'" in err.getvalue()
    secret_free(a_text, b_text, err.getvalue())


def test_the_env_command_takes_a_client(tmp_path):
    import io

    from codex_proxy.cli import main

    path = tmp_path / "c.toml"
    path.write_text(BASE)
    out = io.StringIO()
    assert main(["env", "--config", str(path), "--client", "agent-b", "--shell", "json"], out, io.StringIO()) == 0
    assert json.loads(out.getvalue())["http_proxy"] == f"http://agent-b:{TOKEN_B}@127.0.0.1:3128"
    out, err = io.StringIO(), io.StringIO()
    assert main(["env", "--config", str(path), "--client", "agent-c"], out, err) == 1
    assert out.getvalue() == "" and "'agent-c'" in err.getvalue()
    secret_free(err.getvalue())


def test_a_connection_counts_for_the_client_it_authenticated_as_last():
    connections = Connections(max_per_client=1)
    first, second = object(), object()
    assert connections.claim(first, "a")
    assert not connections.claim(second, "a")
    # The first connection goes on anonymously (or as another client): a's slot is free.
    assert connections.claim(first, None)
    assert connections.claim(second, "a")
    assert connections.claim(first, "b")
    connections.closed(second)
    assert connections.claim(first, "a")
