"""The agent on its own, before any relay is dialled. With a relay:
tests/tunnel/ (end to end)."""

import pytest

from relayd.agent import AgentNode
from relayd.config import AgentConfig
from relayd.errors import AuthError
from relayd.net import run


def _agent(tmp_path, name, token):
    return AgentNode(AgentConfig(data=tmp_path / name, join=token, endpoints={"echo": ("127.0.0.1", 9)}))


@pytest.mark.parametrize("text", ["", "relayd1.", "relayd1.!!!!", "relayd2.abcd", "hello world", "relayd1." + "A" * 5000])
def test_malformed_token_text(tmp_path, text):
    async def main():
        with pytest.raises(AuthError, match="malformed join token"):
            await _agent(tmp_path, "a1", text).enroll(text)

    run(main())
