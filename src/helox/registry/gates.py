"""The gates a model version passes before an alias (`staging`, `prod`) points at it.

1. It was evaluated: at least one suite's results are registered with it.
2. Every registered suite passed its thresholds (`helox eval`'s verdict, kept with it).
3. No significant regression against the version that holds the alias now, per suite both
   were evaluated on: the items both scored are paired and compared with `helox eval
   --baseline`'s own test (`helox.eval.results.compare`, the suite's `regression` bounds).
   Versions evaluated on different revisions of a suite cannot be paired: that fails, with
   the hint to evaluate both on one revision.
4. Its parity report, when one is registered, passed.
5. An adapter's base is the model the alias serves: the base's registered version under the
   same alias has the fingerprint the adapter was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from helox.errors import HeloxError
from helox.eval.results import ITEMS_FILE, RESULTS_FILE, compare, read_items
from helox.eval.suite import RegressionConfig, load_suite


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def as_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


@dataclass
class GateReport:
    target: str
    """The alias the gates were run for."""
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    def as_dict(self) -> dict:
        return {"target": self.target, "passed": self.passed,
                "checks": [check.as_dict() for check in self.checks]}


def eval_checks(candidate_evals: Path, incumbent_evals: Path | None, incumbent: str | None
                ) -> list[Check]:
    """Gates 1–3 over the `evals/<suite>/` artifacts of the candidate and of the incumbent
    (the version that holds the alias now; None when no version does)."""
    suites = _suites(candidate_evals)
    if not suites:
        return [Check("evaluated", False, "no evaluation is registered with this version: run "
                                          "`helox eval MODEL --suite NAME`, then register it "
                                          "again")]
    checks = [Check("evaluated", True, f"suites: {', '.join(sorted(suites))}")]
    for suite, results in sorted(suites.items()):
        failures = results.get("failures", [])
        checks.append(Check(f"thresholds:{suite}", not failures and bool(results.get("passed")),
                            "; ".join(failures) or "every threshold met"))
        baseline = _suites(incumbent_evals).get(suite) if incumbent_evals else None
        checks.append(_regression_check(suite, candidate_evals / suite, results,
                                        incumbent_evals / suite if baseline else None,
                                        baseline, incumbent))
    return checks


def _regression_check(suite: str, folder: Path, results: dict, baseline_folder: Path | None,
                      baseline: dict | None, incumbent: str | None) -> Check:
    name = f"no regression:{suite}"
    if baseline is None:
        why = ("no version holds the alias" if incumbent is None
               else f"version {incumbent} has no {suite} results")
        return Check(name, True, f"no baseline: {why}")
    if baseline.get("suite_sha256") != results.get("suite_sha256"):
        return Check(name, False, f"version {incumbent} was evaluated on another revision of "
                                  f"suite {suite}, so items cannot be paired: evaluate both "
                                  f"on one revision and register again")
    comparisons = compare(read_items(folder), read_items(baseline_folder),
                          _regression_bounds(suite))
    worse = [c for c in comparisons if c.regression]
    if not comparisons:
        return Check(name, False, f"no item of suite {suite} was scored by both versions")
    if worse:
        return Check(name, False, "; ".join(
            f"{c.task}.{c.metric} {c.baseline:.4g} → {c.current:.4g} (change "
            f"{c.change.value:+.4g} [{c.change.low:+.4g}, {c.change.high:+.4g}], "
            f"{c.items} items)" for c in worse))
    return Check(name, True, f"against version {incumbent}: {len(comparisons)} metrics, none "
                             f"significantly worse")


def _regression_bounds(suite: str) -> RegressionConfig:
    """The suite's own bounds when it is installed or at hand; the defaults otherwise."""
    try:
        return load_suite(suite).suite.regression
    except HeloxError:
        return RegressionConfig()


def _suites(evals: Path) -> dict[str, dict]:
    if not evals.is_dir():
        return {}
    return {folder.name: json.loads((folder / RESULTS_FILE).read_text())
            for folder in sorted(evals.iterdir())
            if (folder / RESULTS_FILE).is_file() and (folder / ITEMS_FILE).is_file()}


def parity_check(parity_file: Path) -> list[Check]:
    if not parity_file.is_file():
        return []  # not required: a version may be registered before `helox parity` runs
    report = json.loads(parity_file.read_text())
    failed = [f"{row['name']}: {'; '.join(row['failures'])}" for row in report.get("rows", [])
              if row.get("failures")]
    return [Check("parity", not failed, "; ".join(failed) or
                  f"{len(report.get('rows', []))} comparisons within their limits")]


def adapter_base_check(base_name: str, alias: str, expected_fingerprint: str,
                       served_version: str | None, served_fingerprint: str | None) -> Check:
    name = "adapter base"
    if served_version is None:
        return Check(name, False, f"no version of the base model {base_name} holds `{alias}`: "
                                  f"promote the base first")
    if served_fingerprint != expected_fingerprint:
        return Check(name, False, f"{base_name}@{alias} is version {served_version} (model "
                                  f"fingerprint {str(served_fingerprint)[:16]}…), but the "
                                  f"adapter was trained on {expected_fingerprint[:16]}…")
    return Check(name, True, f"{base_name}@{alias} is version {served_version}, the adapter's "
                             f"base")
