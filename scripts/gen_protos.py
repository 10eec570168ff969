"""Generate the Python code (messages, gRPC stubs, .pyi, Connect services and clients) for protos/ into
orders/v1/.

Usage: python -m scripts.gen_protos           # write orders/v1/*_pb2*.py(i), orders/v1/*_connect.py
       python -m scripts.gen_protos --check   # exit 1 when orders/v1 differs from what would be made
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import sysconfig
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("orders") / "v1"
INIT_TEXT = '"""Generated protobuf and gRPC code for orders.v1 (made by scripts/gen_protos.py; never edit)."""\n'
# Tool versions are stamped into the output; a newer grpcio-tools with the same protos is not "stale".
_VERSION_STAMP = re.compile(r"\d+\.\d+\.\d+|ValidateProtobufRuntimeVersion\([^)]*\)")


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every .proto under protos/orders/v1 and return the files written."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    well_known = resources.files("grpc_tools") / "_proto"
    out = out_root / PACKAGE_DIR
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-connectrpc={Path(sysconfig.get_path('scripts')) / 'protoc-gen-connectrpc'}",
        f"--connectrpc_out={out_root}",
        "--connectrpc_opt=protobuf=google",  # messages from protoc's python_out, not protobuf-py
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out / "__init__.py").write_text(INIT_TEXT)
    return sorted(p for p in out.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))


def _normalised(path: Path) -> str:
    return _VERSION_STAMP.sub("<version>", path.read_text())


def check() -> int:
    """Compare a fresh generation with the committed files; print what differs."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp))}
        committed = {p.name: p for p in (ROOT / PACKAGE_DIR).iterdir() if p.suffix in (".py", ".pyi")}
        stale = sorted(set(fresh) ^ set(committed))
        stale += [
            name
            for name in sorted(set(fresh) & set(committed))
            if not filecmp.cmp(fresh[name], committed[name], shallow=False)
            and _normalised(fresh[name]) != _normalised(committed[name])
        ]
    if stale:
        print("generated code is out of date, run: python -m scripts.gen_protos", file=sys.stderr)
        for name in stale:
            print(f"  {PACKAGE_DIR / name}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    if parser.parse_args().check:
        return check()
    for path in generate(ROOT):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
