"""Coverage-guided fuzzing (atheris) of every decoder that sees guest or front-end bytes.

One module per target, `fuzz_<name>.py`, each with `one_input(data)` (raises on a crash),
`MAX_LEN` and `seeds()` (valid inputs built with the project's own front-end and FUSE
client). `python -m tests.fuzz TARGET [libFuzzer flags] [corpus dirs]` runs one target;
`python -m tests.fuzz.seeds` rewrites the seed corpora under corpus/. See
docs/RELIABILITY.md.
"""
