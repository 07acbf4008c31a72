"""The chart README's values table is the one scripts/chart_values_table.py generates from the `# --`
comments of charts/fedcifar/values.yaml (CI runs this with the README's `pytest`).

    python scripts/chart_values_table.py   # after changing values.yaml: rewrites the README's table
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "chart_values_table.py"
CHART = ROOT / "charts" / "fedcifar"


def table_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )


def chart_copy(tmp_path: Path) -> tuple[Path, Path]:
    values, readme = tmp_path / "values.yaml", tmp_path / "README.md"
    shutil.copy(CHART / "values.yaml", values)
    shutil.copy(CHART / "README.md", readme)
    return values, readme


def test_readme_values_table_is_generated_from_values_yaml() -> None:
    result = table_script("--check")
    assert result.returncode == 0, (
        "charts/fedcifar/README.md's values table is not the one values.yaml gives: "
        f"run `python scripts/chart_values_table.py`\n{result.stdout}{result.stderr}"
    )


def test_check_finds_a_stale_table_and_the_script_rewrites_only_the_table(tmp_path: Path) -> None:
    values, readme = chart_copy(tmp_path)
    before = readme.read_text()
    old = "# -- run.seed is the run-config `seed`."
    assert old in values.read_text()
    values.write_text(values.read_text().replace(old, "# -- run.seed is the run-config `seed`, changed."))
    paths = ("--values", str(values), "--readme", str(readme))

    stale = table_script("--check", *paths)
    assert stale.returncode == 1, stale.stdout + stale.stderr
    assert "+| run.seed | int | `42` | run.seed is the run-config `seed`, changed. |" in stale.stdout
    assert readme.read_text() == before  # --check changes nothing

    assert table_script(*paths).returncode == 0
    after = readme.read_text()
    assert table_script("--check", *paths).returncode == 0
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert changed == [
        (
            "| run.seed | int | `42` | run.seed is the run-config `seed`. |",
            "| run.seed | int | `42` | run.seed is the run-config `seed`, changed. |",
        )
    ]


def test_an_undocumented_value_is_refused(tmp_path: Path) -> None:
    values, readme = chart_copy(tmp_path)
    values.write_text(values.read_text().replace("  seed: 42\n", "  seed: 42\n  undocumented: 1\n"))
    result = table_script("--check", "--values", str(values), "--readme", str(readme))
    assert result.returncode == 2
    assert "run.undocumented has no `# --` comment" in result.stderr
