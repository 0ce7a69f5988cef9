#!/usr/bin/env bash
# Build the guest images for vmm tests, cached, into kernel-images/out/:
#   vmlinux, bzImage    Linux 6.1 from Debian's linux-source-6.1, minimal
#                       config (config/linux-6.1.fragment) plus patches/*.patch
#   initramfs.cpio.gz   busybox-static, a static fio, and initramfs/init
#   testguest           built by testguest/build.sh
#
# Run as root on Debian 12 (bookworm). Installs the Debian packages it needs.
# Results are cached in ${VMM_IMAGES_CACHE:-/var/cache/vmm-images}, keyed by
# a hash of their inputs; a run with unchanged inputs only checks and copies.
# VMM_IMAGES_REBUILD=1 ignores the cache. See README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT="$HERE/$(basename "${BASH_SOURCE[0]}")"
OUT="$HERE/out"
FRAGMENT="$HERE/config/linux-6.1.fragment"
INIT="$HERE/initramfs/init"
CACHE="${VMM_IMAGES_CACHE:-/var/cache/vmm-images}"
REBUILD="${VMM_IMAGES_REBUILD:-0}"
JOBS=$(nproc)
KSRC_TAR=/usr/src/linux-source-6.1.tar.xz
PACKAGES=(linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev
	cpio busybox-static xz-utils dpkg-dev file patch gzip lz4
	zlib1g-dev libaio-dev debian-archive-keyring)

export LC_ALL=C
export DEBIAN_FRONTEND=noninteractive
export KBUILD_BUILD_USER=vmm KBUILD_BUILD_HOST=kernel-images

say() { echo "kernel-images: $*"; }
die() { echo "kernel-images: error: $*" >&2; exit 1; }

