#!/usr/bin/env bash
# Crash consistency of qcow2 overlays, KILLS times (default 50): the test
# guest writes and flushes 24 KiB chunks of a qcow2 overlay over a raw
# base, reporting each flush; the vmm is killed with SIGKILL at a random
# moment after a random number of reports; qemu-img check must find no
# corruption (leaks are allowed) and every chunk reported flushed must hold
# what was written. Prints the tally; exits non-zero on any problem.
#
#   scripts/qcow2-crash.sh [KILLS]
#
# The work is tests/tests/qcow2_crash.rs (which runs 5 kills in the test
# suite); QCOW2_CRASH_SEED=N repeats a run's random choices (the seed is
# printed first). Needs /dev/kvm, qemu-img (qemu-utils) and the guest
# images (kernel-images/build.sh, run here if the test guest is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

kills=${1:-50}
case $kills in
'' | *[!0-9]* | 0)
	echo "qcow2-crash: KILLS must be a whole number above 0, not '$kills'" >&2
	exit 2
	;;
esac
command -v qemu-img >/dev/null || {
	echo "qcow2-crash: qemu-img is missing (Debian: apt-get install qemu-utils)" >&2
	exit 1
}
[ -f kernel-images/out/testguest ] || bash kernel-images/build.sh
# The vmm binary beside the test (cargo test builds both).
QCOW2_CRASH_KILLS=$kills exec cargo test --quiet -p tests --test qcow2_crash -- \
	--nocapture --test-threads=1
