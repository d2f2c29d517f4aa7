"""Control streams: typed messages between relay and agent, both ways.

A control stream is a mux stream whose header has kind ``control``
(relayd.core.wire); after the header it carries length-prefixed messages,
each a map with a ``type``. Each side keeps at most one control stream of its
own to the peer per link (``ControlChannel``, opened on first use) and reads
the peer's with ``receive``. The relay pushes claim codes, device tokens and
step-up prompts this way; the agent reports back.

A control stream lives as long as its link: it is a background stream of the
mux, which a drain (GoAway, then waiting for the open streams) does not wait
for; else every planned stop of a device would last the whole drain time.
"""

from __future__ import annotations

from typing import Callable

from relayd.core.wire import control_message, control_type
from relayd.errors import RelaydError


class ControlChannel:
    """Messages to the peer over one control stream of this link.

    ``open_stream()`` opens the stream and writes its header (None if the
    link cannot take a stream now); a stream that ended is replaced at the
    next ``send``.
    """

    def __init__(self, open_stream: Callable[[], object | None]) -> None:
        self._open = open_stream
        self._stream = None

    async def send(self, type_: str, **fields) -> bool:
        """Send one message; False if the link is down or the stream broke."""
        st = self._stream
        if st is None or st.at_eof:
            st = self._stream = self._open()
            if st is None:
                return False
            st.set_background()
        try:
            await st.write(control_message(type_, **fields))
        except RelaydError:
            self._stream = None
            return False
        return True


async def receive(stream, dispatch: Callable[[str, dict], None]) -> None:
    """Each message of the peer's control stream to ``dispatch(type, msg)``,
    until the stream ends. Raises WireError/FramingError (a message without a
    type, not a map, too large) or IncompleteReadError (cut mid-message): the
    caller resets the stream and counts it."""
    stream.set_background()
    async for msg in stream.messages():
        dispatch(control_type(msg), msg)
