"""Fault scenarios: the summary table of every scenario run, printed at the end of the session."""

from __future__ import annotations

import pytest

from tests.fault.harness import ROWS, summary_lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ROWS:
        return
    terminalreporter.section("fault scenarios")
    for line in summary_lines():
        terminalreporter.write_line(line)
