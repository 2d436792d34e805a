"""
codex-proxy inside your own twistd application:

    twistd -ny examples/embed.tac

The config comes from $CODEX_PROXY_CONFIG (default: examples/config.toml).
Hosts missing from the allowlist are put to the decider below, which asks
for approval instead of allowing them; every decision carries the
application's version in its audit event.
"""

import os

from twisted.application.service import Application

from codex_proxy.api import NetworkProxy, ProxyService
from codex_proxy.config import load_config
from codex_proxy.decider import Ask


def decider(request):
    # Called only for allowlist misses; may return a Deferred or be async.
    return Ask(f"{request.host}:{request.port} needs approval")


config = load_config(os.environ.get("CODEX_PROXY_CONFIG", "examples/config.toml"))
application = Application("codex-proxy-embedded")
proxy = (
    NetworkProxy.builder()
    .config(config)
    .policy_decider(decider)
    .audit_metadata({"app.version": "embed-example"})
    .create()
)
ProxyService(proxy).setServiceParent(application)
