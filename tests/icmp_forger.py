"""An off-path forger of ICMP errors, run by the trust tests inside the lab's router.

``python tests/icmp_forger.py PROBE AGENT FIRST LAST SECONDS``: sends "administratively
prohibited" errors to PROBE that claim to quote a datagram from PROBE to AGENT, port 5000,
from each source port FIRST..LAST, over and over for SECONDS (at most 2,000,000 errors).
It knows no secret, so it quotes headers only: the probe must take them as weak evidence.
Addresses are the lab's (198.18.0.0/15); the script refuses any other.
"""

import ipaddress
import socket
import struct
import sys
import time


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def main() -> None:
    probe, agent = sys.argv[1], sys.argv[2]
    first, last, seconds = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    lab = ipaddress.ip_network("198.18.0.0/15")
    if ipaddress.ip_address(probe) not in lab or ipaddress.ip_address(agent) not in lab:
        raise SystemExit("icmp_forger.py: lab addresses (198.18.0.0/15) only")
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end and sent < 2_000_000:
        for sport in range(first, last + 1):
            inner = struct.pack(
                "!BBHHHBBH4s4s", 0x45, 0, 44, 0, 0x4000, 63, 17, 0,
                socket.inet_aton(probe), socket.inet_aton(agent),
            )  # fmt: skip
            udp = struct.pack("!HHHH", sport, 5000, 24, 0)
            message = struct.pack("!BBHI", 3, 13, 0, 0) + inner + udp
            message = message[:2] + struct.pack("!H", checksum(message)) + message[4:]
            sock.sendto(message, (probe, 0))
            sent += 1
        time.sleep(0.01)
    print(sent)


if __name__ == "__main__":
    main()
