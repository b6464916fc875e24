"""Regenerate ``constraints.txt``: the newest versions the dependency ranges allow, resolved now.

    python scripts/refresh_constraints.py          # resolve, write constraints.txt
    pip install -c constraints.txt -e ".[dev]"     # install exactly that set
    python -m pytest                               # it is the lock only once this is green

pip resolves ``torch==2.13.0`` (the CPU build) plus ``.[dev]`` as if nothing were installed
(``--dry-run --ignore-installed --report``), so the file does not depend on this machine's state.
Commit the file together with the green test run that used it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"


def resolve() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run",
                        "--ignore-installed", "--report", str(report), TORCH, "-e", f"{ROOT}[dev]"],
                       check=True)
        doc = json.loads(report.read_text())
    pins = {}
    for item in doc["install"]:
        meta = item["metadata"]
        name = meta["name"].lower().replace("_", "-")
        if name != "bitalloc":
            pins[name] = meta["version"].split("+")[0]
    return pins


def main() -> int:
    pins = resolve()
    lines = ["# Versions the test suite was last green with; regenerate with",
             "#   python scripts/refresh_constraints.py && pip install -c constraints.txt -e '.[dev]'",
             "# and commit only after `python -m pytest` passes with them.",
             *(f"{name}=={version}" for name, version in sorted(pins.items()))]
    (ROOT / "constraints.txt").write_text("\n".join(lines) + "\n")
    print(f"constraints.txt: {len(pins)} pins")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
