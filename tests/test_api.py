"""The public API: what `import helox` offers, and the README's example, run as written."""

import re
from pathlib import Path

import pytest

import helox

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The Python block of the README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


def test_the_public_names_resolve_and_unknown_ones_say_so():
    for name in helox.__all__:
        assert getattr(helox, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        helox.trian


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the example's workspace/ goes here
    exec(compile(readme_example(), str(README), "exec"), {})
    printed = capsys.readouterr().out
    run_dir = tmp_path / "workspace" / "runs" / "quickstart"
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "exports").is_dir()
    assert str(run_dir.relative_to(tmp_path)) in printed
