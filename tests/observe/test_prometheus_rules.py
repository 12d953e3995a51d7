"""deploy/prometheus/helox-alerts.yml: valid for promtool, its unit tests pass (each alert fires
on an engineered series and stays silent on clean ones), and it queries the names the
Prometheus sink exports."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helox.observe.sinks import prometheus_name

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = RULES_DIR / "helox-alerts.yml"
RULE_TESTS = RULES_DIR / "helox-alerts.test.yml"
RUNBOOKS = RULES_DIR.parents[1] / "docs" / "runbooks.md"


def promtool() -> str:
    """promtool on PATH, or the one `make test` puts into the venv beside this Python."""
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which("promtool") or shutil.which("promtool", path=venv_bin)
    if found is None:
        pytest.skip("promtool is not installed: `make promtool` takes it from Debian's prometheus "
                    "package (needs apt-get), or put Prometheus's promtool on PATH")
    return found


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=RULES_DIR, capture_output=True, text=True,
                          timeout=120)


def test_rules_pass_promtool_check():
    result = run_promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_each_alert_fires_on_its_trigger_and_stays_silent_on_clean_series():
    result = run_promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
              for rule in group["rules"]}
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"]
             if case["exp_alerts"]}
    silent = {case["alertname"] for test in tests for case in test["alert_rule_test"]
              if not case["exp_alerts"]}
    assert fired == alerts and silent == alerts  # every alert has both kinds of case


def test_rules_query_the_names_the_sink_exports():
    exported = {prometheus_name(key)[0] for key in
                ("loss", "val_loss", "skipped_steps", "lr", "attn_entropy.layer0.head0",
                 "retrieval_precision_at_k")}
    queried = set(re.findall(r"\bhelox_[a-z_]+", RULES.read_text()))
    assert queried and queried <= exported, queried - exported


def test_every_runbook_link_names_an_entry_of_docs_runbooks():
    import helox.observe.health as health

    headings = set(re.findall(r"^## (\S+)$", RUNBOOKS.read_text(), flags=re.M))
    linked = {rule["annotations"]["runbook"].split("#")[1]
              for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    assert len(linked) == 5 and linked <= headings, linked - headings
    # A health alert's event names `alert-<monitor>` (Alert.event); the monitors are the names
    # HealthMonitor._edge is called with.
    monitors = re.findall(r'self\._edge\("(\w+)"', Path(health.__file__).read_text())
    entries = {f"alert-{m.replace('_', '-')}" for m in monitors}
    assert len(entries) == 6 and entries <= headings, entries - headings
