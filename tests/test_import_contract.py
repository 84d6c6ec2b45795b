"""The layering contract (pyproject's ``[tool.importlinter]``, docs/architecture.md) holds, and
`lint-imports` fails when a pure module imports Twisted: played on a copy of the tree, so nothing
that breaks the contract is ever written into the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "shyped", tree / "shyped", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH first, so the copy is analysed and not the installed (editable) package.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return _copy(tmp_path)


def test_contract_holds(tree: Path) -> None:
    done = _lint(tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "names"),
    [
        ("core/xsparse.py", "import twisted.internet.defer", "shyped.core.xsparse -> twisted"),
        ("policy/ste.py", "import twisted", "shyped.policy.ste -> twisted"),
        ("core/engine.py", "import shyped.service.daemon", "shyped.core.engine -> shyped.service"),
        # the control server reaches the daemon only through ControlBackend
        (
            "control/connections.py",
            "import shyped.control.daemon_backend",
            "shyped.control.connections -> shyped.control.daemon_backend",
        ),
        # a cycle: decisions imports mls
        ("policy/mls.py", "import shyped.policy.decisions", ".mls -> .decisions"),
    ],
)
def test_a_forbidden_import_breaks_it(tree: Path, module: str, line: str, names: str) -> None:
    path = tree / "shyped" / module
    text = path.read_text()
    # Right after the module's `from __future__` line (every module has one).
    marker = "from __future__ import annotations\n"
    assert marker in text
    path.write_text(text.replace(marker, f"{marker}\n{line}  # noqa\n", 1))
    done = _lint(tree)
    assert done.returncode != 0, done.stdout
    assert "BROKEN" in done.stdout
    assert names in done.stdout
