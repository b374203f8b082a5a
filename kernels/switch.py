"""The environment switches of the CPU kernels (MUSICLM_LINEAR, MUSICLM_CONV3X3, MUSICLM_CONV1D,
MUSICLM_STREAMS): read once per process by each kernel's `route()`, checked here so that a typo is an error naming
the variable, not a silent fallback to the default."""

from __future__ import annotations

import os


def env_route(env: str, routes: tuple[str, ...]) -> str | None:
    """The value of environment variable `env` if it is set (one of `routes`, else ValueError), None if unset."""
    choice = os.environ.get(env)
    if choice is not None and choice not in routes:
        raise ValueError(f"{env}={choice!r}: expected {' or '.join(routes)}")
    return choice
