# Kernel test VM targets. Included by the top-level Makefile:
#     include vagrant/vm.mk
#
#   make vm-image  [KERNEL=5.10|6.1|6.12]   build guest images (cached, idempotent)
#   make vm-test   [KERNEL=...]              kernel-tier tests, once per attach mode
#   make vm-smoke  [KERNEL=...]              quick check: kernel features only
#   make vm-vagrant [VAGRANT_KERNEL=6.1]     one kernel through the Vagrantfile
#                                            (vagrant-libvirt), smoke checks
#
# KERNEL defaults to all three, run one after the other (or VM_JOBS at once).
# Each kernel boots under QEMU TCG (vagrant/host/run-vm) and runs
# vagrant/guest/guest-test inside (vagrant/host/vm-matrix); the targets go on through
# the matrix and fail at the end if any kernel failed.
# VM_TEST_DEPS: host targets vm-test needs first (default: the top-level
#   `bpf` target when bpf/*.bpf.c exist, since the guest has no clang and
#   uses the CO-RE object built on the host).
# VM_PYTEST_ARGS: extra pytest arguments in the guest, e.g. -k "lifetimes"
#   (use double quotes inside).
# VM_TESTS / VM_BCC_TESTS: the test files run once per attach mode / for the
#   bcc backend (defaults in vagrant/guest/guest-test); tests/kernel/test_modes.py
#   (every mode side by side) always runs first.
# VM_MODES: attach modes to run (default: all of tp_btf tracepoint fentry
#   kprobe bcc); e.g. VM_MODES="fentry kprobe bcc" for the paths the dev
#   host cannot run.
# VM_TIMEOUT / VM_SMOKE_TIMEOUT: hard limit per kernel in seconds.
# VM_JOBS: kernels run side by side (default 1; CI uses 3, see .ci/run).
# VM_RETRY_WITHIN: seconds; a kernel that failed runs once more, alone, if the
#   matrix took less than that (default 0: no retry; CI: 2700).

VM_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
VM_KERNELS := 5.10 6.1 6.12
KERNEL ?= $(VM_KERNELS)
VM_TIMEOUT ?= 2400
VM_SMOKE_TIMEOUT ?= 600
VM_TEST_DEPS ?= $(if $(wildcard bpf/*.bpf.c),bpf)
VM_PYTEST_ARGS ?=
VM_TESTS ?=
VM_JOBS ?= 1
VM_RETRY_WITHIN ?= 0
VM_BCC_TESTS ?=
VM_MODES ?=

VAGRANT_KERNEL ?= 6.1

.PHONY: vm-image vm-test vm-smoke vm-vagrant

vm-image:
	@set -e; for k in $(KERNEL); do $(VM_DIR)/image/build-image $$k; done

# vm_matrix TIMEOUT GUEST-ARGS: run guest/guest-test in each kernel, then a summary.
define vm_matrix
	$(VM_DIR)/host/vm-matrix -t $(1) -j $(VM_JOBS) -r $(VM_RETRY_WITHIN) \
	    -e PYTRACER_VM_PYTEST_ARGS='$(VM_PYTEST_ARGS)' \
	    $(if $(VM_TESTS),-e PYTRACER_VM_TESTS='$(VM_TESTS)') \
	    $(if $(VM_BCC_TESTS),-e PYTRACER_VM_BCC_TESTS='$(VM_BCC_TESTS)') \
	    $(KERNEL) -- $(2)
endef

vm-test: vm-image $(VM_TEST_DEPS)
	$(call vm_matrix,$(VM_TIMEOUT),$(VM_MODES))

vm-smoke: vm-image
	$(call vm_matrix,$(VM_SMOKE_TIMEOUT),--smoke $(VM_MODES))

vm-vagrant:
	$(VM_DIR)/host/vagrant-smoke $(VAGRANT_KERNEL)
