"""
The bypass corpus: the loader's validation, and every case replayed in memory
through the HTTP listener (absolute-form and CONNECT) and SOCKS5 (domain and
IP ATYP) with a static resolver: refused as the case expects, nothing
dialled, and a rebinding name dialled only at its first, vetted answer.
The requests and the judging are L{codex_proxy.selftest}'s, so the command
that replays the corpus live is tested here too.
"""

from __future__ import annotations

import io
from typing import Dict, List, Tuple

import pytest
from support.http import HalfCloseTransport as HTTPTransport
from support.http import Harness as HTTPHarness
from support.socks import Harness as SOCKSHarness
from twisted.internet.address import IPv4Address

from codex_proxy import cli, selftest
from codex_proxy.bypass import BLOCKED, DENIED, BypassError, Case, load_corpus
from codex_proxy.policy import Policy
from codex_proxy.testing import StaticResolver

CORPUS = load_corpus()
PORT = 80


def _resolver() -> StaticResolver:
    return StaticResolver(
        {
            case.resolved_name: [str(ip) for ip in case.answers]
            for case in CORPUS.cases
            if case.resolved_name is not None
        }
    )


def _policy() -> Policy:
    return Policy.build(
        allowed=CORPUS.allowed_domains,
        allowed_ranges=CORPUS.allowed_ranges,
        denied_ranges=CORPUS.denied_ranges,
    )


def _ids(cases) -> List[str]:
    return [case.name for case in cases]


HTTP_PROBES = [(case, probe) for case in CORPUS.cases for probe in (selftest.HTTP, selftest.CONNECT)]
SOCKS_PROBES = [
    (case, probe) for case in CORPUS.cases for probe in selftest.probes(case, socks=True)[2:]
]


def _expect_refused(case: Case, probe: str, raw: bytes, resolver: StaticResolver) -> None:
    outcome = selftest.judge(case, probe, raw)
    assert outcome.ok, outcome.seen
    if probe in (selftest.HTTP, selftest.CONNECT):
        if case.expect == BLOCKED:
            assert "(not_allowed_local)" in outcome.seen
        elif case.expect == DENIED:
            assert "(denied)" in outcome.seen
    # Literals and localhost names are never looked up; a name is looked up
    # once per request.
    name = case.resolved_name
    assert resolver.lookups == ([] if name is None else [name] * len(resolver.lookups))


def _http_client(h: HTTPHarness):
    """
    A further client connection to the same listener.
    """
    proto = h.factory.buildProtocol(None)
    transport = HTTPTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5556))
    proto.makeConnection(transport)
    return proto, transport


