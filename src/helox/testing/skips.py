"""A green test run means the checks ran: which skips a run accepts, and a loud list of the rest.

A test may skip only where the machine cannot run it at all: no CUDA device, no TensorRT. Any
other skip (promtool, Chromium, llama-cpp-python, a model file not installed) is a missing
install step that hides a check. With HELOX_STRICT_SKIPS=1 (CI sets it in .ci/run) such a skip
fails the run; without it the run passes, and its last lines name each skipped test, its
reason and how to get rid of it.

This module is a pytest plugin (tests/conftest.py loads it; elsewhere `-p helox.testing.skips`)
around one pure function, `unexpected_skips`. It also makes the one skip of the suite's own:
`@pytest.mark.gpu` tests without CUDA, so that reason and the allowlist cannot drift apart.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Iterable

import pytest
import torch

STRICT_ENV = "HELOX_STRICT_SKIPS"

NO_CUDA = "needs a CUDA device"
"""The skip of every `@pytest.mark.gpu` test on a machine without CUDA (below)."""
NO_TENSORRT = "TensorRT is not installed (pip install tensorrt)"
"""The skip of the TensorRT engine test on a CUDA machine without TensorRT (test_onnx.py)."""
ALLOWED_SKIP_REASONS = (NO_CUDA, NO_TENSORRT)
"""Reasons a skip may have under HELOX_STRICT_SKIPS=1: hardware the machine lacks, which no
install step can give it. Matched exactly, so a reworded skip is not accepted by accident."""

Skip = tuple[str, str]
"""(test id, reason): "tests/observe/test_report.py::test_html_renders…", "no Chromium …"."""


def unexpected_skips(skips: Iterable[Skip],
                     allowed: Iterable[str] = ALLOWED_SKIP_REASONS) -> list[Skip]:
    """The skips whose reason is not in `allowed`, in the order given."""
    allowed = set(allowed)
    return [(test_id, reason) for test_id, reason in skips if reason not in allowed]


def strict_from_env(environ=os.environ) -> bool:
    """HELOX_STRICT_SKIPS set to anything but "" or "0"."""
    return environ.get(STRICT_ENV, "") not in ("", "0")


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The reason a skipped test or module gave (pytest stores "Skipped: <reason>")."""
    longrepr = report.longrepr
    message = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return message.removeprefix("Skipped: ")


class SkipCheck:
    """Records every skip of the session; at its end fails a strict run on an unexpected one
    and prints the loud summary."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.skips: list[Skip] = []

    def record(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):  # an xfail is not a skip
            self.skips.append((report.nodeid, skip_reason(report)))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.record(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self.record(report)  # a module-level skip or importorskip skips the whole file

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        failing = self.strict and unexpected_skips(self.skips)
        if failing and session.exitstatus == pytest.ExitCode.OK:  # keep a worse status
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_terminal_summary(self, terminalreporter) -> None:
        """After pytest's own summary (the outermost wrapper finishes last), so the block is
        the last thing before the final counts line."""
        yield
        unexpected = unexpected_skips(self.skips)
        if unexpected:
            terminalreporter.write_sep("!", self.title(len(unexpected)), red=True, bold=True)
            for test_id, reason in unexpected:
                terminalreporter.write_line(f"SKIPPED {test_id}: {reason}", red=True, bold=True)
            for line in self.advice():
                terminalreporter.write_line(line)
        allowed = Counter(reason for _, reason in self.skips if reason in ALLOWED_SKIP_REASONS)
        if allowed:
            terminalreporter.write_line("allowed skips (hardware this machine lacks): " + "; ".join(
                f"{count} × {reason}" for reason, count in sorted(allowed.items())))

    def title(self, count: int) -> str:
        if self.strict:
            return f"FAILED ({STRICT_ENV}=1): {count} test(s) skipped for a reason not allowed"
        return f"{count} test(s) SKIPPED: this run did NOT check everything"

    def advice(self) -> list[str]:
        lines = ["To run them, install what each reason names: `make test` retries promtool and "
                 "Chromium until they install; `make install-test` installs the Python packages."]
        if self.strict:
            lines.append(f"{STRICT_ENV}=1 accepts only: {'; '.join(ALLOWED_SKIP_REASONS)} "
                         f"(ALLOWED_SKIP_REASONS in {__name__}: hardware, never an install step).")
        else:
            lines.append(f"CI runs `{STRICT_ENV}=1 make test`, where these skips fail the run.")
        return lines


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipCheck(strict_from_env()), "helox-skip-check")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
