"""Block: equal-length byte strings in one buffer, seen as a sequence of bytes."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from udpreach.core.block import Block


@given(st.integers(1, 9), st.data())
def test_block_is_the_sequence_of_its_items(size: int, data: st.DataObject) -> None:
    items = data.draw(st.lists(st.binary(min_size=size, max_size=size), max_size=20))
    block = Block(b"".join(items), size)
    assert len(block) == len(items)
    assert list(block) == items
    assert [block[i] for i in range(len(items))] == items
    assert [block[i] for i in range(-len(items), 0)] == items
    i = data.draw(st.integers(0, len(items)))
    j = data.draw(st.integers(0, len(items)))
    assert list(block[i:j]) == items[i:j]
    assert list(Block.join([block[:i], block[i:]])) == items


def test_block_refuses_what_it_cannot_be() -> None:
    with pytest.raises(ValueError, match="do not split"):
        Block(b"abc", 2)
    with pytest.raises(ValueError, match="do not split"):
        Block(b"", 0)
    with pytest.raises(IndexError):
        Block(b"abcd", 2)[2]
    with pytest.raises(ValueError, match="step 1"):
        Block(b"abcd", 2)[::2]
    with pytest.raises(ValueError, match="different sizes"):
        Block.join([Block(b"ab", 2), Block(b"abc", 3)])
