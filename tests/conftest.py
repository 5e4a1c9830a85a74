"""Test settings shared by every test module.

- `NO_TORCH_COMPILE=1`: moshi compiles a few small functions (RMS norm, RoPE, gating) with torch.compile
  even on CPU, which costs 20 to 30 s per process; the tests check numbers, not that compilation, and
  moshi reads the variable when it is imported, so it is set before any test module imports moshi.
- One torch thread: the models are tiny, and on a 2-core machine a second thread only adds contention.
"""
import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
