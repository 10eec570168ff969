"""Write requirements.lock: the exact versions of the runtime dependencies that the container image
installs (the project's and its `gateway` extra's), resolved by pip in a fresh virtual environment.

Usage: python -m scripts.lock    (after changing pyproject.toml's dependencies; a unit test checks that
every one of them is pinned within its bounds)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
IMAGE_EXTRAS = "gateway"  # the image runs `orders gateway` too
HEADER = "# Exact runtime dependencies of the container image; made by `python -m scripts.lock`, never edited.\n"


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def write() -> None:
    with tempfile.TemporaryDirectory(prefix="orders-lock-") as tmp:
        venv.create(tmp, with_pip=True)
        pip = str(Path(tmp) / "bin" / "pip")
        subprocess.run([pip, "install", "--quiet", f"{ROOT}[{IMAGE_EXTRAS}]"], check=True)
        frozen = subprocess.run([pip, "freeze", "--all"], check=True, capture_output=True, text=True).stdout
    ours = {"orders-cqrs", "pip", "setuptools", "wheel"}
    lines = sorted(line for line in frozen.splitlines() if "==" in line and normalized(line.split("==")[0]) not in ours)
    LOCK.write_text(HEADER + "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pins to {LOCK.relative_to(ROOT)}")


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    write()


if __name__ == "__main__":
    main()
