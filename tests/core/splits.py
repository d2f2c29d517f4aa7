"""Cutting a byte stream into reads, the way the differential tests feed
both builds the same input in pieces."""


def split_at(raw: bytes, cuts) -> list[bytes]:
    """``raw`` cut at the sorted offsets ``cuts`` (the last piece runs to the end)."""
    pieces, last = [], 0
    for c in list(cuts) + [len(raw)]:
        pieces.append(raw[last:c])
        last = c
    return pieces
