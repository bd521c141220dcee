# Benchmarks (bench/): included by the top-level Makefile.
#
#   sudo make bench        full run (~20 min, of which the 1M-socket scale row ~6-8 min and ~5 GiB):
#                          bench/results/results.json, PNGs, BENCHMARKS.md.  BENCH_SCALE_SIZES=10k,100k skips 1M.
#   sudo make bench-smoke  tiny sizes, < 2 min, checks no targets: proves the harness works
#
# The harness uses the system Python (Debian's python3-matplotlib for plots)
# and drives the installed `tracer`; the scale section imports pytracer from
# the venv to time one poll cycle in-process.

BENCH_PY        ?= /usr/bin/python3
BENCH_SMOKE_OUT ?= $(or $(TMPDIR),/tmp)/pytracer-bench-smoke

.PHONY: bench bench-smoke bench-deps

bench-deps:
	./bench/install-deps $(if $(filter bench,$(MAKECMDGOALS)),--full)

bench: install bench-deps
	$(BENCH_PY) bench/run.py
	$(BENCH_PY) bench/report.py

bench-smoke: bench-deps
	@command -v tracer >/dev/null || { echo "bench-smoke: no tracer on PATH: run make install first" >&2; exit 1; }
	rm -rf $(BENCH_SMOKE_OUT)
	timeout 115 $(BENCH_PY) bench/run.py --smoke --out $(BENCH_SMOKE_OUT)
	$(BENCH_PY) bench/report.py --results $(BENCH_SMOKE_OUT) --markdown $(BENCH_SMOKE_OUT)/BENCHMARKS.md --no-plots
