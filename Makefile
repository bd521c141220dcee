# pytracer: build the CO-RE object, install, test.
#
#   make                 build pytracer/bpf/pytracer.bpf.o, fdscan.bpf.o and sockdestroy.bpf.o
#   sudo make watch      install dependencies, build, install, run `tracer watch`
#   sudo make test       install dependencies, build, run every test tier
#   make unit-test       pure-logic tests, no root needed
#   make fuzz            the property tests of the parsers, long profile

CLANG     ?= clang
BPFTOOL   ?= bpftool
ARCH      := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
PREFIX    ?= /opt/pytracer
# Where `tracer` is linked on PATH; empty (BINDIR=) links nothing: a second
# build installed beside the first (PREFIX=/opt/other) leaves `tracer` alone.
BINDIR    ?= /usr/local/bin
VENV      := $(PREFIX)/venv
PYTHON    ?= python3
BPF_OBJ   := pytracer/bpf/pytracer.bpf.o
BPF_SRC   := bpf/pytracer.bpf.c
BPF_HDRS  := bpf/pytracer.h bpf/lifecycle.bpf.h bpf/core_fixes.bpf.h bpf/vmlinux.h
# The task-file iterator that finds socket owners (pytracer/fdscan.py).
FDSCAN_OBJ := pytracer/bpf/fdscan.bpf.o
# `tracer destroy --via bpf`: bpf_sock_destroy() from an iter/tcp program (v6.5+).
DESTROY_OBJ := pytracer/bpf/sockdestroy.bpf.o

.PHONY: all bpf deps install watch test unit-test kernel-test fuzz lint clean vmlinux

all: bpf

# The bcc backend compiles its C at start-up: ship it beside the object.
BCC_SRC := pytracer/bpf/pytracer_bcc.c pytracer/bpf/pytracer.h pytracer/bpf/lifecycle.bpf.h

bpf: $(BPF_OBJ) $(FDSCAN_OBJ) $(DESTROY_OBJ) $(BCC_SRC)

pytracer/bpf/%: bpf/%
	@mkdir -p $(dir $@)
	cp $< $@

$(BPF_OBJ): $(BPF_SRC) $(BPF_HDRS)
$(FDSCAN_OBJ): bpf/fdscan.bpf.c bpf/fdscan.h bpf/vmlinux.h
$(DESTROY_OBJ): bpf/sockdestroy.bpf.c bpf/vmlinux.h

$(BPF_OBJ) $(FDSCAN_OBJ) $(DESTROY_OBJ):
	@mkdir -p $(dir $@)
	$(CLANG) -g -O2 -target bpf -D__TARGET_ARCH_$(ARCH) -Wall -Werror \
		-Ibpf -c $< -o $@.tmp
	@# Strip DWARF, keep BTF: the object ships in the package.
	llvm-strip -g $@.tmp
	mv $@.tmp $@

# Regenerate the pinned vmlinux.h (only needed when moving to newer kernel types).
vmlinux:
	$(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c > bpf/vmlinux.h

# Idempotent: apt packages, a venv under $(PREFIX), `tracer` on root's PATH.
deps:
	./scripts/install-deps

install: deps bpf
	$(VENV)/bin/pip install -q --no-deps --force-reinstall .
	$(if $(BINDIR),ln -sf $(VENV)/bin/tracer $(BINDIR)/tracer)

watch: install
	tracer watch

unit-test:
	$(VENV)/bin/python -m pytest tests/unit -q

# The property tests of every parser of outside input, with the long hypothesis
# profile (tests/conftest.py): thousands of examples each instead of the normal run's bounded count.
fuzz:
	$(VENV)/bin/python -m pytest tests/unit -q -m fuzz --hypothesis-profile=fuzz --hypothesis-show-statistics

kernel-test:
	$(VENV)/bin/python -m pytest tests/kernel -q

test: install
	$(VENV)/bin/python -m pytest tests -q

lint:
	$(VENV)/bin/ruff check pytracer tests

clean:
	rm -f $(BPF_OBJ) $(FDSCAN_OBJ) $(BCC_SRC)

-include vagrant/vm.mk
-include bench/bench.mk

# The full soak (tests/kernel/soak.py): >= 2 million loopback connections over 21 minutes
# (epoll churn 1,300/s + nginx/ab 400/s) beside the bpftrace oracle; figures in SOAK_OUT.
# A 3-minute version runs in `make test` (tests/kernel/test_soak.py).
SOAK_MINUTES ?= 21
SOAK_OUT     ?= bench/results/soak.json
.PHONY: soak
soak: install
	$(VENV)/bin/python tests/kernel/soak.py --minutes $(SOAK_MINUTES) --churn-rate 1300 --ab-rate 400 --out $(SOAK_OUT)
