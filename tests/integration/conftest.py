"""Fixtures of the real-Envoy tests (see envoy_stack.py).

This directory goes on sys.path so the helper modules (`envoy_stack`, `echo_pod`) import the
same way under every pytest import mode.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from envoy_stack import envoy_stack

__all__ = ["envoy_stack"]
