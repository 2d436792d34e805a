"""
Secrets the sandbox never sees (SPEC §12): the C{[network.secrets]} tables,
placeholders, substitution in header values, misuse refused with 403
C{blocked-by-secret-policy}, and the value kept out of every message.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re

import attrs
import pytest
from twisted.internet.testing import MemoryReactorClock

from codex_proxy import _httptarget, cli, errors, httpproxy
from codex_proxy._httphead import RequestHeadParser
from codex_proxy._placeholders import named, substitute
from codex_proxy.childenv import child_env
from codex_proxy.config import ConfigError, parse_config
from codex_proxy.model import Protocol, ProxyRequest, Reason
from codex_proxy.policy import Policy, decide
from codex_proxy.secrets import Secrets, read_secret
from codex_proxy.tap import assemble
from support.http import Harness

VALUE = "sk-real-value-0123456789"
TOKEN = "0123456789abcdef0123456789abcdef"
PLACEHOLDER = f"codexproxy-secret-API_KEY-{TOKEN}"
PLACEHOLDER_FORM = re.compile(r"codexproxy-secret-API_KEY-[0-9a-f]{32}\Z")


def _config(secret: str = 'source = "env:REAL_KEY"\nhosts = ["api.example.com"]', extra: str = ""):
    text = (
        "[network]\nenabled = true\n"
        'proxy_url = "127.0.0.1:0"\nenable_socks5 = false\n'
        'allowed_domains = ["api.example.com", "other.example.com", "origin.test"]\n'
        f"{extra}[network.secrets.API_KEY]\n{secret}\n"
    )
    return parse_config(text.encode(), "c.toml")


def _secrets(value: str = VALUE, config=None) -> Secrets:
    return Secrets({"REAL_KEY": value}, token=lambda: TOKEN).load((config or _config()).secrets)


# -- configuration ---------------------------------------------------------------


def test_a_secret_table_is_read_without_its_value():
    config = _config()
    (secret,) = config.secrets
    assert (secret.name, secret.source, secret.hosts) == ("API_KEY", "env:REAL_KEY", ("api.example.com",))
    assert VALUE not in repr(config)


@pytest.mark.parametrize(
    "secret, key, message",
    [
        ('hosts = ["a.example"]', "network.secrets.API_KEY.source", "expected 'env:VARIABLE'"),
        ('source = "vault:x"\nhosts = ["a.example"]', "network.secrets.API_KEY.source", "expected"),
        ('source = "env:"\nhosts = ["a.example"]', "network.secrets.API_KEY.source", "expected"),
        ('source = "file:relative"\nhosts = ["a.example"]', "network.secrets.API_KEY.source", "absolute"),
        ('source = "env:X"', "network.secrets.API_KEY.hosts", "at least one host"),
        ('source = "env:X"\nhosts = ["*"]', "network.secrets.API_KEY.hosts[0]", "global"),
        ('source = "env:X"\nhost = ["a.example"]', "network.secrets.API_KEY.host", "did you mean 'hosts'"),
    ],
)
def test_a_bad_secret_table_names_the_secret_and_key(secret, key, message):
    with pytest.raises(ConfigError) as raised:
        _config(secret)
    assert raised.value.key == key
    assert message in raised.value.message


def test_a_secret_name_must_suit_an_environment_variable():
    text = b'[network]\n[network.secrets.my-key]\nsource = "env:X"\nhosts = ["a.example"]\n'
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "c.toml")
    assert raised.value.key == "network.secrets.my-key"
    assert "environment variable name" in raised.value.message


def test_a_missing_variable_stops_start_naming_the_secret():
    with pytest.raises(ConfigError) as raised:
        Secrets({}).load(_config().secrets)
    assert str(raised.value) == (
        "c.toml: network.secrets.API_KEY.source: environment variable REAL_KEY is not set"
    )


def _file_secret(tmp_path, mode=0o600, text=VALUE + "\n"):
    path = tmp_path / "key"
    path.write_text(text)
    os.chmod(path, mode)
    return _config(f'source = "file:{path}"\nhosts = ["api.example.com"]').secrets[0], path


def test_a_file_secret_is_read_without_its_newline(tmp_path):
    config, _ = _file_secret(tmp_path)
    assert read_secret(config, {}).value == VALUE.encode()


@pytest.mark.parametrize(
    "mode, text, message",
    [
        (0o644, VALUE, "readable by group or others"),
        (0o600, "", "is empty"),
        (0o600, "sk-a\nsk-b\n", "control character"),
    ],
)
def test_an_unsafe_or_unusable_file_is_refused_without_its_value(tmp_path, mode, text, message):
    config, _ = _file_secret(tmp_path, mode, text)
    with pytest.raises(ConfigError) as raised:
        read_secret(config, {})
    assert raised.value.key == "network.secrets.API_KEY.source"
    assert message in str(raised.value)
    assert "sk-" not in str(raised.value)


def test_a_symlinked_file_is_refused(tmp_path):
    config, path = _file_secret(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(path)
    linked = _config(f'source = "file:{link}"\nhosts = ["a.example"]').secrets[0]
    with pytest.raises(ConfigError, match="symlink"):
        read_secret(linked, {})


# -- placeholders ------------------------------------------------------------------


def test_placeholders_are_random_per_start_and_stable_across_rotation():
    config = _config()
    first = Secrets({"REAL_KEY": VALUE}).load(config.secrets)
    second = Secrets({"REAL_KEY": VALUE}).load(config.secrets)
    assert PLACEHOLDER_FORM.match(first.placeholders["API_KEY"])
    assert first.placeholders != second.placeholders

    before = dict(first.placeholders)
    first.install(Secrets({"REAL_KEY": "sk-rotated-value-1234"}).read(config.secrets))
    assert first.placeholders == before
    verdict = _allowed("api.example.com", f"Bearer {before['API_KEY']}")
    assert _header(first.substitute(verdict, _head(f"Bearer {before['API_KEY']}"))) == b"Bearer sk-rotated-value-1234"


def test_a_secret_repr_never_shows_the_value():
    assert VALUE not in repr(Secrets({"REAL_KEY": VALUE}).read(_config().secrets))


# -- finding and replacing placeholders ------------------------------------------------


def _basic(text: str) -> bytes:
    return b"Basic " + base64.b64encode(text.encode())


@pytest.mark.parametrize(
    "field, value",
    [
        (b"Authorization", f"Bearer {PLACEHOLDER}".encode()),
        (b"x-api-key", PLACEHOLDER.encode()),
        (b"Authorization", _basic(f"x-access-token:{PLACEHOLDER}")),
    ],
)
def test_placeholders_are_found_in_header_values(field, value):
    assert named(((b"Host", b"a"), (field, value))) == ("API_KEY",)


def test_proxy_credentials_and_lookalikes_are_no_placeholders():
    headers = (
        (b"Proxy-Authorization", f"Bearer {PLACEHOLDER}".encode()),
        (b"x-api-key", b"codexproxy-secret-API_KEY-short"),
        (b"Authorization", b"Basic !!!"),
    )
    assert named(headers) == ()


def test_substitution_replaces_only_the_placeholder():
    headers = (
        (b"Host", b"api.example.com"),
        (b"Authorization", f"Bearer {PLACEHOLDER}".encode()),
        (b"X-Api-Key", f"{PLACEHOLDER},{PLACEHOLDER}".encode()),
        (b"Accept", b"*/*"),
    )
    assert substitute(headers, {PLACEHOLDER.encode(): VALUE.encode()}) == (
        (b"Host", b"api.example.com"),
        (b"Authorization", f"Bearer {VALUE}".encode()),
        (b"X-Api-Key", f"{VALUE},{VALUE}".encode()),
        (b"Accept", b"*/*"),
    )


def test_substitution_reencodes_basic_credentials():
    headers = ((b"Authorization", _basic(f"x-access-token:{PLACEHOLDER}")),)
    assert substitute(headers, {PLACEHOLDER.encode(): VALUE.encode()}) == (
        (b"Authorization", _basic(f"x-access-token:{VALUE}")),
    )


def _head(authorization: str):
    parser = RequestHeadParser()
    raw = f"GET / HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: {authorization}\r\n\r\n"
    head, _ = parser.feed(raw.encode())
    return head


def _header(head, name=b"authorization"):
    return head.header(name)


def _allowed(host: str, authorization: str, protocol=Protocol.HTTPS):
    verdict = decide(
        _policy(),
        ProxyRequest(protocol, host, 443, method="GET", secrets=named(((b"Authorization", authorization.encode()),))),
    )
    assert verdict.allowed
    return verdict


def test_the_value_goes_only_to_the_secrets_hosts():
    secrets = _secrets()
    bound = secrets.substitute(_allowed("api.example.com", f"Bearer {PLACEHOLDER}"), _head(f"Bearer {PLACEHOLDER}"))
    assert _header(bound) == f"Bearer {VALUE}".encode()
    # A verdict for another host (which the policy refuses first) gets nothing.
    other = attrs.evolve(_allowed("api.example.com", f"Bearer {PLACEHOLDER}"), host="origin.test")
    unchanged = _head(f"Bearer {PLACEHOLDER}")
    assert secrets.substitute(other, unchanged) is unchanged


# -- the policy ------------------------------------------------------------------------


def _policy(**kwargs):
    return Policy.build(
        allowed=["api.example.com", "other.example.com", "origin.test"],
        secrets=[("API_KEY", ["api.example.com"])],
        **kwargs,
    )


def _with_placeholder(host, protocol, port=443):
    return ProxyRequest(protocol, host, port, method="GET", secrets=("API_KEY",))


def test_a_placeholder_to_another_host_is_secret_misuse():
    verdict = decide(_policy(), _with_placeholder("other.example.com", Protocol.HTTPS))
    assert (verdict.allowed, verdict.reason, verdict.secret) == (False, Reason.SECRET_MISUSE, "API_KEY")
    reply = errors.reply_for(verdict.reason)
    assert (reply.status, reply.header) == (403, "blocked-by-secret-policy")


def test_a_placeholder_in_plain_http_is_misuse_unless_dangerously_allowed():
    request = _with_placeholder("api.example.com", Protocol.HTTP, 80)
    assert decide(_policy(), request).reason is Reason.SECRET_MISUSE
    assert decide(_policy(plaintext_secrets=True), request).allowed


def test_a_placeholder_of_an_unknown_secret_is_no_placeholder():
    request = ProxyRequest(Protocol.HTTPS, "other.example.com", 443, method="GET", secrets=("OTHER",))
    assert decide(_policy(), request).allowed


@pytest.mark.parametrize("mode", ["full", "limited"])
def test_tunnels_to_a_secrets_host_are_intercepted_in_any_mode(mode):
    from codex_proxy.model import Mode

    policy = _policy(mode=Mode(mode))
    bound = decide(policy, ProxyRequest(Protocol.HTTPS_CONNECT, "api.example.com", 443))
    other = decide(policy, ProxyRequest(Protocol.HTTPS_CONNECT, "other.example.com", 443))
    assert (bound.allowed, bound.intercept) == (True, True)
    if mode == "full":
        assert (other.allowed, other.intercept) == (True, False)
    else:
        # Without mitm, limited mode still refuses the other tunnels.
        assert other.reason is Reason.MITM_REQUIRED


@pytest.mark.parametrize("mode", ["full", "limited"])
def test_socks5_tunnels_to_port_443_of_a_secrets_host_by_name_are_intercepted(mode):
    from codex_proxy.model import Mode

    policy = Policy.build(
        allowed=["api.example.com", "203.0.113.7"],
        secrets=[("API_KEY", ["api.example.com", "203.0.113.7"])],
        mode=Mode(mode),
    )
    bound = decide(policy, ProxyRequest(Protocol.SOCKS5_TCP, "api.example.com", 443))
    assert (bound.allowed, bound.intercept) == (True, True)
    # Another port, or an address only (the client's TLS names the host it
    # resolved, which no leaf for the address could answer for): full mode
    # relays them opaque, limited mode refuses them.
    for port, host in ((22, "api.example.com"), (443, "203.0.113.7")):
        other = decide(policy, ProxyRequest(Protocol.SOCKS5_TCP, host, port))
        if mode == "full":
            assert (other.allowed, other.intercept) == (True, False), (host, port)
        else:
            assert other.reason is Reason.METHOD_NOT_ALLOWED, (host, port)


# -- the HTTP listener -------------------------------------------------------------------


def _harness(plaintext: bool) -> Harness:
    harness = Harness(False, policy=Policy.build(
        allowed=["origin.test", "other.example.com"],
        secrets=[("API_KEY", ["origin.test"])],
        plaintext_secrets=plaintext,
    ))
    harness.factory.secrets = Secrets({"REAL_KEY": VALUE}, token=lambda: TOKEN).load(
        _config('source = "env:REAL_KEY"\nhosts = ["origin.test"]').secrets
    )
    return harness


def test_plain_requests_carry_the_value_only_when_dangerously_allowed():
    harness = _harness(plaintext=True)
    harness.send(
        f"GET http://origin.test/v1 HTTP/1.1\r\nHost: origin.test\r\nAuthorization: Bearer {PLACEHOLDER}\r\n\r\n".encode()
    )
    _, server = harness.accept()
    sent = server.value()
    assert f"Authorization: Bearer {VALUE}\r\n".encode() in sent
    assert PLACEHOLDER.encode() not in sent


@pytest.mark.parametrize("host", ["origin.test", "other.example.com"])
def test_misuse_is_refused_audited_by_name_and_never_dialled(host):
    harness = _harness(plaintext=False)
    harness.send(
        f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\nx-api-key: {PLACEHOLDER}\r\n\r\n".encode()
    )
    status, headers, body = harness.response()
    assert (status, headers["x-proxy-error"]) == (403, "blocked-by-secret-policy")
    assert json.loads(body)["secret"] == "API_KEY"
    assert harness.dials() == []
    event = harness.auditor.events[-1]
    assert (event["network.policy.reason"], event["network.policy.secret"]) == ("secret_misuse", "API_KEY")
    assert VALUE not in json.dumps(harness.auditor.events) + body.decode()


# -- environment, ports file, check-config ---------------------------------------------------


def test_the_child_environment_holds_placeholders_next_to_the_bundle():
    env = child_env(_config(), ca_bundle="/b.pem", placeholders={"API_KEY": PLACEHOLDER}, http="127.0.0.1:1")
    assert (env["API_KEY"], env["SSL_CERT_FILE"]) == (PLACEHOLDER, "/b.pem")


def test_the_ports_file_and_env_hand_out_placeholders_never_values(tmp_path):
    config = _config()
    ports = tmp_path / "ports.json"
    environ = {"REAL_KEY": VALUE, "CODEX_HOME": str(tmp_path / "home")}
    service = assemble(config, MemoryReactorClock(), str(ports), environ=environ)
    service.startService()
    try:
        document = json.loads(ports.read_text())
        assert PLACEHOLDER_FORM.match(document["placeholders"]["API_KEY"])
        config_path = tmp_path / "config.toml"
        config_path.write_text(
            '[network]\nenabled = true\nproxy_url = "127.0.0.1:0"\nenable_socks5 = false\n'
            '[network.secrets.API_KEY]\nsource = "env:REAL_KEY"\nhosts = ["api.example.com"]\n'
        )
        os.environ["CODEX_HOME"] = environ["CODEX_HOME"]
        out, err = io.StringIO(), io.StringIO()
        try:
            code = cli.main(["env", "--config", str(config_path), "--ports-file", str(ports), "--shell", "json"], out, err)
        finally:
            del os.environ["CODEX_HOME"]
        env = json.loads(out.getvalue())
        assert code == 0
        assert env["API_KEY"] == document["placeholders"]["API_KEY"]
        assert env["SSL_CERT_FILE"].endswith("ca-bundle.pem")
        assert VALUE not in ports.read_text() + out.getvalue() + err.getvalue()
    finally:
        service.stopService()


def test_env_without_the_ports_file_says_where_placeholders_are(tmp_path, monkeypatch):
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        '[network]\nenabled = true\n'
        '[network.secrets.API_KEY]\nsource = "env:REAL_KEY"\nhosts = ["api.example.com"]\n'
    )
    monkeypatch.setenv("CODEX_HOME", str(tmp_path / "home"))
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["env", "--config", str(config_path)], out, err) == 0
    assert "API_KEY" not in out.getvalue()
    assert "no placeholder for API_KEY: pass the running proxy's --ports-file" in err.getvalue()


def test_check_config_shows_source_and_hosts_never_the_value(tmp_path, monkeypatch):
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        '[network]\nenabled = true\n'
        '[network.secrets.API_KEY]\nsource = "env:REAL_KEY"\nhosts = ["api.example.com"]\n'
    )
    monkeypatch.setenv("REAL_KEY", VALUE)
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["check-config", str(config_path)], out, err) == 0
    assert "  API_KEY  from env:REAL_KEY  to api.example.com\n" in out.getvalue()
    assert re.search(r"\ndangerously_allow_plaintext_secrets: +false \(default\)\n", out.getvalue())
    assert VALUE not in out.getvalue() + err.getvalue()


def test_check_config_refuses_a_secret_it_cannot_read(tmp_path, monkeypatch):
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        '[network]\nenabled = true\n'
        '[network.secrets.API_KEY]\nsource = "env:REAL_KEY"\nhosts = ["api.example.com"]\n'
    )
    monkeypatch.delenv("REAL_KEY", raising=False)
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["check-config", str(config_path)], out, err) == 1
    assert "network.secrets.API_KEY.source: environment variable REAL_KEY is not set" in err.getvalue()


# -- reloads ------------------------------------------------------------------------------


def test_a_reload_rotates_values_keeps_placeholders_and_a_failed_one_keeps_the_old(tmp_path):
    import functools

    from twisted.internet import defer

    from codex_proxy.policy import policy_from_config
    from codex_proxy.policyservice import PolicyService
    from codex_proxy.policystate import PolicyState
    from codex_proxy.sources import SourcePaths, effective_config, load_sources
    from codex_proxy.testing import RecordingAuditor, StaticResolver

    key = tmp_path / "key"
    key.write_text(VALUE)
    os.chmod(key, 0o600)
    path = tmp_path / "config.toml"
    path.write_text(
        '[network]\nenabled = true\nallowed_domains = ["api.example.com"]\n'
        f'[network.secrets.API_KEY]\nsource = "file:{key}"\nhosts = ["api.example.com"]\n'
    )
    paths = SourcePaths(str(path), None, None)
    sources = load_sources(paths)
    compile = functools.partial(policy_from_config, realpath=os.path.realpath)
    clock = MemoryReactorClock()
    service = PolicyService(
        compile(effective_config(sources)), resolver=StaticResolver({}), clock=clock,
        auditor=RecordingAuditor(clock.seconds),
    )
    secrets = Secrets({}).load(effective_config(sources).secrets)
    state = PolicyState(
        service, sources, paths, compile=compile, run_in_thread=defer.maybeDeferred, secrets=secrets
    )
    placeholder = secrets.placeholders["API_KEY"]

    def sent() -> bytes:
        authorization = f"Bearer {placeholder}"
        verdict = decide(service.policy, ProxyRequest(
            Protocol.HTTPS, "api.example.com", 443, method="GET",
            secrets=named(((b"Authorization", authorization.encode()),)),
        ))
        return _header(secrets.substitute(verdict, _head(authorization)))

    def reload() -> bool:
        results: list = []
        state.reload().addCallback(results.append)
        return results[0]

    key.write_text("sk-rotated-value-98765\n")
    assert reload() is True
    assert sent() == b"Bearer sk-rotated-value-98765"
    assert secrets.placeholders == {"API_KEY": placeholder}

    os.chmod(key, 0o644)
    assert reload() is False
    assert sent() == b"Bearer sk-rotated-value-98765"


def test_explain_names_the_secrets_a_tunnel_carries(tmp_path):
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        '[network]\nenabled = true\nallowed_domains = ["api.example.com", "other.example.com"]\n'
        '[network.secrets.API_KEY]\nsource = "env:REAL_KEY"\nhosts = ["api.example.com"]\n'
    )
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["explain", "--config", str(config_path), "https://api.example.com/"], out, err) == 0
    assert "tunnel:" in out.getvalue()
    assert "secrets:     API_KEY: placeholders in header values get the values" in out.getvalue()
    out = io.StringIO()
    cli.main(["explain", "--config", str(config_path), "https://other.example.com/"], out, err)
    assert "\nsecrets:" not in out.getvalue() and "\ntunnel:" not in out.getvalue()


def test_a_secret_that_cannot_be_loaded_stops_start_up_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        assemble(_config(), MemoryReactorClock(), environ={"CODEX_HOME": str(tmp_path)})
    assert exited.value.code == 1
    assert capsys.readouterr().err == (
        "codexproxy: config error: c.toml: network.secrets.API_KEY.source:"
        " environment variable REAL_KEY is not set\n"
    )


def test_the_basic_scheme_is_matched_in_any_case():
    value = b"bAsIc " + base64.b64encode(f"u:{PLACEHOLDER}".encode())
    assert named(((b"Authorization", value),)) == ("API_KEY",)
    assert substitute(((b"Authorization", value),), {PLACEHOLDER.encode(): VALUE.encode()}) == (
        (b"Authorization", b"bAsIc " + base64.b64encode(f"u:{VALUE}".encode())),
    )


def test_heads_are_scanned_for_placeholders_only_while_a_secret_is_configured():
    # Without a secret no placeholder can be misused: the per-request scan
    # of header values is skipped (a placeholder-looking value is then just
    # a value, forwarded as sent).
    head = _head(f"Bearer {PLACEHOLDER}")
    assert _httptarget.request_for(head, None, str).secrets == ("API_KEY",)
    assert _httptarget.request_for(head, None, str, placeholders=False).secrets == ()
    none = Secrets({}, token=lambda: TOKEN)
    configured = Secrets({"REAL_KEY": VALUE}, token=lambda: TOKEN).load(
        _config('source = "env:REAL_KEY"\nhosts = ["origin.test"]').secrets
    )
    for secrets, expected in ((None, ()), (none, ()), (configured, ("API_KEY",))):
        factory = httpproxy.HTTPProxyFactory(None, None, None, secrets=secrets)
        assert _httptarget.request_of(head, None, None, str, factory.placeholders, None).secrets == expected
