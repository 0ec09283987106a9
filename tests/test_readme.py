"""The README's two commands stay true: the test command is the one CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines()]


def test_readme_starts_with_two_commands():
    main_job, tests = _readme_commands()
    assert main_job.endswith("python -m fusedops bench")
    assert tests.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    _, tests = _readme_commands()
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
