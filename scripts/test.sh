#!/usr/bin/env bash
# Runs every test: builds the guest images (cached), checks formatting and
# lints, then the unit tests and the integration tests that boot guests on
# /dev/kvm. Tests this host cannot run are listed as ignored, with why.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v cargo >/dev/null || {
	echo "test: cargo is not installed; install Rust with rustup (https://rustup.rs)" >&2
	exit 1
}
bash kernel-images/build.sh

# Tools some tests run beside our code: qemu-storage-daemon (qemu-utils)
# for tests/tests/qsd_compare.rs, qemu-img and qemu-io (qemu-utils) for the
# qcow2 unit tests in block/, nbdinfo and nbdcopy (libnbd-bin) for the NBD
# export tests in tests/tests/nbd*.rs, and Python with pip for qemu.qmp
# below. They fail, saying so, without them.
need=()
for tool in qemu-storage-daemon qemu-img qemu-io; do
	command -v "$tool" >/dev/null || { need+=(qemu-utils); break; }
done
for tool in nbdinfo nbdcopy; do
	command -v "$tool" >/dev/null || { need+=(libnbd-bin); break; }
done
# mkfs.ext4 and e2fsck (e2fsprogs) for the ext4 images the Linux disk tests
# boot on and check afterwards.
for tool in mkfs.ext4 e2fsck; do
	command -v "$tool" >/dev/null || { need+=(e2fsprogs); break; }
done
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if [ ${#need[@]} -gt 0 ]; then
	echo "test: apt-get install ${need[*]}"
	apt-get -o DPkg::Lock::Timeout=1800 update -qq
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=1800 install -y -qq \
		--no-install-recommends "${need[@]}" >/dev/null
fi
# qemu.qmp, QEMU's own Python QMP client, for tests/tests/qemu_qmp_client.rs;
# pinned, so a new release cannot change what the test checks. Debian's
# python3 refuses pip installs outside a venv (PEP 668) unless told:
# qemu.qmp is pure Python with no dependencies and Debian does not package
# it, so installing it beside Debian's packages breaks none of them.
qmp_version=0.0.6
python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('qemu.qmp') != '$qmp_version')" 2>/dev/null ||
	PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
		--root-user-action=ignore "qemu.qmp==$qmp_version"
cargo fmt --all -- --check
cargo clippy --quiet --workspace --all-targets -- -D warnings
cargo test --workspace
