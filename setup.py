"""Build hook: the wheel carries what a dom0 installs besides the code (docs/install.md).

Everything else is in pyproject.toml. ``build_py`` copies the tree's data (the example
configuration in conf/, the systemd unit and tmpfiles entry in systemd/, the generated man
pages and bash completions in share/) into the package as ``shyped/_data/``, so that a wheel
or an sdist has them and ``shyped install-data`` can put them in place (it reads them from
the checkout when run from one, where ``shyped/_data`` does not exist). MANIFEST.in puts the
same directories in the sdist.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
#: The directories copied into shyped/_data (kept in step with shyped/cli/installdata.py).
DATA_DIRS = ("conf", "systemd", "share")


class BuildPyWithData(build_py):  # type: ignore[misc]
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout itself
            return
        target = Path(self.build_lib) / "shyped" / "_data"
        shutil.rmtree(target, ignore_errors=True)
        for name in DATA_DIRS:
            shutil.copytree(
                HERE / name, target / name, ignore=shutil.ignore_patterns("__pycache__")
            )


setup(cmdclass={"build_py": BuildPyWithData})
