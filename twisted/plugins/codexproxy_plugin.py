from twisted.application.service import ServiceMaker

codexproxy = ServiceMaker(
    "codex-proxy",
    "codex_proxy.tap",
    "Egress-policy HTTP and SOCKS5 proxy for sandboxed coding agents.",
    "codexproxy",
)
