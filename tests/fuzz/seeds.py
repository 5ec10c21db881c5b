"""`python -m tests.fuzz.seeds [TARGET...]`: (re)write the seed inputs of the fuzz targets.

Seeds are files named `seed-<sha1>` in tests/fuzz/corpus/<target>/; the other files there
are inputs a campaign found and `-merge=1` kept (new coverage), and are left alone.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path

from tests.fuzz.__main__ import TARGETS

CORPUS = Path(__file__).resolve().parent / "corpus"


def write_seeds(name: str) -> int:
    target = importlib.import_module(f"tests.fuzz.fuzz_{name}")
    prepare = getattr(target, "prepare", None)
    if prepare is not None:
        prepare()
    folder = CORPUS / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("seed-*"):
        old.unlink()
    count = 0
    for data in target.seeds():
        if len(data) > target.MAX_LEN:
            raise ValueError(f"{name}: a {len(data)}-byte seed exceeds MAX_LEN {target.MAX_LEN}")
        target.one_input(data)  # a seed that crashes is a bug of the seed or of the code
        (folder / f"seed-{hashlib.sha1(data).hexdigest()}").write_bytes(data)
        count += 1
    return count


def main() -> None:
    for name in sys.argv[1:] or TARGETS:
        print(f"{name}: {write_seeds(name)} seeds")


if __name__ == "__main__":
    main()
