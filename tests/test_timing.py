"""The timers' arguments (their figures are checked by the GPU records, not by tests)."""

from __future__ import annotations

import pytest

from sbbench.harness.timing import time_cuda_with_setup


def test_unknown_l2_flush_is_named_before_anything_runs():
    calls = []
    with pytest.raises(ValueError, match="^l2_flush: expected 'write' or 'read', got 'none'"):
        time_cuda_with_setup(lambda state: calls.append(state), lambda: "state", l2_flush="none")
    assert calls == []
