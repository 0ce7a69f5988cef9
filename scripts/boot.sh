#!/usr/bin/env bash
# Boots a guest with the vmm, building the guest images (cached) and the vmm
# first. With no arguments: Linux with the test initramfs, 2 vCPUs, 128 MiB.
# With arguments: they are the vmm's own, e.g.
#   scripts/boot.sh --kernel kernel-images/out/testguest --cmdline exit=3
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v cargo >/dev/null || {
	echo "boot: cargo is not installed; install Rust with rustup (https://rustup.rs)" >&2
	exit 1
}
bash kernel-images/build.sh
cargo build --release --quiet -p vmm

if [ $# -eq 0 ]; then
	set -- --kernel kernel-images/out/vmlinux \
		--initrd kernel-images/out/initramfs.cpio.gz \
		--cpus 2 --memory 128M \
		--cmdline "console=ttyS0 reboot=k panic=1"
fi
exec target/x86_64-unknown-linux-gnu/release/vmm "$@"
