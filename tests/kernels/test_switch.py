"""The CPU kernels' environment switches: a value that is not a route is an error naming the variable."""

import pytest

from musiclm_core.kernels import conv1d, linear, streams, winograd
from musiclm_core.kernels.switch import env_route


def test_env_route(monkeypatch):
    monkeypatch.delenv("MUSICLM_TEST_SWITCH", raising=False)
    assert env_route("MUSICLM_TEST_SWITCH", ("a", "b")) is None
    monkeypatch.setenv("MUSICLM_TEST_SWITCH", "b")
    assert env_route("MUSICLM_TEST_SWITCH", ("a", "b")) == "b"
    monkeypatch.setenv("MUSICLM_TEST_SWITCH", "c")
    with pytest.raises(ValueError, match=r"MUSICLM_TEST_SWITCH='c': expected a or b"):
        env_route("MUSICLM_TEST_SWITCH", ("a", "b"))


@pytest.mark.parametrize("kernel", [linear, winograd, conv1d, streams], ids=["linear", "winograd", "conv1d", "streams"])
def test_each_kernel_refuses_an_unknown_route(monkeypatch, kernel):
    monkeypatch.setenv(kernel.ENV, "fastest")
    kernel.route.cache_clear()
    try:
        with pytest.raises(ValueError, match=rf"{kernel.ENV}='fastest': expected {' or '.join(kernel.ROUTES)}"):
            kernel.route()
        monkeypatch.setenv(kernel.ENV, kernel.ROUTES[-1])
        kernel.route.cache_clear()
        assert kernel.route() == kernel.ROUTES[-1]
    finally:
        monkeypatch.delenv(kernel.ENV)
        kernel.route.cache_clear()
