"""A transfer that is cut must never look complete. Whatever ends a stream
abnormally (the agent killed, the relay killed, a service or a client that
resets, no agent at all), the TCP peer on the other side gets a reset
(ECONNRESET), never the orderly EOF that ends a complete download."""

import os
import signal
import socket

import pytest

from tests.adversarial.stack import BLOB_SIZE, BlobHandler, SinkHandler, Stack, blob
from tests.waiting import until_sync


@pytest.fixture
def stack(tmp_path):
    st = Stack(tmp_path)
    yield st
    st.stop(check=False)  # processes are killed on purpose here


def download(s: socket.socket, until: int, got: int = 0) -> int:
    """Read and check the blob from offset ``got``; returns the offset
    reached (``until``, or where a clean EOF came). Raises
    ConnectionResetError if the end was a reset."""
    while True:
        data = s.recv(1 << 20)
        if not data:
            return got
        assert data == blob(got, len(data)), "corrupted byte"
        got += len(data)
        if got >= until:
            return got


def test_agent_killed_mid_download_resets_the_client(stack):
    s = stack.tcp("blob")
    got = download(s, 8 << 20)
    assert got >= 8 << 20
    os.kill(stack.agent.p.pid, signal.SIGKILL)
    with pytest.raises(ConnectionResetError):
        n = download(s, BLOB_SIZE, got)
        raise AssertionError(f"clean EOF after {n} of {BLOB_SIZE} bytes: a cut transfer looked complete")
    s.close()


def test_service_reset_reaches_the_client_as_a_reset(stack):
    s = stack.tcp("cut")
    with pytest.raises(ConnectionResetError):
        n = download(s, BLOB_SIZE)
        raise AssertionError(f"clean EOF after {n} bytes")
    s.close()


def test_client_reset_reaches_the_service_as_a_reset(stack):
    s = stack.tcp("sink")
    s.sendall(os.urandom(1 << 20))
    until_sync(lambda: SinkHandler.received == 1 << 20, 10, "the bytes never reached the service")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    until_sync(lambda: SinkHandler.endings, 10, "the service never saw the end")
    assert SinkHandler.endings == ["reset"]


def test_client_that_finishes_cleanly_ends_cleanly(stack):
    """The other side of the coin: an orderly end stays orderly both ways."""
    s = stack.tcp("sink")
    s.sendall(os.urandom(1 << 20))
    s.shutdown(socket.SHUT_WR)
    assert s.recv(10) == b""
    s.close()
    until_sync(lambda: SinkHandler.endings, 10, "the service never saw the end")
    assert SinkHandler.endings == ["eof"]


def test_relay_killed_resets_the_service_side(stack):
    s = stack.tcp("sink")
    s.sendall(os.urandom(1 << 20))
    until_sync(lambda: SinkHandler.received == 1 << 20, 10, "the bytes never reached the service")
    os.kill(stack.relay.p.pid, signal.SIGKILL)
    until_sync(lambda: SinkHandler.endings, 15, "the service never saw the end")
    assert SinkHandler.endings == ["reset"]
    s.close()


def test_no_agent_is_a_reset(tmp_path):
    st = Stack(tmp_path, agent=False)
    try:
        for _ in range(5):
            with pytest.raises(ConnectionResetError):
                # The reset may overtake connect() itself, or the first read.
                s = st.tcp("noagent")
                try:
                    s.sendall(b"hello?")
                    s.recv(10)
                finally:
                    s.close()
    finally:
        st.stop()


def test_download_client_that_resets_resets_the_service(stack):
    s = stack.tcp("blob")
    assert download(s, 4 << 20) >= 4 << 20
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    until_sync(lambda: BlobHandler.endings, 10, "the service never saw the end")
    assert BlobHandler.endings == ["reset"]
