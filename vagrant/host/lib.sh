# shellcheck shell=bash
# Shared helpers for the kernel test VM scripts (host/*, image/build-image).
# Sourced, never executed. Everything here is side-effect free except
# ensure_host_pkgs, which installs missing Debian packages on the host (CI
# machines start clean, so the scripts bring their own tools).

set -euo pipefail

# The variables below are used by the scripts that source this file.
# VM_DIR is vagrant/: host/ (scripts run on the host), guest/ (run inside the
# VM), image/ (the image build), the Vagrantfile and the run directories (.run/).
VM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC2034
REPO_ROOT="$(cd "$VM_DIR/.." && pwd)"
# shellcheck disable=SC2034
VM_CACHE="${PYTRACER_VM_CACHE:-/var/cache/pytracer-vm}"
# shellcheck disable=SC2034
DEBIAN_MIRROR="${PYTRACER_VM_MIRROR:-http://deb.debian.org/debian}"
PROG="$(basename "$0")"

die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

# The kernel matrix. Each kernel is the stock Debian kernel of one suite, so
# the guest runs a kernel that Debian builds with BTF, kprobes and fentry, plus
# user space (bcc, bpftrace, libbpf) released and tested against that kernel.
#   5.10 -> bullseye  (Debian 11 stock kernel, python 3.9)
#   6.1  -> bookworm  (Debian 12 stock kernel, python 3.11, same as the dev host)
#   6.12 -> trixie    (Debian 13 stock kernel, python 3.13). bookworm-backports
#           also carries 6.12, but with bookworm's bcc 0.26 / bpftrace 0.17,
#           which predate that kernel; trixie pairs it with bcc 0.31 and
#           bpftrace 0.23. Override with PYTRACER_VM_SUITE if needed.
KERNELS_ALL="5.10 6.1 6.12"

suite_for_kernel() {
    case "$1" in
        5.10) echo bullseye ;;
        6.1) echo bookworm ;;
        6.12) echo trixie ;;
        *) die "unknown kernel '$1' (expected one of: $KERNELS_ALL)" ;;
    esac
}

# Image directory for one kernel: vmlinuz, initrd.img, root.ext4, stamp.
image_dir() { echo "$VM_CACHE/$1"; }

# Install Debian packages on the host if any is missing (idempotent, quiet
# when everything is present). apt-get update runs at most once per call.
missing_host_pkgs() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
    done
}

# Several run-vm processes start side by side (vm-matrix -j): the first one
# installs, the others wait on the lock and then find nothing missing,
# instead of failing on apt's own lock.
ensure_host_pkgs() {
    local missing=()
    mapfile -t missing < <(missing_host_pkgs "$@")
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "host packages missing (${missing[*]}) and not root to install them"
    exec 9>/var/lock/pytracer-host-pkgs
    flock -w 900 9 || die "waited 15 min for another install of host packages"
    mapfile -t missing < <(missing_host_pkgs "$@")
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing host packages: ${missing[*]}"
        apt-get update -qq >/dev/null || log "apt-get update reported errors (continuing)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null || { exec 9>&-; die "apt-get install ${missing[*]} failed"; }
    fi
    exec 9>&-
}
