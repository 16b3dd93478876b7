"""Remove the console scripts whose module this installation of intentflow does not hold.

deploy/Dockerfile runs it with the image's Python once the wheel is installed.
pyproject.toml declares every script, the load-test and development ones too,
and the wheel carries them all; the image ships only the production packages,
so a script whose module is not there would end in ModuleNotFoundError. Removed,
the image offers only the commands that work.
"""

from __future__ import annotations

import sys
import sysconfig
from importlib.metadata import distribution
from pathlib import Path


def shipped(module: str, files: set[str]) -> bool:
    """Whether the module `a.b.c` is among the installed `files` (paths as RECORD lists them)."""
    path = module.replace(".", "/")
    return f"{path}.py" in files or f"{path}/__init__.py" in files


def main() -> int:
    dist = distribution("intentflow")
    files = {str(f) for f in dist.files or ()}
    scripts = Path(sysconfig.get_path("scripts"))
    for entry in dist.entry_points.select(group="console_scripts"):
        if not shipped(entry.module, files):
            (scripts / entry.name).unlink(missing_ok=True)
            print(f"removed {entry.name}: its module {entry.module} is not in the image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
