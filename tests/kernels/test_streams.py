"""kernels/streams.py: when a call's rows run as streams, and that each stream runs on its share of the threads in
the caller's grad / inference mode, leaving the caller's thread count as it was."""

import os
import signal
import threading
import time

import pytest
import torch

from musiclm_core.kernels import streams


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.delenv(streams.ENV, raising=False)
    streams.route.cache_clear()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
    streams.route.cache_clear()


def test_when_rows_run_as_streams(two_threads, monkeypatch):
    x = torch.zeros(4, 3)
    with torch.no_grad():
        assert streams.streams(2, x) == 2
        assert streams.streams(5, x) == 2  # no more streams than threads
        assert streams.streams(1, x) == 1
        torch.set_num_threads(1)
        assert streams.streams(2, x) == 1
        torch.set_num_threads(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert streams.streams(2, x) == 1  # autocast is per thread: not carried into the workers
    assert streams.streams(2, x) == 1  # gradients: one ordinary call (autograd across threads is not ours to split)
    with torch.inference_mode():
        assert streams.streams(2, x) == 2
        monkeypatch.setenv(streams.ENV, "off")
        streams.route.cache_clear()
        assert streams.streams(2, x) == 1


def test_split_runs_each_part_on_its_share(two_threads):
    seen = []

    def fn(part):
        seen.append((threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled(),
                     torch.is_inference_mode_enabled()))
        return part * 2

    parts = [torch.ones(1, 3), torch.full((2, 3), 3.0)]
    with torch.inference_mode():
        out = streams.split(fn, parts)
    assert [o.tolist() for o in out] == [[[2.0] * 3], [[6.0] * 3] * 2]  # in the parts' order
    assert all(name.startswith("musiclm-stream") and n == 1 and not grad and inference
               for name, n, grad, inference in seen), seen
    assert torch.get_num_threads() == 2  # the caller's count
    later = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [2]  # and the default of threads started later, not the workers' 1
    with torch.no_grad():
        streams.split(fn, parts)
    assert [(grad, inference) for *_, grad, inference in seen[-2:]] == [(False, False)] * 2


def test_split_passes_errors_on(two_threads):
    def fn(part):
        raise ValueError(f"bad part {part}")

    with torch.no_grad(), pytest.raises(ValueError, match="bad part"):
        streams.split(fn, [1, 2])
    assert torch.get_num_threads() == 2


def test_off_under_an_active_wait_policy(monkeypatch):
    monkeypatch.delenv(streams.ENV, raising=False)
    try:
        for policy, expected in (("ACTIVE", "off"), ("active", "off"), ("PASSIVE", "on")):
            monkeypatch.setenv("OMP_WAIT_POLICY", policy)
            streams.route.cache_clear()
            assert streams.route() == expected, policy
        monkeypatch.setenv(streams.ENV, "on")  # the switch wins
        monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
        streams.route.cache_clear()
        assert streams.route() == "on"
    finally:
        streams.route.cache_clear()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_split_in_a_forked_child(two_threads):
    """A child forked after the pool exists (a DataLoader worker) gets its own threads instead of waiting forever
    on the parent's, which it does not have."""
    with torch.no_grad():
        streams.split(lambda part: part + 1, [torch.zeros(1), torch.zeros(1)])  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the split completes and is right
        code = 1
        try:
            with torch.no_grad():
                out = streams.split(lambda part: part + 1, [torch.zeros(1), torch.ones(1)])
            code = 0 if [o.item() for o in out] == [1.0, 2.0] else 1
        finally:
            os._exit(code)
    for _ in range(300):  # up to 30 s, then the child is taken to hang
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's split hung")
    assert os.waitstatus_to_exitcode(status) == 0
