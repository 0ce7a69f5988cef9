#!/usr/bin/env bash
# Runs coverage-guided fuzz targets (libFuzzer through cargo-fuzz) for a
# given time each, growing fuzz/corpus/<target>; CI replays that corpus as
# ordinary tests (vmm/tests/fuzz_corpus.rs, devices/tests/fuzz_corpus.rs).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 60 s, every target
#   scripts/fuzz.sh --minimise [TARGET...]    merge each corpus into a fresh
#                                             one keeping only inputs that
#                                             add coverage (before a commit)
#
# cargo-fuzz needs nightly compiler flags; the machine's one toolchain is
# stable, so RUSTC_BOOTSTRAP=1 lets it take them. Crashes land in
# fuzz/artifacts/<target>/ and stop the run with a non-zero status.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

minimise=false
if [ "${1:-}" = --minimise ]; then
	minimise=true
	shift
	seconds=0
else
	seconds=${1:-60}
	shift || true
fi
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
	mapfile -t targets < <(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz list)
fi
cd fuzz
for target in "${targets[@]}"; do
	# A migration stream's vCPU frame alone (XSAVE, LAPIC) is over 5 KiB.
	max_len=4096
	[ "$target" = migration_stream ] && max_len=16384
	mkdir -p "corpus/$target" target
	log="target/fuzz-$target.log"
	if $minimise; then
		fresh="target/corpus-$target"
		rm -rf "$fresh"
		mkdir -p "$fresh"
		RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none "$target" "$fresh" "corpus/$target" -- \
			-merge=1 -max_len=$max_len -rss_limit_mb=4096 >"$log" 2>&1
		echo "fuzz: $target: $(ls "corpus/$target" | wc -l) inputs -> $(ls "$fresh" | wc -l)" \
			"($(du -sh "$fresh" | cut -f1))"
		rm -rf "corpus/$target"
		mv "$fresh" "corpus/$target"
		continue
	fi
	echo "fuzz: $target for ${seconds}s"
	rc=0
	RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none "$target" "corpus/$target" -- \
		-max_total_time="$seconds" -max_len=$max_len -rss_limit_mb=4096 -print_final_stats=1 \
		>"$log" 2>&1 || rc=$?
	grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY)|panicked|ERROR' "$log" || true
	if [ "$rc" -ne 0 ]; then
		echo "fuzz: $target failed (status $rc); see fuzz/$log and fuzz/artifacts/$target" >&2
		exit 1
	fi
done
