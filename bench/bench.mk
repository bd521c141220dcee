# Benchmarks (bench/): included by the top-level Makefile.
#
#   sudo make bench        full run (~45 min: the cost of watching ~25 min, the 1M-socket scale row ~6-8 min
#                          and ~5 GiB): bench/results/results.json, PNGs, BENCHMARKS.md (which opens with
#                          the cost-of-watching table).  BENCH_SCALE_SIZES=10k,100k skips 1M.
#   sudo make bench-smoke  tiny sizes, ~1.5 min (bounded at 3), checks no targets: proves the harness works
#   sudo make bench-vm     the test-VM figures (bench/harness/vm.py): attach modes, bcc tcplife/
#                          tcpstates, start-up; ~50 min per kernel under QEMU TCG (bcc
#                          tools compile at every start), so not part of `make bench`.  BENCH_VM_KERNELS (default 5.10 6.1 6.12),
#                          PYTRACER_VM_ACCEL=kvm where /dev/kvm can boot stock kernels.
#                          run-vm builds a missing image.  Writes bench/results/vm.json,
#                          then regenerates BENCHMARKS.md.
#
# Layout: bench/harness/ (host side), bench/guest/ (runs in the test VM),
# bench/results/ (JSON, PNGs), bench/notes.md (the analysis in BENCHMARKS.md).
# The harness uses the system Python (Debian's python3-matplotlib for plots)
# and drives the `tracer` first on PATH (BENCH_TRACER overrides); the scale
# section times one poll cycle in-process with the Python that runs that
# `tracer` (BENCH_PYTHON overrides), through pytracer's public API only.

BENCH_PY        ?= /usr/bin/python3
BENCH_SMOKE_OUT ?= $(or $(TMPDIR),/tmp)/pytracer-bench-smoke

BENCH_VM_KERNELS ?= 5.10 6.1 6.12

.PHONY: bench bench-smoke bench-deps bench-vm

bench-deps:
	./bench/harness/install-deps $(if $(filter bench,$(MAKECMDGOALS)),--full)

bench: install bench-deps
	$(BENCH_PY) bench/harness/run.py
	$(BENCH_PY) bench/harness/report.py

bench-smoke: bench-deps
	@command -v tracer >/dev/null || { echo "bench-smoke: no tracer on PATH: run make install first" >&2; exit 1; }
	rm -rf $(BENCH_SMOKE_OUT)
	timeout 180 $(BENCH_PY) bench/harness/run.py --smoke --out $(BENCH_SMOKE_OUT)
	$(BENCH_PY) bench/harness/report.py --results $(BENCH_SMOKE_OUT) --markdown $(BENCH_SMOKE_OUT)/BENCHMARKS.md --no-plots

bench-vm: bpf
	BENCH_VM_KERNELS="$(BENCH_VM_KERNELS)" $(BENCH_PY) bench/harness/run.py vm
	$(BENCH_PY) bench/harness/report.py
