"""bench/train_throughput.py's checkpoint and telemetry sections run against the current API
(they call helox.checkpoint and the training step directly, so an API change breaks them
silently otherwise: the checkpoint section had, until this test)."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench" / "train_throughput.py"


@pytest.mark.slow
def test_the_checkpoint_and_telemetry_sections_run(tmp_path):
    # The shared inductor cache, so that the bench's compile is warm after the first run.
    cache = Path(tempfile.gettempdir()) / "helox-bench-smoke-inductor"
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(cache)}
    for section, expected in (("checkpoint", "async / sync stall"),
                              ("telemetry", "full / plain")):
        done = subprocess.run(
            [sys.executable, str(BENCH), "--only", section, "--saves", "1",
             "--steps-between-saves", "1", "--warmup", "1", "--rounds", "1",
             "--telemetry-steps", "2", "--checkpoint-dir", str(tmp_path)],
            capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert expected in done.stdout, done.stdout[-2000:]
