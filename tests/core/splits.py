"""Cutting a byte stream into reads, the way the differential tests feed
both builds the same input in pieces."""


def split_at(raw: bytes, cuts) -> list[bytes]:
    """``raw`` cut at the sorted offsets ``cuts`` (the last piece runs to the end)."""
    pieces, last = [], 0
    for c in list(cuts) + [len(raw)]:
        pieces.append(raw[last:c])
        last = c
    return pieces


def mutate(msg: bytes, how: int, at: int, byte: int) -> bytes:
    """``msg`` with, by ``how``: a byte changed (1), cut short (2), a byte
    doubled (3), or unchanged (anything else)."""
    at %= len(msg)
    if how == 1:
        return msg[:at] + bytes([byte]) + msg[at + 1:]
    if how == 2:
        return msg[:at]
    if how == 3:
        return msg[:at] + msg[at:at + 1] * 2 + msg[at + 1:]
    return msg


def mutated(pieces, max_size: int = 6):
    """A hypothesis strategy: a few of ``pieces`` (whole messages) in a row,
    some of them mutated."""
    from hypothesis import strategies as st

    return st.lists(st.tuples(st.sampled_from(pieces), st.integers(0, 4), st.integers(0, 400), st.integers(0, 255)),
                    min_size=1, max_size=max_size).map(lambda xs: b"".join(mutate(*x) for x in xs))
