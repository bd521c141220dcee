#!/bin/bash
# Runs inside the new guest root (chroot) at the end of vagrant/image/build-image,
# or as root inside a stock Debian VM (the Vagrantfile's VirtualBox provisioner).
#   customize.sh KERNEL SUITE MIRROR [--provision]
# --provision (in a running VM) skips the image-only steps: fstab, hostname,
# vagrant user, network and sshd host-key setup.
# Reads guest-requirements.txt from its own directory or ../guest/, and
# uses host-ca.crt from its own directory, if present, as pip's CA bundle.
# Installs what Debian's suite lacks (libbpf.so.1 on bullseye, newer Python
# packages from PyPI), writes the guest's environment file, and prepares the
# vagrant login used when the same image is booted as a vagrant box.
set -euo pipefail
KERNEL="$1" SUITE="$2" MIRROR="$3" MODE="${4:-image}"
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
# The host's pip settings name host paths; use the host CA bundle that
# build-image uploaded and nothing else from them.
HERE="$(cd "$(dirname "$0")" && pwd)"
unset PIP_FIND_LINKS
# requests (inside pip) prefers REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE over PIP_CERT,
# and the host's values name host paths: point them all at one bundle.
ca_vars="PIP_CERT SSL_CERT_FILE REQUESTS_CA_BUNDLE CURL_CA_BUNDLE"
if [ -f "$HERE/host-ca.crt" ]; then
    for v in $ca_vars; do export "$v=$HERE/host-ca.crt"; done
else
    # shellcheck disable=SC2086
    unset $ca_vars
fi
REQS="$HERE/guest-requirements.txt"
[ -f "$REQS" ] || REQS="$HERE/../guest/guest-requirements.txt"
step() { echo "customize: $*"; }

# --- libbpf.so.1 ------------------------------------------------------------
# bullseye ships only libbpf0 0.3, and bullseye-backports is no longer served.
# Rebuild bookworm's libbpf source package (1.1.2, the version on the dev
# host) against bullseye's libc with dpkg-buildpackage and install the
# resulting libbpf1 .deb. It has a different soname from libbpf0, so both
# coexist (bpftrace 0.11 keeps using libbpf.so.0).
if [ "$SUITE" = bullseye ]; then
    step "backporting libbpf1 from bookworm's source package"
    echo "deb-src $MIRROR bookworm main" >/etc/apt/sources.list.d/pytracer-libbpf-src.list
    apt-get update -qq
    build_deps="build-essential debhelper dpkg-dev libelf-dev zlib1g-dev pkg-config"
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $build_deps >/dev/null
    work=$(mktemp -d)
    (
        cd "$work"
        apt-get source -qq libbpf/bookworm 2>&1 | grep -v -e '^W: ' -e 'gpgv' || true
        cd libbpf-*/
        # Give the local rebuild its own version, so nobody mistakes it for
        # Debian's binary package.
        ver="$(dpkg-parsechangelog -S Version)~pytracer11"
        { printf 'libbpf (%s) bullseye; urgency=medium\n\n' "$ver"
          printf '  * Rebuilt for bullseye by pytracer vagrant/image/build-image.\n\n'
          printf ' -- pytracer <pytracer@localhost>  %s\n\n' "$(date -R)"
          cat debian/changelog; } >debian/changelog.new
        mv debian/changelog.new debian/changelog
        DEB_BUILD_OPTIONS="nocheck parallel=$(nproc)" dpkg-buildpackage -b -uc -us >build.log 2>&1 \
            || { tail -40 build.log; exit 1; }
        apt-get install -y -qq --no-install-recommends ../libbpf1_*.deb >/dev/null
    )
    rm -rf "$work" /etc/apt/sources.list.d/pytracer-libbpf-src.list
    # shellcheck disable=SC2086
    apt-mark auto $build_deps >/dev/null
    apt-get autoremove -y -qq --purge >/dev/null
fi
libbpf=$(ls /usr/lib/x86_64-linux-gnu/libbpf.so.1 2>/dev/null || true)
[ -n "$libbpf" ] || { echo "customize: no libbpf.so.1 in the image" >&2; exit 1; }

# --- Python packages from PyPI where Debian's are too old --------------------
step "checking Python requirements"
need=$(python3 - "$REQS" <<'PY'
# Print one requirement per distribution whose installed version misses the
# combined specifiers of every line naming it (or that is not installed).
import importlib.metadata as md
import sys

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

wanted: dict = {}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        req = Requirement(line)
        key = req.name.lower().replace("_", "-")
        wanted[key] = wanted.get(key, SpecifierSet()) & req.specifier
for name, spec in wanted.items():
    version = None
    for candidate in (name, name.replace("-", "_")):
        try:
            version = md.version(candidate)
            break
        except md.PackageNotFoundError:
            pass
    if version is None or not spec.contains(version, prereleases=True):
        print(f"{name}{spec}")
PY
)
if [ -n "$need" ]; then
    step "pip installing: $(echo "$need" | tr '\n' ' ')"
    flags=(--no-cache-dir --ignore-installed --disable-pip-version-check -q)
    if python3 -m pip install --help | grep -q -- --break-system-packages; then
        flags+=(--break-system-packages)
    fi
    # shellcheck disable=SC2086
    python3 -m pip install "${flags[@]}" $need
fi

# --- guest environment --------------------------------------------------------
step "writing /etc/pytracer-vm.env"
cat >/etc/pytracer-vm.env <<ENV
PYTRACER_VM_KERNEL=$KERNEL
PYTRACER_VM_SUITE=$SUITE
PYTRACER_LIBBPF=$libbpf
ENV
cat >/etc/profile.d/pytracer-vm.sh <<'ENV'
set -a; . /etc/pytracer-vm.env; set +a
ENV
if [ "$MODE" = --provision ]; then
    step "done (provisioned)"
    exit 0
fi

echo "pytracer-$(echo "$KERNEL" | tr . -)" >/etc/hostname
echo "127.0.1.1 $(cat /etc/hostname)" >>/etc/hosts
cat >/etc/fstab <<'FSTAB'
/dev/vda / ext4 rw,relatime 0 1
FSTAB

# --- vagrant box login (only used when booted with systemd by vagrant) ----------
step "preparing the vagrant user"
id vagrant >/dev/null 2>&1 || useradd -m -s /bin/bash vagrant
echo 'vagrant ALL=(ALL) NOPASSWD:ALL' >/etc/sudoers.d/vagrant
chmod 0440 /etc/sudoers.d/vagrant
install -d -m 0700 -o vagrant -g vagrant /home/vagrant/.ssh
echo 'UseDNS no' >/etc/ssh/sshd_config.d/pytracer.conf 2>/dev/null \
    || echo 'UseDNS no' >>/etc/ssh/sshd_config
mkdir -p /etc/systemd/network
cat >/etc/systemd/network/20-dhcp.network <<'NET'
[Match]
Name=en* eth*

[Network]
DHCP=yes
NET
systemctl enable systemd-networkd ssh >/dev/null 2>&1 || true
# Each booted copy gets its own sshd host keys (regenerated on first boot).
rm -f /etc/ssh/ssh_host_*
cat >/etc/systemd/system/pytracer-sshkeys.service <<'UNIT'
[Unit]
Description=Generate sshd host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
UNIT
systemctl enable pytracer-sshkeys.service >/dev/null 2>&1

step "done"
