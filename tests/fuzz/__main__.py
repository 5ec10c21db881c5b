"""`python -m tests.fuzz TARGET [libFuzzer flags] [corpus dirs]`: run one fuzz target.

The code under test (vfsd, workers, and PyYAML for the config loader) is instrumented as it
is imported, so the target module must be the first to import it.
"""

from __future__ import annotations

import importlib
import logging
import sys

TARGETS = ("vhost_codec", "vhost_backend", "guest_memory", "desc_chain", "fuse_decode",
           "fuse_passthrough", "xattrmap", "idmap", "config_yaml")
_INSTRUMENT = ("vfsd", "workers")
_EXTRA = {"config_yaml": ("yaml",)}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz {{{','.join(TARGETS)}}} [libFuzzer args]")
    import atheris

    name = sys.argv[1]
    with atheris.instrument_imports(include=[*_INSTRUMENT, *_EXTRA.get(name, ())]):
        target = importlib.import_module(f"tests.fuzz.fuzz_{name}")
    # The code under test logs every refusal; printing them would cost more than the run.
    # (Targets that read logs, fuse_*, attach their own handler to their logger.)
    logging.getLogger("vfsd").addHandler(logging.NullHandler())
    logging.getLogger("vfsd").propagate = False
    prepare = getattr(target, "prepare", None)
    if prepare is not None:
        prepare()
    # Flags given later on the command line override these defaults. SIGXFSZ is left to
    # the target (fuse_passthrough caps file sizes and ignores the signal).
    atheris.Setup([sys.argv[0], f"-max_len={target.MAX_LEN}", "-handle_xfsz=0", *sys.argv[2:]],
                  target.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
