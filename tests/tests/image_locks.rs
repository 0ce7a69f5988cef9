//! One writer per image: a second node on a disk the guest uses is refused
//! inside the VMM, and QEMU's tools and a second `vmm` see our image locks
//! (and we see QEMU's), all against a running guest.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tests::qmp::Qmp;
use tests::{boot, expect_line, second_vmm, temp_path, testguest, TempDisk};
use vmm::VmExit;

const DISK: u64 = 16 << 20;

/// Runs one of QEMU's tools; a missing qemu-utils fails the test, saying so.
fn qemu(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {tool} ({e}): install qemu-utils (`apt-get install -y qemu-utils`; scripts/test.sh does)")
        })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A qemu-storage-daemon writing `image` through a writable NBD export,
/// as a QEMU guest would hold it; killed when dropped.
struct QemuWriter {
    child: Child,
    socket: PathBuf,
}

impl QemuWriter {
    fn start(image: &Path) -> Self {
        let socket = temp_path("locks-qsd.nbd");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={}",
                image.display()
            ))
            .args(["--blockdev", "driver=raw,node-name=r,file=f"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", socket.display()))
            .args(["--export", "type=nbd,id=e,node-name=r,writable=on"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run qemu-storage-daemon ({e}): install qemu-utils (`apt-get install -y qemu-utils`; scripts/test.sh does)")
            });
        let mut writer = Self { child, socket };
        // The export's socket appears once the image is open and locked.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !writer.socket.exists() {
            if let Some(status) = writer.child.try_wait().unwrap() {
                panic!("qemu-storage-daemon ended before serving: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not serve"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        writer
    }
}

impl Drop for QemuWriter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// QEMU's words: we want to write and someone does not share writing, or
/// (`shared`) someone writes and we do not share writing.
fn in_use_by_another_process(path: &Path, shared: bool) -> String {
    format!(
        "Failed to get {}\"write\" lock: Is another process using the image [{}]?",
        if shared { "shared " } else { "" },
        path.display()
    )
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn one_writer_per_image_inside_the_vmm_and_across_processes() {
    let disk = TempDisk::patterned("locks-disk", DISK);
    let link = temp_path("locks-disk.link");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&disk.path, &link).unwrap();
    let qemu_disk = TempDisk::new("locks-qemu", DISK);
    let copy = temp_path("locks-copy.img");
    let qemu_writer = QemuWriter::start(&qemu_disk.path);

    let qmp_path = temp_path("locks.qmp");
    let vm = boot(&testguest(
        "blk=random blk.ops=300000 blk.qd=8 blk.timeout=300 idle",
        &[disk.option("id=vda,node-name=drive0")],
        Some(&qmp_path),
    ));
    let mut qmp = Qmp::connect(&qmp_path);
    expect_line(&vm, "testguest: blk vda:", Duration::from_secs(30));

    // The found defect: a second node on the live disk (here through a
    // link) is refused, naming the node that has the file open, so no job
    // can be pointed at it; image locks off change nothing inside one VMM.
    let held = "is already open in node '#block001', held by node 'drive0' (as its 'file' child)";
    for locking in ["auto", "off"] {
        let err = qmp.err(
            "blockdev-add",
            json!({"driver": "file", "node-name": "tgt", "filename": link, "locking": locking}),
        );
        assert_eq!(err.class, "GenericError");
        assert_eq!(
            err.desc,
            format!(
                "Failed to get \"write\" lock: image '{}' {held}",
                link.display()
            )
        );
    }
    let err = qmp.err(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "tgt", "read-only": true,
               "file": {"driver": "file", "filename": disk.path, "read-only": true}}),
    );
    assert_eq!(
        err.desc,
        format!(
            "Failed to get shared \"write\" lock: image '{}' {held}",
            disk.path.display()
        )
    );
    let err = qmp.err(
        "blockdev-backup",
        json!({"job-id": "job0", "device": "drive0", "target": "tgt", "sync": "full"}),
    );
    assert_eq!(err.desc, "Cannot find device='tgt' nor node-name='tgt'");
    assert_eq!(
        qmp.ok("query-named-block-nodes", json!({}))
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // QEMU's tools see our locks while the guest runs.
    let disk_arg = disk.path.to_str().unwrap();
    let write = qemu("qemu-io", &["-f", "raw", "-c", "write 0 512", disk_arg]);
    eprintln!(
        "qemu-io -f raw -c 'write 0 512' {disk_arg}: {}",
        stderr(&write).trim()
    );
    assert!(!write.status.success());
    assert!(
        stderr(&write).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&write)
    );
    assert!(
        stderr(&write).contains(&format!("Is another process using the image [{disk_arg}]?")),
        "{}",
        stderr(&write)
    );
    let convert = qemu(
        "qemu-img",
        &["convert", "-f", "raw", disk_arg, copy.to_str().unwrap()],
    );
    eprintln!(
        "qemu-img convert -f raw {disk_arg} ...: {}",
        stderr(&convert).trim()
    );
    assert!(!convert.status.success());
    assert!(
        stderr(&convert).contains("Failed to get shared \"write\" lock"),
        "{}",
        stderr(&convert)
    );

    // A second vmm on the busy image ends with 1 and one line.
    let (code, err) = second_vmm(&disk.path);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err,
        format!(
            "vmm: disk 'vda': {}\n",
            in_use_by_another_process(&disk.path, false)
        )
    );

    // And we see QEMU's locks: an image a QEMU process writes is refused,
    // by QMP and by a second vmm, unless the user turns locking off. (A
    // writable NBD export lets others write, so what refuses us is that we
    // do not let it write.)
    let err = qmp.err(
        "blockdev-add",
        json!({"driver": "file", "node-name": "q", "filename": qemu_disk.path}),
    );
    assert_eq!(err.desc, in_use_by_another_process(&qemu_disk.path, true));
    let (code, err) = second_vmm(&qemu_disk.path);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        err,
        format!(
            "vmm: disk 'vda': {}\n",
            in_use_by_another_process(&qemu_disk.path, true)
        )
    );
    qmp.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "q", "filename": qemu_disk.path, "locking": "off"}),
    );
    qmp.ok("blockdev-del", json!({"node-name": "q"}));
    drop(qemu_writer);

    // The locks go with the VM.
    qmp.ok("quit", json!({}));
    assert_eq!(vm.wait(), VmExit::Quit);
    drop(qmp);
    let write = qemu("qemu-io", &["-f", "raw", "-c", "write 0 512", disk_arg]);
    assert!(write.status.success(), "{}", stderr(&write));
    let _ = std::fs::remove_file(&link);
    let _ = std::fs::remove_file(&copy);
}
