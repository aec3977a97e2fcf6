"""Copies the top-level prompts/ and recipes/ into the package at build time.

They live at the repository's top level (the design card's layout) but must also be found from a
regular, non-editable install; `llmrec.resources` looks in the installed copy first.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
RESOURCE_DIRS = ("prompts", "recipes")


class BuildPyWithResources(build_py):
    def run(self):
        super().run()
        for name in RESOURCE_DIRS:
            src = ROOT / name
            if not src.is_dir():
                # an sdist without them (see MANIFEST.in) built a wheel without recipes, failing only at run time
                raise FileNotFoundError(f"{src} is missing: the package needs it at run time (MANIFEST.in grafts it "
                                        "into the sdist)")
            dst = Path(self.build_lib) / "llmrec" / "_resources" / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)


setup(cmdclass={"build_py": BuildPyWithResources})
