"""Fixtures of the adversarial suite: one relay and agent shared by a
module's non-destructive attacks, with a bystander, and the check that an
attack harmed nobody else."""

import pytest

from tests.adversarial.stack import Bystander, Stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request):
    # A module may add to the relay's config (its STACK_CONFIG, TOML).
    st = Stack(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]),
               config=getattr(request.module, "STACK_CONFIG", ""))
    st.bystander = Bystander(st)
    yield st
    try:
        st.bystander.stop()
    finally:
        st.stop()


@pytest.fixture
def unharmed(stack):
    """The agent's link never drops and the bystander keeps going."""
    links = stack.agent_links()
    assert links >= 1
    yield
    stack.bystander.check()
    assert stack.agent_links() == links, "the agent's link was cut and had to reconnect"
    assert stack.metric("relayd_active_listeners") == 1
