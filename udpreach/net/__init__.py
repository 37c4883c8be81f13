"""The network shell shared by the CLI, the agent and the probe (sockets, trio, libc)."""


def hostport(host: str, port: int) -> str:
    """``host:port`` as a person types it back: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
