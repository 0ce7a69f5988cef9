//! Shared fixture for the integration tests in `tests/tests/`: where the
//! guest images and the `vmm` binary are, and how to boot a guest whose
//! serial output a test can wait on.
//!
//! Tests that need something this host lacks are marked
//! `#[cfg_attr(no_kvm, ignore = "...")]` or `#[cfg_attr(pvm_host, ignore = "...")]`
//! (cfgs set by `build.rs`), so `cargo test` lists them as ignored with the reason.

pub mod images;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use vmm::{Console, SerialLog, VmConfig, VmHandle};

/// How long a Linux guest may take to print its next line here: on PVM
/// hosts our kernel with 2 vCPUs reached `Run /init` after about 35 s on a
/// quiet machine, and took several times that while other guests booted
/// beside it (a bzImage also decompresses itself, emulated, first).
pub const LINUX_BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A guest image from `kernel-images/out/`, which `kernel-images/build.sh` makes.
pub fn image(name: &str) -> PathBuf {
    let path = repo_root().join("kernel-images/out").join(name);
    assert!(
        path.exists(),
        "{} is missing: build the guest images with `bash kernel-images/build.sh` (the README's test command does)",
        path.display()
    );
    path
}

/// The `vmm` binary cargo built beside this test.
pub fn vmm_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/vmm
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("vmm"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        bin.display()
    );
    bin
}

/// Runs the `vmm` binary with `args` and collects its status and output.
pub fn run_vmm(args: &[&str]) -> Output {
    Command::new(vmm_binary())
        .args(args)
        .output()
        .expect("run the vmm binary")
}

/// A second `vmm` (the test guest, `exit=3`) writing `disk`, as a second
/// writer would: its exit status and stderr. Refused, it ends with 1 and
/// says why; let in, its guest ends at once with 3.
pub fn second_vmm(disk: &Path) -> (Option<i32>, String) {
    let kernel = image("testguest");
    let out = run_vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "exit=3",
        "--disk",
        &format!("path={}", disk.display()),
    ]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The test guest running `cmdline`, with one disk per `--disk` option in
/// `disks` and, when `qmp` is given, a QMP socket there.
pub fn testguest(cmdline: &str, disks: &[String], qmp: Option<&Path>) -> VmConfig {
    let mut config = VmConfig::new(image("testguest"));
    config.cmdline = cmdline.into();
    config.disks = disks
        .iter()
        .map(|d| d.parse().unwrap_or_else(|e| panic!("--disk {d}: {e}")))
        .collect();
    config.qmp = qmp.map(Path::to_path_buf);
    config
}

/// Starts `config` with its serial output captured (and echoed to stderr
/// when `VMM_TEST_ECHO` is set, to watch a guest boot).
pub fn boot(config: &VmConfig) -> VmHandle {
    let log = if std::env::var_os("VMM_TEST_ECHO").is_some() {
        SerialLog::echoing()
    } else {
        SerialLog::new()
    };
    vmm::start(config, Console::Log(log)).unwrap_or_else(|e| panic!("VM did not start: {e}"))
}

/// Waits for a line containing `needle`, failing the test with the guest's
/// last output if it does not come.
pub fn expect_line(vm: &VmHandle, needle: &str, timeout: Duration) -> String {
    vm.wait_for_line(needle, timeout)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The value of `key=` in a `testguest: key=value` line.
pub fn testguest_value(vm: &VmHandle, key: &str) -> String {
    let prefix = format!("testguest: {key}=");
    let line = expect_line(vm, &prefix, Duration::from_secs(30));
    line[line.find(&prefix).unwrap() + prefix.len()..].to_string()
}

/// FNV-1a 64 of a file, as the test guest's `checksum` workload computes it.
pub fn fnv1a64_file(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read disk image");
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// A fresh folder in the temp folder (`temp_path(name)`), removed with
/// everything in it when dropped: one test's images, sockets and copies.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Makes the folder, emptied of anything an earlier run left.
    pub fn new(name: &str) -> Self {
        let path = temp_path(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    /// A path in it.
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Node `name` in a `query-named-block-nodes` reply.
pub fn node_named<'a>(nodes: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    nodes
        .as_array()
        .expect("query-named-block-nodes returns a list")
        .iter()
        .find(|n| n["node-name"] == name)
        .unwrap_or_else(|| panic!("no node '{name}' in {nodes}"))
}

/// A path in the temp folder for this test process, `vmm-test-PID-NAME`:
/// what the tests' sockets, copies and scratch files are called. Nothing
/// is created there.
pub fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-test-{}-{name}", std::process::id()))
}

/// A disk image of `len` bytes in the temp folder, removed when dropped.
pub struct TempDisk {
    /// Where it is.
    pub path: PathBuf,
}

impl TempDisk {
    /// A sparse, zeroed image.
    pub fn new(name: &str, len: u64) -> Self {
        // Tests run in parallel threads of one process: number each image.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = temp_path(&format!("{n}-{name}.img"));
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(len))
            .expect("create disk image");
        Self { path }
    }

    /// An image filled with a pattern that differs per 512-byte sector.
    pub fn patterned(name: &str, len: u64) -> Self {
        let disk = Self::new(name, len);
        let bytes: Vec<u8> = (0..len)
            .map(|i| ((i / 512) as u8).wrapping_mul(31) ^ (i as u8))
            .collect();
        std::fs::write(&disk.path, bytes).expect("fill disk image");
        disk
    }

    /// The `--disk` option value for this image with `extra` options.
    pub fn option(&self, extra: &str) -> String {
        if extra.is_empty() {
            format!("path={}", self.path.display())
        } else {
            format!("path={},{extra}", self.path.display())
        }
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A minimal uncompressed initramfs: `/dev/console` and an `/init` that
/// cannot run (no shell behind it). Linux gets as far as `Run /init` with
/// it in seconds, where unpacking the real initramfs takes minutes on PVM
/// hosts (all guest kernel code is emulated there, gunzip included).
pub fn tiny_initramfs() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let mut cpio = Vec::new();
        let mut add = |name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
            let fields = [
                0,
                mode,
                0,
                0,
                1,
                0,
                data.len() as u32,
                0,
                0,
                rdev.0,
                rdev.1,
                name.len() as u32 + 1,
                0,
            ];
            cpio.extend_from_slice(b"070701");
            for f in fields {
                cpio.extend_from_slice(format!("{f:08x}").as_bytes());
            }
            cpio.extend_from_slice(name.as_bytes());
            cpio.push(0);
            cpio.resize(cpio.len().next_multiple_of(4), 0);
            cpio.extend_from_slice(data);
            cpio.resize(cpio.len().next_multiple_of(4), 0);
        };
        add("dev", 0o040755, (0, 0), b"");
        add("dev/console", 0o020600, (5, 1), b"");
        add("init", 0o100755, (0, 0), b"#!/bin/sh\nexit 0\n");
        add("TRAILER!!!", 0, (0, 0), b"");
        let path = temp_path("tiny.cpio");
        std::fs::write(&path, cpio).expect("write the tiny initramfs");
        path
    })
    .clone()
}

/// True on PVM hosts (see `../shared/KVM-HOSTS.md`).
pub fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The initramfs a boot test should use: the real one where guest user
/// space runs, the tiny one on PVM hosts, where it cannot anyway.
pub fn initramfs_for_host() -> PathBuf {
    if pvm_host() {
        tiny_initramfs()
    } else {
        image("initramfs.cpio.gz")
    }
}
