"""libc's batch socket calls through ctypes, where their message headers are known.

``sendmmsg`` (the probe) and ``recvmmsg`` (the agent) take arrays of ``struct mmsghdr``
that both lay out by hand as 64-bit words: that layout holds on LP64 little-endian Linux
(x86_64, aarch64). Elsewhere ``libc_function`` finds nothing and the callers fall back to
one system call per datagram.

Why ctypes, which the socket module spares everyone else: it is measured. Through the lab,
a full sweep's packets went out at 139k/s in batches through ``sendmmsg`` against 63k/s one
``sendto`` each (``make bench``, RawSender.send_cells against send_group); the agent reads a
datagram in about 1 us through ``recvmmsg`` against 2.8 us through ``recvfrom``
(``agent.mmsg``). Both are half or more of the time a sweep takes.
"""

import ctypes
import struct
import sys
from typing import Any

MMSGHDR_WORDS = 8  # sizeof(struct mmsghdr) == 64: msghdr (56) + msg_len (u32) + padding
IOVEC_WORDS = 2  # sizeof(struct iovec) == 16


def libc_function(name: str, argtypes: list[Any]) -> Any | None:
    """libc's ``name`` returning a C int, with errno kept; None off LP64 little-endian
    Linux or where libc has no such function."""
    if not sys.platform.startswith("linux") or sys.byteorder != "little":
        return None
    if struct.calcsize("P") != 8:
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn
