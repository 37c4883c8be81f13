"""udpreach: which UDP source-port ranges and destination ports get through a path.

The shared core (datagram format, control framing, port specs, plan, ledger, verdicts,
ranges) lives here as synchronous modules that import no trio; the coordinator, the CLI
and the reports sit on top. The client side is the ``agent`` package, the server side
the ``probe`` package.
"""

__version__ = "0.1.0"
