//! Disk images made and checked with QEMU's own tools (`qemu-img`,
//! `qemu-io`), and the test guest's data patterns computed on the host,
//! for the qcow2 tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::temp_path;

/// Runs `qemu-img ARGS`, which must succeed; returns its stdout.
pub fn qemu_img(args: &[&str]) -> String {
    run_tool("qemu-img", args)
}

/// Runs `qemu-io ARGS`, which must succeed; returns its stdout.
pub fn qemu_io(args: &[&str]) -> String {
    run_tool("qemu-io", args)
}

fn run_tool(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (Debian: qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `qemu-img check` found in an image.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Check {
    /// Corrupted metadata or data references (`corruptions`).
    pub corruptions: u64,
    /// Clusters allocated but not referenced (`leaks`), harmless.
    pub leaks: u64,
    /// Errors that stopped the check (`check-errors`).
    pub check_errors: u64,
    /// The report in qemu-img's own words, for failure messages.
    pub text: String,
}

impl Check {
    /// Nothing found at all.
    pub fn clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}

/// `qemu-img check` of a qcow2 image, without repairing anything.
pub fn check(path: &Path) -> Check {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", "--output=json"])
        .arg(path)
        .output()
        .expect("cannot run qemu-img (Debian: qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Exit 0: clean, 2: corruptions, 3: leaks only; 1 (the check could
    // not be done) prints no JSON, which then counts as an error.
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let count = |key: &str| {
        json.get(key)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    let check_errors = if json.is_object() {
        count("check-errors")
    } else {
        1
    };
    Check {
        corruptions: count("corruptions"),
        leaks: count("leaks"),
        check_errors,
        text,
    }
}

/// Asserts that `qemu-img check` finds nothing wrong with `path`.
pub fn assert_check_clean(path: &Path) {
    let c = check(path);
    assert!(c.clean(), "qemu-img check {}: {}", path.display(), c.text);
}

/// A raw copy of the image at `path` (its whole backing chain read
/// through), made by `qemu-img convert -O raw`; removed when dropped.
pub struct RawCopy {
    /// Where the copy is.
    pub path: PathBuf,
}

impl RawCopy {
    /// Converts `path` (of format `format`) to raw.
    pub fn of(path: &Path, format: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let copy = temp_path(&format!("raw-copy-{n}.img"));
        qemu_img(&[
            "convert",
            "-f",
            format,
            "-O",
            "raw",
            path.to_str().unwrap(),
            copy.to_str().unwrap(),
        ]);
        Self { path: copy }
    }
}

impl Drop for RawCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `len` bytes from a xorshift generator seeded with `seed`: random
/// enough that no two sectors or clusters are alike, and reproducible.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The test guest's pattern salts (`kernel-images/testguest/src/blk_work.rs`).
pub const SALT_VERIFY: u64 = 0x7665_7269_6679_0001;
/// The salt of `blk=durable`'s pattern.
pub const SALT_DURABLE: u64 = 0x6475_7261_626c_0004;

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The bytes the test guest writes to `sectors` 512-byte sectors from
/// `first_sector` with a workload's pattern seed (`blk.seed` xor the
/// workload's salt), as its `fill_pattern` makes them.
pub fn guest_pattern(seed: u64, first_sector: u64, sectors: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(sectors as usize * 512);
    for s in first_sector..first_sector + sectors {
        let key = splitmix(seed ^ s.wrapping_mul(0xd1b5_4a32_d192_ed03));
        for w in 0..64u64 {
            out.extend_from_slice(&((key ^ w.wrapping_mul(GOLDEN)) | 1).to_le_bytes());
        }
    }
    out
}