def _prime_http(h: HTTPHarness, case: Case, probe: str) -> None:
    """
    The first request for a rebinding name: allowed, and dialled only at the
    first answers; then the name rebinds.
    """
    proto, transport = _http_client(h)
    proto.dataReceived(selftest.request_for(case, probe, PORT))
    assert h.dials() == [(str(case.answers[0]), PORT)]
    server, _ = h.accept()
    if probe == selftest.CONNECT:
        assert transport.value().startswith(b"HTTP/1.1 200 ")
    else:
        h.answer(server, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        assert transport.value().endswith(b"\r\n\r\nok")
    h.resolver.set(case.resolved_name, [str(ip) for ip in case.rebind_to])


@pytest.mark.parametrize(
    "case, probe", HTTP_PROBES, ids=[f"{c.name}-{p}" for c, p in HTTP_PROBES]
)
def test_http_listener_refuses_every_case_without_dialling(case, probe):
    h = HTTPHarness(False, policy=_policy(), resolver=_resolver())
    if case.rebind_to:
        _prime_http(h, case, probe)
    dialled = h.dials()
    h.send(selftest.request_for(case, probe, PORT))
    _expect_refused(case, probe, h.client.value(), h.resolver)
    assert h.dials() == dialled  # nothing more than a rebinding name's first answer


def _prime_socks(h: SOCKSHarness, case: Case) -> None:
    proto = h.connectClient(5556)
    h.send(selftest.request_for(case, selftest.SOCKS5, PORT), proto)
    assert h.dials() == [(str(case.answers[0]), PORT)]
    h.accept()
    assert proto.transport.value()[2:4] == b"\x05\x00"  # succeeded
    h.resolver.set(case.resolved_name, [str(ip) for ip in case.rebind_to])


@pytest.mark.parametrize(
    "case, probe", SOCKS_PROBES, ids=[f"{c.name}-{p}" for c, p in SOCKS_PROBES]
)
def test_socks5_listener_refuses_every_case_without_dialling(case, probe):
    h = SOCKSHarness(False, policy=_policy(), resolver=_resolver())
    if case.rebind_to:
        _prime_socks(h, case)
    dialled = h.dials()
    h.send(selftest.request_for(case, probe, PORT))
    _expect_refused(case, probe, h.client.value(), h.resolver)
    assert h.dials() == dialled


def test_rebinding_name_is_dialled_once_at_its_vetted_answer_across_requests():
    (case,) = [c for c in CORPUS.cases if c.rebind_to]
    h = HTTPHarness(False, policy=_policy(), resolver=_resolver())
    _prime_http(h, case, selftest.HTTP)
    for probe in (selftest.HTTP, selftest.CONNECT, selftest.HTTP):
        proto, transport = _http_client(h)
        proto.dataReceived(selftest.request_for(case, probe, PORT))
        assert selftest.judge(case, probe, transport.value()).ok
    assert h.dials() == [(str(case.answers[0]), PORT)]
    assert h.resolver.lookups == [case.resolved_name] * 4


def test_the_corpus_covers_the_issue():
    hosts = {case.host for case in CORPUS.cases}
    for host in [
        "2130706433", "017700000001", "0x7f.1", "127.1", "0.0.0.0", "[::]",
        "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::]",
        "169.254.169.254", "100.100.100.200", "[fd00:ec2::254]", "localhost.",
        "LOCALHOST", "foo.localhost",
    ]:
        assert host in hosts
    assert any(c.answers and not c.live and not c.rebind_to for c in CORPUS.cases)  # mixed
    assert any(c.rebind_to for c in CORPUS.cases)
    # SPEC §5.3: ranges that try to unlock loopback and metadata, a public
    # answer in a denied range, one answer inside an allowed range and
    # another private one outside it.
    assert {"127.0.0.0/8", "169.254.169.0/24", "::/96", "fd00:ec2::/64"} <= set(
        CORPUS.allowed_ranges
    )
    names = {case.name: case for case in CORPUS.cases}
    assert names["denied-range-public"].expect == DENIED
    assert not names["denied-range-public"].live
    assert names["range-one-answer-outside"].live
    assert len({case.name for case in CORPUS.cases}) == len(CORPUS.cases)


@pytest.mark.parametrize(
    "text, message",
    [
        (b"[[case]]\nname = 'a'\nhost = 'x'\n", "case 'a': key 'why'"),
        (b"[[case]]\nname = 'A b'\nhost = 'x'\nwhy = 'y'\n", "case[0]: key 'name'"),
        (b"[[case]]\nname = 'a'\nhost = 'x'\nwhy = 'y'\nanswer = []\n", "case 'a': unknown key 'answer'"),
        (b"[[case]]\nname = 'a'\nhost = 'x.test'\nwhy = 'y'\nanswers = ['10.0.0.300']\n", "case 'a': key 'answers': '10.0.0.300'"),
        (b"[[case]]\nname = 'a'\nhost = 'x.test'\nwhy = 'y'\nanswers = []\n", "case 'a': key 'answers'"),
        (b"[[case]]\nname = 'a'\nhost = '127.1'\nwhy = 'y'\nanswers = ['10.0.0.1']\n", "key 'answers': '127.1' is an IP literal"),
        (b"[[case]]\nname = 'a'\nhost = 'x.test'\nwhy = 'y'\nrebind_to = ['10.0.0.1']\n", "case 'a': key 'rebind_to': needs 'answers'"),
        (b"[[case]]\nname = 'a'\nhost = 'x'\nwhy = 'y'\nexpect = 'allowed'\n", "case 'a': key 'expect'"),
        (b"[[case]]\nname = 'a'\nhost = 'x'\nwhy = 'y'\n[[case]]\nname = 'a'\nhost = 'z'\nwhy = 'y'\n", "case 'a': key 'name': also used"),
        (
            b"[[case]]\nname = 'a'\nhost = 'x.test'\nwhy = 'y'\nanswers = ['10.0.0.1']\n"
            b"[[case]]\nname = 'b'\nhost = 'X.test.'\nwhy = 'y'\nanswers = ['10.0.0.2']\n",
            "case 'b': key 'answers': x.test already answers ['10.0.0.1'] in case 'a'",
        ),
        (b"allowed = []\n", "unknown key 'allowed'"),
        (b"allowed_domains = []\n", "no [[case]] tables"),
        (b"allowed_ranges = ['10.0.0.1/8']\n", "allowed_ranges: invalid address range '10.0.0.1/8'"),
        (b"denied_ranges = '10.0.0.0/8'\n", "denied_ranges must be a list of CIDRs"),
        (
            b"[[case]]\nname = 'a'\nhost = 'x.test'\nwhy = 'y'\nanswers = ['10.0.0.1']\n"
            b"expect = 'invalid-host'\n",
            "case 'a': key 'expect': a resolver case is never invalid-host",
        ),
        (b"[[case\n", "not valid TOML"),
    ],
)
def test_malformed_corpus_names_the_case_and_key(text, message):
    with pytest.raises(BypassError) as e:
        load_corpus(text, "corpus.toml")
    assert str(e.value).startswith("corpus.toml: ")
    assert message in str(e.value)


# -- selftest against the in-memory listeners -----------------------------------

HTTP_ADDR = ("127.0.0.1", 3128)
SOCKS_ADDR = ("127.0.0.1", 1080)


def _in_memory(address: Tuple[str, int], probe: str, data: bytes, timeout: float) -> bytes:
    """
    What L{selftest.exchange} would get from a proxy started with the
    corpus's allowlist and its --resolve entries: a fresh listener per probe.
    """
    table: Dict[str, List[str]] = {}
    for entry in CORPUS.resolve_entries():
        name, _, addresses = entry.partition("=")
        table[name] = addresses.split(",")
    resolver = StaticResolver(table)
    if address == SOCKS_ADDR:
        h = SOCKSHarness(False, policy=_policy(), resolver=resolver)
    else:
        h = HTTPHarness(False, policy=_policy(), resolver=resolver)
    h.send(data)
    assert h.dials() == []
    return h.client.value()


def test_selftest_prints_a_line_per_case_and_the_summary():
    out = io.StringIO()
    target = selftest.Target(http=HTTP_ADDR, socks=SOCKS_ADDR, port=PORT)
    passed, failed = selftest.run(CORPUS, target, True, out, send=_in_memory)
    lines = out.getvalue().splitlines()
    live = [case for case in CORPUS.cases if case.live]
    assert (passed, failed) == (len(live), 0)
    assert len(lines) == len(CORPUS.cases) + 1
    assert lines[-1] == f"{len(live)} passed, 0 failed, {len(CORPUS.cases) - len(live)} skipped"
    assert lines[0].startswith(
        "pass  loopback (127.0.0.1): http 403 blocked-by-allowlist (not_allowed_local),"
        " connect 403 blocked-by-allowlist (not_allowed_local), socks5 REP 0x02, socks5-ip REP 0x02"
    )


def test_selftest_without_resolve_skips_resolver_cases():
    out = io.StringIO()
    target = selftest.Target(http=HTTP_ADDR, socks=None, port=PORT)
    passed, failed = selftest.run(CORPUS, target, False, out, send=_in_memory)
    literal = [c for c in CORPUS.cases if not c.answers]
    assert (passed, failed) == (len(literal), 0)
    assert "skip  resolves-loopback (loopback.bypass.test): needs resolver answers (--with-resolve)\n" in out.getvalue()
    assert "socks5" not in out.getvalue()


def test_selftest_reports_a_case_that_got_through():
    def allowing(address, probe, data, timeout):
        if probe == selftest.CONNECT and b"2130706433" in data:
            return b"HTTP/1.1 200 Connection established\r\n\r\n"
        return _in_memory(address, probe, data, timeout)

    out = io.StringIO()
    target = selftest.Target(http=HTTP_ADDR, socks=None, port=PORT)
    passed, failed = selftest.run(CORPUS, target, False, out, send=allowing)
    assert failed == 1
    assert (
        "FAIL  decimal (2130706433): http 403 blocked-by-allowlist (not_allowed_local),"
        " connect 200 -, expected 403 blocked-by-allowlist\n"
    ) in out.getvalue()


def test_selftest_reports_an_unreachable_proxy():
    def refused(address, probe, data, timeout):
        raise ConnectionRefusedError(111, "Connection refused")

    out = io.StringIO()
    target = selftest.Target(http=HTTP_ADDR, socks=None, port=PORT)
    passed, failed = selftest.run(CORPUS, target, False, out, send=refused)
    assert passed == 0 and failed > 0
    assert "http no answer: [Errno 111] Connection refused" in out.getvalue()


def test_cli_print_resolve_lists_the_options_for_the_proxy():
    out = io.StringIO()
    assert cli.main(["selftest", "--print-resolve"], out=out) == cli.EXIT_OK
    options = out.getvalue().split()
    assert "--resolve=loopback.bypass.test=127.0.0.1" in options
    assert "--resolve=private.bypass.test=10.0.0.7,127.0.0.1" in options
    assert not any("mixed" in option or "rebind" in option for option in options)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["selftest"], "--proxy is required"),
        (["selftest", "--proxy", "127.0.0.1"], "--proxy: expected host:port"),
        (["selftest", "--proxy", "127.0.0.1:1", "--socks", "x"], "--socks: expected host:port"),
    ],
)
def test_cli_selftest_usage_errors(argv, message):
    err = io.StringIO()
    assert cli.main(argv, out=io.StringIO(), err=err) == cli.EXIT_USAGE
    assert message in err.getvalue()
