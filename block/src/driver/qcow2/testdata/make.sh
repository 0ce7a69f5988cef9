#!/usr/bin/env bash
# Regenerates the qcow2 header fixtures: images made by `qemu-img create`
# variants, of which only the first 4 KiB are kept (the header, its
# extensions and the backing file name all lie there), with what
# `qemu-img info` says of the image in NAME.json. MANIFEST records each
# image's full file size, which the header checks need, and the qemu-img
# version that made them.
#
# Usage: bash make.sh   (from anywhere; needs qemu-img)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# make NAME SIZE [qemu-img create options...]: backing files are only
# named (-u keeps qemu-img from opening them), so none need exist.
make() {
	local name=$1 size=$2
	shift 2
	qemu-img create -q -f qcow2 "$@" "$tmp/$name.qcow2" "$size"
	head -c 4096 "$tmp/$name.qcow2" >"$name.bin"
	# What qemu-img itself reads from the image, less what depends on
	# where it was made (its path, its blocks on disk).
	qemu-img info --output=json "$tmp/$name.qcow2" | python3 -c '
import json, sys
info = json.load(sys.stdin)
keep = ["virtual-size", "cluster-size", "backing-filename", "backing-filename-format", "format-specific"]
print(json.dumps({k: info[k] for k in keep if k in info}, sort_keys=True))' >"$name.json"
	echo "$name $(stat -c %s "$tmp/$name.qcow2")" >>MANIFEST.new
}

{
	echo "# made by: $(qemu-img --version | head -1)"
	echo "# name file-size"
} >MANIFEST.new
make v2 1G -o compat=0.10
make v3 1G -o compat=1.1
make v3-c512 64M -o cluster_size=512
make v3-c4k 1G -o cluster_size=4096
make v2-c4k 1G -o compat=0.10,cluster_size=4096
make v3-c2m 10G -o cluster_size=2M
make v3-r1 1G -o refcount_bits=1
make v3-r8 1G -o refcount_bits=8
make v3-r64 1G -o refcount_bits=64
make v3-backing-raw 1G -u -b base.raw -F raw
make v3-backing-qcow2 1G -u -b ../images/base.qcow2 -F qcow2
make v2-backing-raw 1G -o compat=0.10 -u -b base.raw -F raw
make v3-lazy 1G -o lazy_refcounts=on
make v3-extl2 1G -o extended_l2=on
make v3-zstd 1G -o compression_type=zstd
make v3-4t 4T
make v3-4t-c4k 4T -o cluster_size=4096
make v3-c512-backing 64M -o cluster_size=512 -u -b base.raw -F raw
make v3-odd-size 1000000000
make v3-empty 0
mv MANIFEST.new MANIFEST
