"""Strict skips: under HELOX_STRICT_SKIPS=1 a skip outside the allowlist (no CUDA device, no
TensorRT) fails the run and is named; without it the run passes and says so loudly."""

import pytest
import torch

from helox.testing.skips import (ALLOWED_SKIP_REASONS, NO_CUDA, NO_TENSORRT, STRICT_ENV,
                                 strict_from_env, unexpected_skips)

CHROMIUM = "no Chromium on PATH: `make chromium` installs Debian's"

INNER_TESTS = f"""
import pytest

def test_renders():
    pytest.skip({CHROMIUM!r})

@pytest.mark.skip(reason={NO_CUDA!r})
def test_on_the_gpu():
    pass

def test_runs():
    assert True
"""


def test_only_skips_outside_the_allowlist_are_unexpected():
    skips = [("t.py::a", NO_CUDA), ("t.py::b", CHROMIUM), ("t.py::c", NO_TENSORRT),
             ("t.py", "could not import 'tensorrt': No module named 'tensorrt'"),
             ("t.py::d", NO_CUDA + " (and more)")]
    assert unexpected_skips(skips) == [skips[1], skips[3], skips[4]]  # exact reasons only
    assert unexpected_skips(skips, allowed=[]) == skips
    assert unexpected_skips([], ALLOWED_SKIP_REASONS) == []


def test_strict_mode_is_any_value_but_empty_or_zero():
    assert [strict_from_env({STRICT_ENV: value}) for value in ("1", "yes", "0", "")] == [
        True, True, False, False]
    assert strict_from_env({}) is False


def run_inner(pytester, monkeypatch, strict: bool):
    if strict:
        monkeypatch.setenv(STRICT_ENV, "1")
    else:
        monkeypatch.delenv(STRICT_ENV, raising=False)
    pytester.makepyfile(test_inner=INNER_TESTS)
    return pytester.runpytest("-p", "helox.testing.skips")


def test_strict_run_fails_naming_the_unexpected_skip_only(pytester, monkeypatch):
    result = run_inner(pytester, monkeypatch, strict=True)
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([f"*FAILED ({STRICT_ENV}=1): 1 test(s) skipped*",
                                 f"SKIPPED test_inner.py::test_renders: {CHROMIUM}",
                                 f"allowed skips*1 × {NO_CUDA}"])
    assert "SKIPPED test_inner.py::test_on_the_gpu" not in result.stdout.str()


def test_allowed_skips_alone_pass_a_strict_run(pytester, monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "1")
    pytester.makepyfile(test_inner=INNER_TESTS.replace(f"pytest.skip({CHROMIUM!r})", "pass"))
    result = pytester.runpytest("-p", "helox.testing.skips")
    result.assert_outcomes(passed=2, skipped=1)
    assert result.ret == pytest.ExitCode.OK
    assert "FAILED" not in result.stdout.str()


def test_gpu_tests_skip_without_cuda_for_the_allowed_reason(pytester, monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pytester.makepyfile(test_inner="import pytest\n\n@pytest.mark.gpu\ndef test_kernel():\n"
                                   "    raise AssertionError('ran without CUDA')\n")
    result = pytester.runpytest("-p", "helox.testing.skips", "-rs")
    result.assert_outcomes(skipped=1)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines([f"SKIPPED*test_inner.py*{NO_CUDA}"])


def test_plain_run_passes_and_ends_with_the_loud_list(pytester, monkeypatch):
    result = run_inner(pytester, monkeypatch, strict=False)
    assert result.ret == pytest.ExitCode.OK
    lines = result.stdout.lines
    block = next(i for i, line in enumerate(lines) if "SKIPPED: this run did NOT check" in line)
    assert lines[block + 1] == f"SKIPPED test_inner.py::test_renders: {CHROMIUM}"
    assert f"CI runs `{STRICT_ENV}=1 make test`" in result.stdout.str()
    assert len(lines) - block <= 6  # the last lines, before only pytest's final counts line
    assert "1 passed, 2 skipped" in lines[-1]
