"""Write requirements.lock: the exact versions of the runtime dependencies (no extras) that the container
image installs, resolved by pip in a fresh virtual environment.

Usage: python -m scripts.lock            # rewrite requirements.lock
       python -m scripts.lock --check    # exit 1 when pyproject.toml's dependencies are not all in it
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
HEADER = "# Exact runtime dependencies of the container image; made by `python -m scripts.lock`, never edited.\n"


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def required_names() -> set[str]:
    """The distributions pyproject.toml's runtime dependencies name (extras dropped)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {normalized(re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0]) for spec in project["dependencies"]}


def locked() -> dict[str, str]:
    """name → version of every line of requirements.lock."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[normalized(name)] = version
    return pins


def write() -> None:
    with tempfile.TemporaryDirectory(prefix="orders-lock-") as tmp:
        venv.create(tmp, with_pip=True)
        pip = str(Path(tmp) / "bin" / "pip")
        subprocess.run([pip, "install", "--quiet", str(ROOT)], check=True)
        frozen = subprocess.run([pip, "freeze", "--all"], check=True, capture_output=True, text=True).stdout
    ours = {"orders-cqrs", "pip", "setuptools", "wheel"}
    lines = sorted(line for line in frozen.splitlines() if "==" in line and normalized(line.split("==")[0]) not in ours)
    LOCK.write_text(HEADER + "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pins to {LOCK.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    if parser.parse_args().check:
        missing = required_names() - set(locked())
        if missing:
            sys.exit(f"requirements.lock lacks {sorted(missing)}: run python -m scripts.lock")
        return
    write()


if __name__ == "__main__":
    main()
