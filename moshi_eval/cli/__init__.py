"""`moshi-eval`, the command line on top of the library: it parses arguments into typed configurations and
calls the library with them. Nothing under `moshi_eval` imports it."""
from .commands import build_parser, main

__all__ = ["build_parser", "main"]
