"""Equal-length byte strings back to back in one buffer: a batch of datagrams or packets.

A full sweep sends 64,512 datagrams of one length. Kept as one ``bytes`` object instead of
64,512 small ones, a batch is built with whole-array operations (``TokenCodec.encode_block``,
``UdpPacketBuilder.build_block``) and laid out for ``sendmmsg`` by arithmetic, while code
that wants the items one by one still sees a sequence of ``bytes``.
"""

from collections.abc import Iterator, Sequence
from typing import overload


class Block(Sequence[bytes]):
    """``n`` byte strings of ``size`` bytes each, stored back to back in ``data``."""

    __slots__ = ("data", "n", "size")

    def __init__(self, data: bytes, size: int) -> None:
        if size <= 0 or len(data) % size:
            raise ValueError(f"{len(data)} bytes do not split into items of {size}")
        self.data = data
        self.size = size
        self.n = len(data) // size

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> "Block": ...

    def __getitem__(self, index: int | slice) -> "bytes | Block":
        size = self.size
        if isinstance(index, slice):
            start, stop, step = index.indices(self.n)
            if step != 1:
                raise ValueError("a Block slices with step 1 only")
            return Block(self.data[start * size : max(start, stop) * size], size)
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError("Block index out of range")
        return self.data[index * size : (index + 1) * size]

    def __iter__(self) -> Iterator[bytes]:
        data, size = self.data, self.size
        return (data[i : i + size] for i in range(0, len(data), size))

    def __repr__(self) -> str:
        return f"Block(n={self.n}, size={self.size})"

    @staticmethod
    def join(blocks: Sequence["Block"]) -> "Block":
        """One block of every item of ``blocks`` in order (all of one size)."""
        sizes = {b.size for b in blocks}
        if len(sizes) != 1:
            raise ValueError(f"blocks of different sizes: {sorted(sizes)}")
        return Block(b"".join(b.data for b in blocks), sizes.pop())
