"""Test-wide switches.

`TEMPO_JAX_TEST_SCAN_LAYERS=1` builds every model with scanned decoder layers unless a test
says otherwise (`RuntimeOptions.scan_layers` defaults to True): how `test_scan.py` reruns the
transformers parity suites on the scanned layout.
"""

from __future__ import annotations

import os

SCAN = os.environ.get("TEMPO_JAX_TEST_SCAN_LAYERS") == "1"


def pytest_configure(config):
    if SCAN:
        from tempo_jax.models.layers import RuntimeOptions

        defaults = list(RuntimeOptions.__init__.__defaults__)
        defaults[-1] = True  # scan_layers, the last field
        RuntimeOptions.__init__.__defaults__ = tuple(defaults)
        assert RuntimeOptions().scan_layers


def pytest_terminal_summary(terminalreporter):
    if SCAN:
        terminalreporter.write_line("(scanned decoder layers by default)")
