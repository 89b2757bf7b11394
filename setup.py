"""Everything about the package is in pyproject.toml; this file only adds the
.pth file that makes plain mergekit see the plugin's merge methods
(_mergekit_evolver_autoregister.py says how).

A .pth file works only at the root of site-packages, which no pyproject
setting can reach (package data lands inside a package, data_files under the
prefix), so build_py writes it there: into build_lib for a wheel, and for an
editable install into the unpacked editable wheel, since setuptools discards
build_lib there and packs only what the install command's install_lib holds.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "mergekit_evolver_autoregister.pth"
# site.py runs a .pth line that starts with "import". The opt-out is tested
# here, as _mergekit_evolver_autoregister.disabled() does, so that it costs
# not even the module's import; the rest of the work is in the module, which
# imports only os and sys.
PTH_LINE = (
    'import os; os.environ.get("MERGEKIT_EVOLVER_NO_AUTOREGISTER", "") in ("", "0")'
    ' and __import__("_mergekit_evolver_autoregister").install()\n'
)


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        root = self.build_lib
        if getattr(self, "editable_mode", False):
            root = self.get_finalized_command("install").install_lib
        target = Path(root) / PTH_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(PTH_LINE, encoding="utf-8")

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(str(Path(self.build_lib) / PTH_NAME))
        return outputs


setup(cmdclass={"build_py": BuildPyWithPth})
