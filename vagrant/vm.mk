# Kernel test VM targets. Included by the top-level Makefile:
#     include vagrant/vm.mk
#
#   make vm-image  [KERNEL=5.10|6.1|6.12]   build guest images (cached, idempotent)
#   make vm-test   [KERNEL=...]              kernel-tier tests, once per attach mode
#   make vm-smoke  [KERNEL=...]              quick check: kernel features only
#   make vm-vagrant [VAGRANT_KERNEL=6.1]     one kernel through the Vagrantfile
#                                            (vagrant-libvirt), smoke checks
#
# KERNEL defaults to all three, run one after the other. Each kernel boots
# under QEMU TCG (vagrant/run-vm) and runs vagrant/guest-test inside; the
# targets go on through the matrix and fail at the end if any kernel failed.
# VM_TEST_DEPS: host targets vm-test needs first (default: the top-level
#   `bpf` target when bpf/*.bpf.c exist, since the guest has no clang and
#   uses the CO-RE object built on the host).
# VM_PYTEST_ARGS: extra pytest arguments in the guest, e.g. -k "lifetimes"
#   (use double quotes inside).
# VM_TESTS / VM_BCC_TESTS: the test files run once per attach mode / for the
#   bcc backend (defaults in vagrant/guest-test); tests/kernel/test_modes.py
#   (every mode side by side) always runs first.
# VM_MODES: attach modes to run (default: all of tp_btf tracepoint fentry
#   kprobe bcc); e.g. VM_MODES="fentry kprobe bcc" for the paths the dev
#   host cannot run.
# VM_TIMEOUT / VM_SMOKE_TIMEOUT: hard limit per kernel in seconds.

VM_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
VM_KERNELS := 5.10 6.1 6.12
KERNEL ?= $(VM_KERNELS)
VM_TIMEOUT ?= 1200
VM_SMOKE_TIMEOUT ?= 600
VM_TEST_DEPS ?= $(if $(wildcard bpf/*.bpf.c),bpf)
VM_PYTEST_ARGS ?=
VM_TESTS ?=
VM_BCC_TESTS ?=
VM_MODES ?=

VAGRANT_KERNEL ?= 6.1

.PHONY: vm-image vm-test vm-smoke vm-vagrant

vm-image:
	@set -e; for k in $(KERNEL); do $(VM_DIR)/build-image $$k; done

# vm_matrix TIMEOUT GUEST-ARGS: run guest-test in each kernel, then a summary.
define vm_matrix
	@rc=0; summary=""; \
	for k in $(KERNEL); do \
	    start=$$(date +%s); \
	    $(VM_DIR)/run-vm --no-build --timeout $(1) \
	        --env PYTRACER_VM_PYTEST_ARGS='$(VM_PYTEST_ARGS)' \
	        $(if $(VM_TESTS),--env PYTRACER_VM_TESTS='$(VM_TESTS)') \
	        $(if $(VM_BCC_TESTS),--env PYTRACER_VM_BCC_TESTS='$(VM_BCC_TESTS)') \
	        $$k -- $(VM_DIR)/guest-test $(2); r=$$?; \
	    summary="$$summary  $$k: exit $$r in $$(( $$(date +%s) - start ))s\n"; \
	    [ $$r -eq 0 ] || rc=1; \
	done; \
	printf "vm: results\n$$summary"; \
	exit $$rc
endef

vm-test: vm-image $(VM_TEST_DEPS)
	$(call vm_matrix,$(VM_TIMEOUT),$(VM_MODES))

vm-smoke: vm-image
	$(call vm_matrix,$(VM_SMOKE_TIMEOUT),--smoke $(VM_MODES))

vm-vagrant:
	$(VM_DIR)/vagrant-smoke $(VAGRANT_KERNEL)
