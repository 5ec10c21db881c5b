# Developer shortcuts. `make bench` runs the standard performance set (docs/PERFORMANCE.md):
# every workload at queue depth 1 and 16 against vfsd with 1, 2 and 4 workers and against the
# reference C virtiofsd (QEMU 7.2, one queue thread) when installed, and prints the table.
# Knobs: BENCH_DURATION (s per run), BENCH_OUT (JSON file), BENCH_ARGS (extra options),
# VIRTIOFSD (reference binary). Profiling needs `pip install py-spy` (see PERFORMANCE.md).

PYTHON ?= $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
BENCH_DURATION ?= 3
BENCH_OUT ?= .cache/bench-results.json
BENCH_ARGS ?=
VIRTIOFSD ?= /usr/lib/qemu/virtiofsd
BENCH_DAEMONS = vfsd:1 vfsd:2 vfsd:4 $(if $(wildcard $(VIRTIOFSD)),virtiofsd:0)

# `make fuzz` runs each fuzz target (tests/fuzz/, docs/RELIABILITY.md) for FUZZ_SECONDS, one
# after the other, at nice 19, growing .cache/fuzz/corpus/TARGET from the saved corpus;
# crashes land in .cache/fuzz/crashes/. `make fuzz-merge` keeps what found new coverage in
# tests/fuzz/corpus/. Knobs: FUZZ_SECONDS, FUZZ_TARGETS, FUZZ_ARGS (more libFuzzer flags).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= $(shell PYTHONPATH=. $(PYTHON) -c \
	'from tests.fuzz.__main__ import TARGETS; print(*TARGETS)')
FUZZ_ARGS ?=
FUZZ = nice -n 19 env PYTHONPATH=. $(PYTHON) -m tests.fuzz

.PHONY: bench bench-quick bench-compare fuzz fuzz-merge

bench:
	@mkdir -p $(dir $(BENCH_OUT))
	$(PYTHON) -m vfsd bench --spawn $(BENCH_DAEMONS) --virtiofsd $(VIRTIOFSD) \
		--workload all --queue-depth 1 16 --duration $(BENCH_DURATION) \
		--save $(BENCH_OUT) $(BENCH_ARGS)

# A smoke run of the same set (seconds, not minutes): the numbers mean little.
bench-quick:
	$(MAKE) bench BENCH_DURATION=0.3 BENCH_OUT=/dev/null

# vfsd with default settings against the reference, PASSES interleaved passes, then medians
# and ranges (python -m vfsd.bench.summary): the table docs/PERFORMANCE.md quotes.
PASSES ?= 5
COMPARE_WORKLOADS ?= getattr lookup read4k write4k create read1m write1m
bench-compare:
	@mkdir -p .cache/compare
	for i in $$(seq $(PASSES)); do \
		$(PYTHON) -m vfsd bench --spawn vfsd:0 virtiofsd:0 --virtiofsd $(VIRTIOFSD) \
			--workload $(COMPARE_WORKLOADS) --queue-depth 1 16 --duration $(BENCH_DURATION) \
			--save .cache/compare/pass$$i.json $(BENCH_ARGS) > /dev/null || exit 1; \
	done
	$(PYTHON) -m vfsd.bench.summary $$(seq -f .cache/compare/pass%g.json $(PASSES))

fuzz:
	@mkdir -p .cache/fuzz/crashes
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p .cache/fuzz/corpus/$$t; \
		echo "== $$t ($(FUZZ_SECONDS) s)"; \
		$(FUZZ) $$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
			-print_final_stats=1 -artifact_prefix=.cache/fuzz/crashes/$$t- $(FUZZ_ARGS) \
			.cache/fuzz/corpus/$$t tests/fuzz/corpus/$$t > .cache/fuzz/$$t.log 2>&1 \
			|| { tail -n 60 .cache/fuzz/$$t.log; exit 1; }; \
		grep -E '^#[0-9]+[[:space:]]+DONE|^stat::(number_of_executed_units|average_exec_per_sec)' \
			.cache/fuzz/$$t.log; \
	done

fuzz-merge:
	@for t in $(FUZZ_TARGETS); do \
		$(FUZZ) $$t -merge=1 tests/fuzz/corpus/$$t .cache/fuzz/corpus/$$t 2>&1 | tail -n 1; \
	done
