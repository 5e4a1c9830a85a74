"""Test settings shared by every test module.

- `NO_TORCH_COMPILE=1`: moshi compiles a few small functions (RMS norm, RoPE, gating) with torch.compile
  even on CPU, which costs 20 to 30 s per process; the tests check numbers, not that compilation, and
  moshi reads the variable when it is imported, so it is set before any test module imports moshi.
- One torch thread: the models are tiny, and on a 2-core machine a second thread only adds contention.
- `slow`: the marker of the tests that take most of the time: `python -m pytest -q -m "not slow" tests` runs the
  quick part.
- `world`: the tiny world of the end-to-end tests, made once per test module: a tiny checkpoint (LM and Mimi
  written as moshi's loaders read them) and a LibriLight-layout folder of 3 books (`helpers.cli_helpers`).

Helpers (tiny models, the TTT model factory, the closeness check, checkpoints, CLI runners) are the package
`tests/helpers`.
"""
import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the tests that take most of the suite's time (subprocesses, torchrun, "
                                       "upstream PR rendering); `-m 'not slow'` runs the quick part")


@pytest.fixture(scope="module")
def world(tmp_path_factory, request) -> dict:
    from helpers.cli_helpers import make_world
    return make_world(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
