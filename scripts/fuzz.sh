#!/usr/bin/env bash
# Runs coverage-guided fuzz targets (libFuzzer through cargo-fuzz) for a
# given time each, growing fuzz/corpus/<target>; CI replays that corpus as
# ordinary tests (vmm/tests/fuzz_corpus.rs, devices/tests/fuzz_corpus.rs).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 60 s, every target
#
# cargo-fuzz needs nightly compiler flags; the machine's one toolchain is
# stable, so RUSTC_BOOTSTRAP=1 lets it take them. Crashes land in
# fuzz/artifacts/<target>/ and stop the run with a non-zero status.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
	mapfile -t targets < <(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz list)
fi
cd fuzz
for target in "${targets[@]}"; do
	mkdir -p "corpus/$target"
	echo "fuzz: $target for ${seconds}s"
	log="target/fuzz-$target.log"
	mkdir -p target
	rc=0
	RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none "$target" "corpus/$target" -- \
		-max_total_time="$seconds" -max_len=4096 -rss_limit_mb=4096 -print_final_stats=1 \
		>"$log" 2>&1 || rc=$?
	grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY)|panicked|ERROR' "$log" || true
	if [ "$rc" -ne 0 ]; then
		echo "fuzz: $target failed (status $rc); see fuzz/$log and fuzz/artifacts/$target" >&2
		exit 1
	fi
done
