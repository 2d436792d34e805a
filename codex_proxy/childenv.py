"""
The environment a child process needs to send its traffic through the proxy
(SPEC §10), computed from a config and, when known, the bound addresses.

One function serves C{codexproxy env} and the library's C{proxy.env()}, so
the two never disagree.
"""

from __future__ import annotations

from typing import Dict, Optional

from codex_proxy.config import ListenAddress, ProxyConfig
from codex_proxy.errors import ProxyError

#: The variables that point HTTP, HTTPS and websocket clients at the HTTP
#: listener; each is set in upper and lower case.
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "WS_PROXY", "WSS_PROXY")

#: More variables that name the HTTP listener, for tools that read only
#: their own (FTP clients, npm, yarn), as current upstream sets them.
EXTRA_PROXY_VARIABLES = (
    "FTP_PROXY",
    "npm_config_proxy",
    "npm_config_https_proxy",
    "YARN_HTTP_PROXY",
    "YARN_HTTPS_PROXY",
)

#: Switches that make Node and Electron honour the proxy variables, and one
#: that tells a child it runs behind the proxy.
FLAG_VARIABLES = ("NODE_USE_ENV_PROXY", "ELECTRON_GET_USE_PROXY", "CODEX_NETWORK_PROXY_ACTIVE")

#: The variables that make common tools trust a CA bundle (SPEC §6).
CA_BUNDLE_VARIABLES = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
    "CURL_CA_BUNDLE",
    "CARGO_HTTP_CAINFO",
)

#: What bypasses the proxy when local destinations are allowed anyway:
#: loopback, which the proxy would dial on the same machine.
LOCAL_NO_PROXY = "localhost,127.0.0.1,::1"


class EnvError(ProxyError):
    """
    No environment can be computed: the proxy binds nothing, or a listener
    address is not known yet.
    """


def child_env(
    config: ProxyConfig,
    *,
    http: Optional[str] = None,
    socks: Optional[str] = None,
    ca_bundle: Optional[str] = None,
) -> Dict[str, str]:
    """
    The variables of SPEC §10, in a stable order.

    @param http: the bound HTTP listener as C{host:port} (IPv6 in brackets),
        overriding C{proxy_url}; needed when the config asks for port 0.
    @param socks: the bound SOCKS5 listener, overriding C{socks_url}.
    @param ca_bundle: the CA bundle path (system roots plus the proxy's CA)
        when HTTPS interception is active, so clients trust minted leaves.
    @raise EnvError: the proxy is disabled, or a listener port is
        ephemeral and not given.
    """
    if not config.enabled:
        raise EnvError(
            f"{config.source}: the proxy is disabled (enabled = false):"
            " it binds nothing, so there is nothing to point clients at"
        )
    env: Dict[str, str] = {}
    http_url = "http://" + _address(config, "proxy_url", config.http_listen, http)
    for name in PROXY_VARIABLES:
        env[name] = env[name.lower()] = http_url
    all_proxy = http_url
    if config.enable_socks5:
        all_proxy = "socks5h://" + _address(config, "socks_url", config.socks_listen, socks)
    env["ALL_PROXY"] = env["all_proxy"] = all_proxy
    for name in EXTRA_PROXY_VARIABLES:
        env[name] = http_url
    for name in FLAG_VARIABLES:
        env[name] = "1"
    no_proxy = LOCAL_NO_PROXY if config.allow_local_binding else ""
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    if ca_bundle is not None:
        for name in CA_BUNDLE_VARIABLES:
            env[name] = ca_bundle
    return env


def _address(
    config: ProxyConfig, key: str, configured: ListenAddress, bound: Optional[str]
) -> str:
    if bound is not None:
        return bound
    if configured.port == 0:
        raise EnvError(
            f"{config.source}: {key} asks for an ephemeral port (0): the"
            " address is known only once the proxy runs (use its ports file)"
        )
    return str(configured)
