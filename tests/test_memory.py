"""keep_freed_memory: glibc takes the settings; the switch leaves the defaults alone."""

import sys

import pytest

from certnet.memory import SWITCH, keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_glibc_takes_the_settings_unless_switched_off(monkeypatch):
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    monkeypatch.setenv(SWITCH, "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv(SWITCH)
    assert keep_freed_memory() is True