# elapsed START -> "1m23s"
elapsed() { local s=$(($(date +%s) - $1)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

# logged LOG WHAT CMD...: run CMD (a command or function) with its output
# appended to LOG; on failure print the tail of LOG and exit.
logged() {
	local log=$1 what=$2 rc=0
	shift 2
	set +e
	(set -e; "$@") >>"$log" 2>&1
	rc=$?
	set -e
	if [ "$rc" -ne 0 ]; then
		echo "kernel-images: FAILED: $what (exit $rc). Last lines of $log:" >&2
		tail -n 40 "$log" | sed 's/^/  | /' >&2
		exit 1
	fi
}

apt_get() { apt-get -o DPkg::Lock::Timeout=1800 "$@"; }

# ---------------------------------------------------------------- packages

fio_src_versions() {
	apt-cache showsrc --only-source fio 2>/dev/null | sed -n 's/^Version: //p' | sort -V || true
}

# Installs missing packages and makes sure the deb-src lists (for "apt-get
# source fio") exist. Runs "apt-get update" at most once, and apt not at all
# when nothing is missing.
ensure_apt() {
	local missing=() p update=0
	for p in "${PACKAGES[@]}"; do
		[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" = "install ok installed" ] ||
			missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] || update=1
	if [ -z "$(fio_src_versions)" ]; then
		update=1
		if ! grep -rqsE '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' \
			/etc/apt/sources.list /etc/apt/sources.list.d/; then
			say "adding /etc/apt/sources.list.d/vmm-deb-src.sources (for apt-get source fio)"
			cat >/etc/apt/sources.list.d/vmm-deb-src.sources <<-'EOF'
			# Added by vmm kernel-images/build.sh: Debian source packages
			# (it builds a static fio from "apt-get source fio").
			Types: deb-src
			URIs: http://deb.debian.org/debian
			Suites: bookworm
			Components: main
			Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
			EOF
		fi
	fi
	[ "$update" = 1 ] || return 0
	local log="$CACHE/apt.log"
	say "apt-get update${missing[*]:+ and install ${missing[*]}} (log: $log)"
	# Another apt/dpkg may hold the lock: DPkg::Lock::Timeout waits for it.
	if ! apt_get update >>"$log" 2>&1; then
		say "warning: apt-get update failed (see $log); trying the existing package lists"
	fi
	if [ ${#missing[@]} -ne 0 ]; then
		logged "$log" "apt-get install ${missing[*]}" \
			apt_get install -y --no-install-recommends "${missing[@]}"
	fi
}

pkg_version() { dpkg-query -W -f='${Version}' "$1"; }

# The newest fio in the deb-src lists: the one "apt-get source" fetches.
FIO_SRC_VERSION=
fio_source_version() {
	FIO_SRC_VERSION=$(fio_src_versions | tail -n 1)
	[ -n "$FIO_SRC_VERSION" ] ||
		die "no fio source package in the deb-src lists (see $CACHE/apt.log)"
}

# ---------------------------------------------------------------- cache

# hash_inputs: sha256 (first 16 hex digits) of stdin.
hash_inputs() { sha256sum | cut -c1-16; }

# cached KIND HASH: true when a complete, intact entry exists.
cached() {
	local dir="$CACHE/$1/$2"
	[ "$REBUILD" = 1 ] && return 1
	[ -f "$dir/SHA256SUMS" ] || return 1
	if ! (cd "$dir" && sha256sum --quiet -c SHA256SUMS >/dev/null 2>&1); then
		say "cache entry $dir is damaged; rebuilding it"
		return 1
	fi
}

# new_entry KIND HASH: prints a fresh work dir for a build of KIND, after
# removing what failed builds of KIND left behind.
new_entry() {
	local tmp="$CACHE/$1/$2.tmp"
	rm -rf "$CACHE/$1"/*.tmp
	mkdir -p "$tmp"
	echo "$tmp"
}

# commit_entry KIND HASH FILE...: checksum FILEs and move the entry in place.
commit_entry() {
	local kind=$1 hash=$2
	shift 2
	local tmp="$CACHE/$kind/$hash.tmp" dir="$CACHE/$kind/$hash"
	(cd "$tmp" && sha256sum "$@" >SHA256SUMS)
	rm -rf "$dir"
	mv "$tmp" "$dir"
}

# ---------------------------------------------------------------- kernel

kernel_inputs() {
	local p
	echo "script $(sha256sum <"$SCRIPT")"
	echo "fragment $(sha256sum <"$FRAGMENT")"
	for p in "$HERE"/patches/*.patch; do
		echo "patch $(basename "$p") $(sha256sum <"$p")"
	done
	echo "linux-source-6.1 $(pkg_version linux-source-6.1)"
	echo "gcc $(gcc --version | sed -n 1p)"
	echo "binutils $(ld --version | sed -n 1p)"
}

kernel_extract() {
	tar -C "$1" -xf "$KSRC_TAR"
	local p
	for p in "$HERE"/patches/*.patch; do
		echo "applying $(basename "$p")"
		patch -d "$1/linux-source-6.1" -p1 --forward --batch -i "$p"
	done
}

kernel_config() {
	cd "$1/linux-source-6.1"
	make ARCH=x86_64 allnoconfig
	scripts/kconfig/merge_config.sh -m .config "$FRAGMENT"
	make ARCH=x86_64 olddefconfig
}

# Every CONFIG_X=v line of the fragment must be in .config, and every
# "# CONFIG_X is not set" must not be set. Prints what is not.
kernel_check_config() {
	local config=$1 line sym bad=0
	while IFS= read -r line; do
		case "$line" in
		CONFIG_*=*)
			if ! grep -qxF -- "$line" "$config"; then
				sym=${line%%=*}
				echo "kernel-images:   $line -> $(grep -E "^($sym=|# $sym is not set)" "$config" || echo "absent (dependencies not met)")" >&2
				bad=1
			fi
			;;
		"# CONFIG_"*" is not set")
			sym=${line#\# }
			sym=${sym%% *}
			if grep -q "^$sym=" "$config"; then
				echo "kernel-images:   $line -> $(grep "^$sym=" "$config") (selected by another option)" >&2
				bad=1
			fi
			;;
		esac
	done <"$FRAGMENT"
	return $bad
}

kernel_make() {
	make -C "$1/linux-source-6.1" ARCH=x86_64 -j"$JOBS" vmlinux bzImage
}

build_kernel() {
	local hash=$1 tmp t0 t src
	tmp=$(new_entry kernel "$hash")
	kernel_inputs >"$tmp/inputs"
	local log="$tmp/build.log"
	src="$tmp/linux-source-6.1"
	say "building Linux 6.1 $(pkg_version linux-source-6.1) (about 6 minutes on 2 CPUs; log: $CACHE/kernel/$hash/build.log)..."
	t0=$(date +%s)
	t=$t0
	logged "$log" "extracting $KSRC_TAR and applying patches" kernel_extract "$tmp"
	say "  extract + patch: $(elapsed "$t")"
	t=$(date +%s)
	logged "$log" "kernel configuration" kernel_config "$tmp"
	if ! kernel_check_config "$src/.config"; then
		die "the options above from $FRAGMENT are not in the final .config (see $log)"
	fi
	say "  config: $(elapsed "$t"), $(grep -c '=y$' "$src/.config") options =y"
	t=$(date +%s)
	logged "$log" "make vmlinux bzImage" kernel_make "$tmp"
	say "  make -j$JOBS vmlinux bzImage: $(elapsed "$t")"
	cp "$src/vmlinux" "$tmp/vmlinux"
	cp "$src/arch/x86/boot/bzImage" "$tmp/bzImage"
	cp "$src/.config" "$tmp/config"
	local notes
	notes=$(readelf -n "$tmp/vmlinux")
	grep -q 'Xen.*0x00000012' <<<"$notes" ||
		die "$tmp/vmlinux has no PVH note (Xen note type 0x12, XEN_ELFNOTE_PHYS32_ENTRY)"
	rm -rf "$src"
	commit_entry kernel "$hash" vmlinux bzImage config
	say "  kernel done in $(elapsed "$t0")"
}

# ---------------------------------------------------------------- fio

FIO_CONFIGURE=(--build-static --disable-native --disable-numa --disable-rdma
	--disable-rados --disable-rbd --disable-http --disable-gfapi --disable-libnfs
	--disable-pmem --disable-xnvme --disable-libzbc --disable-tcmalloc --disable-dfs)

fio_inputs() {
	echo "script $(sha256sum <"$SCRIPT")"
	echo "fio source $FIO_SRC_VERSION"
	echo "configure ${FIO_CONFIGURE[*]}"
	echo "gcc $(gcc --version | sed -n 1p)"
	echo "libc6-dev $(pkg_version libc6-dev)"
	echo "zlib1g-dev $(pkg_version zlib1g-dev)"
	echo "libaio-dev $(pkg_version libaio-dev)"
}

fio_fetch() {
	cd "$1"
	apt_get source --download-only "fio=$FIO_SRC_VERSION"
	dpkg-source -x fio_*.dsc src
}

fio_make() {
	cd "$1/src"
	./configure "${FIO_CONFIGURE[@]}"
	make -j"$JOBS" fio
	strip -o "$1/fio" fio
}

build_fio() {
	local hash=$1 tmp t0
	tmp=$(new_entry fio "$hash")
	fio_inputs >"$tmp/inputs"
	local log="$tmp/build.log"
	say "building static fio $FIO_SRC_VERSION from Debian source (about 1 minute; log: $CACHE/fio/$hash/build.log)..."
	t0=$(date +%s)
	logged "$log" "apt-get source fio=$FIO_SRC_VERSION" fio_fetch "$tmp"
	logged "$log" "fio configure/make" fio_make "$tmp"
	local kind
	kind=$(file -b "$tmp/fio")
	echo "file: $kind" >>"$log"
	grep -q 'statically linked' <<<"$kind" || die "fio is not statically linked: $kind"
	if ldd "$tmp/fio" >>"$log" 2>&1; then
		die "ldd lists shared libraries for the static fio (see $log)"
	fi
	rm -rf "$tmp/src" "$tmp"/fio_*
	commit_entry fio "$hash" fio
	say "  fio done in $(elapsed "$t0"), $(du -h "$CACHE/fio/$hash/fio" | cut -f1) stripped"
}

# ---------------------------------------------------------------- initramfs

initramfs_inputs() {
	echo "script $(sha256sum <"$SCRIPT")"
	echo "init $(sha256sum <"$INIT")"
	echo "busybox-static $(pkg_version busybox-static)"
	echo "fio $FIO_HASH"
}

initramfs_make() {
	local tmp=$1 root="$1/root" path
	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc,mnt}
	chmod 1777 "$root/tmp"
	cp /bin/busybox "$root/bin/busybox"
	"$root/bin/busybox" --list-full | while IFS= read -r path; do
		case "$path" in */*) ;; *) continue ;; esac # e.g. "linuxrc"
		[ -e "$root/$path" ] || ln -s /bin/busybox "$root/$path"
	done
	install -m 0755 "$CACHE/fio/$FIO_HASH/fio" "$root/bin/fio"
	install -m 0755 "$INIT" "$root/init"
	mknod -m 0600 "$root/dev/console" c 5 1
	# Fixed owner, times and inode numbers: same inputs, same bytes.
	find "$root" -exec touch -h -d @0 {} +
	(cd "$root" && find . -mindepth 1 | sed 's|^\./||' | sort |
		cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9 -n >"$tmp/initramfs.cpio.gz"
	rm -rf "$root"
	local listing
	listing=$(zcat "$tmp/initramfs.cpio.gz" | cpio -t --quiet)
	for path in init bin/busybox bin/sh bin/fio dev/console; do
		grep -qx "$path" <<<"$listing" || { echo "initramfs lacks $path" >&2; return 1; }
	done
}

build_initramfs() {
	local hash=$1 tmp
	tmp=$(new_entry initramfs "$hash")
	initramfs_inputs >"$tmp/inputs"
	say "building initramfs.cpio.gz (busybox $(pkg_version busybox-static), fio, init)..."
	logged "$tmp/build.log" "building the initramfs" initramfs_make "$tmp"
	commit_entry initramfs "$hash" initramfs.cpio.gz
	say "  initramfs done, $(du -h "$CACHE/initramfs/$hash/initramfs.cpio.gz" | cut -f1)"
}

# ---------------------------------------------------------------- main

# copy_out SRC NAME: update out/NAME only when it differs (keeps mtimes).
copy_out() {
	cmp -s "$1" "$OUT/$2" 2>/dev/null || install -m 0644 "$1" "$OUT/$2"
}

main() {
	[ "$(id -u)" = 0 ] || die "run me as root (I install Debian packages and create device nodes)"
	mkdir -p "$CACHE" "$OUT"
	exec 9>"$CACHE/lock"
	if ! flock -n 9; then
		say "waiting for another build.sh (lock $CACHE/lock)..."
		flock 9
	fi
	local t0 built=()
	t0=$(date +%s)

	ensure_apt
	[ -f "$KSRC_TAR" ] || die "$KSRC_TAR is missing (package linux-source-6.1)"

	local khash ihash
	khash=$(kernel_inputs | hash_inputs)
	if ! cached kernel "$khash"; then
		build_kernel "$khash"
		built+=(kernel)
	fi

	fio_source_version
	FIO_HASH=$(fio_inputs | hash_inputs)
	if ! cached fio "$FIO_HASH"; then
		build_fio "$FIO_HASH"
		built+=(fio)
	fi

	ihash=$(initramfs_inputs | hash_inputs)
	if ! cached initramfs "$ihash"; then
		build_initramfs "$ihash"
		built+=(initramfs)
	fi

	copy_out "$CACHE/kernel/$khash/vmlinux" vmlinux
	copy_out "$CACHE/kernel/$khash/bzImage" bzImage
	copy_out "$CACHE/kernel/$khash/config" linux.config
	copy_out "$CACHE/initramfs/$ihash/initramfs.cpio.gz" initramfs.cpio.gz
	if [ ${#built[@]} -eq 0 ]; then
		say "up to date from cache $CACHE (kernel $khash, fio $FIO_HASH, initramfs $ihash); copied to $OUT"
	else
		say "built ${built[*]} in $(elapsed "$t0"); outputs in $OUT"
	fi

	say "building testguest (testguest/build.sh)..."
	bash "$HERE/testguest/build.sh" "$OUT/testguest" ||
		die "testguest/build.sh failed (exit $?)"
}

main "$@"
