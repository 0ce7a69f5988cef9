//! Crash consistency of qcow2 overlays: the test guest writes 24 KiB
//! chunks at scattered places of a qcow2 overlay over a raw base of
//! random data, each followed by FLUSH and a `flushed` line
//! (`blk=durable`); the `vmm` process is killed with SIGKILL at a random
//! moment after a random number of those lines. Each time `qemu-img
//! check` must find no corruption (leaked clusters are allowed) and every
//! chunk the guest reported flushed must hold what it wrote; the next run
//! goes on with the same image (leaks and all), and every few kills a
//! fresh overlay with another cluster size begins.
//!
//! `QCOW2_CRASH_KILLS=N` sets the number of kills (default 5);
//! `scripts/qcow2-crash.sh N` runs this with N (default 50).
//! `QCOW2_CRASH_SEED=N` repeats a run's random choices.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tests::images::{check, guest_pattern, qemu_img, random_bytes, RawCopy, SALT_DURABLE};
use tests::{image, temp_path, vmm_binary};

/// The overlay's virtual size: 682 chunks of 24 KiB, more than a run
/// writes before it is killed.
const DISK: u64 = 16 << 20;
/// A fresh overlay every this many kills, so allocation (not just
/// rewrites of allocated clusters) goes on being hit.
const KILLS_PER_IMAGE: usize = 5;
/// Cluster sizes of the successive overlays.
const CLUSTER_SIZES: [&str; 3] = ["64k", "4k", "512"];
/// The most `flushed` lines to wait for before the kill.
const MAX_ROUNDS_BEFORE_KILL: u64 = 120;
/// The longest pause after that line before the kill, in microseconds.
const MAX_KILL_DELAY_US: u64 = 5_000;
/// How long a run may take to reach its chosen round.
const ROUND_TIMEOUT: Duration = Duration::from_secs(120);

// xorshift64, for the test's own choices.
use base::xorshift::XorShift64 as Rng;

/// What the kills found, over all of them.
#[derive(Debug, Default)]
struct Tally {
    kills: usize,
    /// Runs where the guest finished (or failed) before the kill.
    not_killed: usize,
    /// Kills after which `qemu-img check` reported leaked clusters.
    images_with_leaks: usize,
    leaked_clusters: u64,
    /// Kills after which the image was corrupt or could not be checked.
    corruptions: usize,
    /// Chunks reported flushed that did not hold what was written.
    lost_flushed_writes: usize,
    /// Chunks reported flushed and checked.
    flushed_checked: usize,
    /// One line per problem, to say what went wrong.
    problems: Vec<String>,
}

impl Tally {
    fn line(&self) -> String {
        format!(
            "qcow2 crash: kills={} not_killed={} images_with_leaks={} leaked_clusters={} corruptions={} lost_flushed_writes={} flushed_chunks_checked={}",
            self.kills,
            self.not_killed,
            self.images_with_leaks,
            self.leaked_clusters,
            self.corruptions,
            self.lost_flushed_writes,
            self.flushed_checked
        )
    }
}

/// A chunk the guest reported flushed: first sector, sectors.
fn flushed_chunk(line: &str) -> Option<(u64, u64)> {
    let at = line.find("testguest: blk durable vda: flushed ")?;
    let sectors = line[at..]
        .split_whitespace()
        .find_map(|t| t.strip_prefix("sectors="))?;
    let (first, count) = sectors.split_once('+')?;
    Some((first.parse().ok()?, count.parse().ok()?))
}

/// One run on `top`: boots, waits for `rounds` flushed lines, waits
/// `delay`, SIGKILLs the vmm; returns every line it printed and whether
/// the kill came before the VMM ended by itself.
fn run_and_kill(
    top: &Path,
    seed: u64,
    options: &str,
    rounds: u64,
    delay: Duration,
) -> (Vec<String>, bool) {
    let guest = image("testguest");
    let mut child = Command::new(vmm_binary())
        .args([
            "--kernel",
            guest.to_str().unwrap(),
            "--memory",
            "64M",
            "--cmdline",
        ])
        .arg(format!("blk=durable blk.seed={seed}"))
        .args([
            "--disk",
            &format!("path={},format=qcow2,{options}", top.display()),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run the vmm binary");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let mut seen = 0;
    let deadline = Instant::now() + ROUND_TIMEOUT;
    while seen < rounds {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen += u64::from(flushed_chunk(&line).is_some());
                lines.push(line);
            }
            // Ended (finished, failed) or too slow: no kill to count.
            Err(_) => break,
        }
    }
    std::thread::sleep(delay);
    let killed = matches!(child.try_wait(), Ok(None)) && seen == rounds;
    child.kill().expect("SIGKILL the vmm");
    let _ = child.wait();
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    (lines, killed)
}

/// `qemu-img check` once the dead VMM's image lock is gone: the kernel
/// tears a killed process's io_uring down after the process is reaped,
/// and the ring's registered file, with its lock, lives until then.
fn check_after_exit(top: &Path) -> tests::images::Check {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = check(top);
        if !c.text.contains("Failed to get shared \"write\" lock") || Instant::now() > deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn fresh_overlay(dir: &Path, base: &Path, n: usize, cluster: &str) -> PathBuf {
    let top = dir.join(format!("top-{n}.qcow2"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster}"),
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        top.to_str().unwrap(),
    ]);
    top
}

fn crash_runs(kills: usize) -> Tally {
    let seed = std::env::var("QCOW2_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("qcow2 crash: QCOW2_CRASH_SEED={seed}, {kills} kills");
    let mut rng = Rng(seed | 1);
    let dir = temp_path("qcow2-crash");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("base.raw");
    std::fs::write(&base, random_bytes(seed, DISK as usize)).unwrap();
    let base_before = std::fs::read(&base).unwrap();

    let mut tally = Tally::default();
    let mut top = PathBuf::new();
    for kill in 0..kills {
        if kill % KILLS_PER_IMAGE == 0 {
            let cluster = CLUSTER_SIZES[kill / KILLS_PER_IMAGE % CLUSTER_SIZES.len()];
            top = fresh_overlay(&dir, &base, kill, cluster);
        }
        let guest_seed = rng.below(u64::MAX);
        // The page cache and O_DIRECT, a sleeping and a polling dataplane.
        let options = ["poll=0", "direct=on", "poll=200", "direct=on,poll=200"][kill % 4];
        let rounds = 1 + rng.below(MAX_ROUNDS_BEFORE_KILL);
        let delay = Duration::from_micros(rng.below(MAX_KILL_DELAY_US));
        let (lines, killed) = run_and_kill(&top, guest_seed, options, rounds, delay);
        if !killed {
            tally.not_killed += 1;
            tally.problems.push(format!(
                "kill {kill}: the vmm ended before it was killed (round {rounds} never came): {}",
                lines.join(" | ")
            ));
        } else {
            tally.kills += 1;
        }
        if let Some(bad) = lines.iter().find(|l| l.contains("FAILED")) {
            tally
                .problems
                .push(format!("kill {kill}: the guest said {bad}"));
        }

        let c = check_after_exit(&top);
        if c.leaks > 0 {
            tally.images_with_leaks += 1;
            tally.leaked_clusters += c.leaks;
        }
        if c.corruptions > 0 || c.check_errors > 0 {
            tally.corruptions += 1;
            tally.problems.push(format!(
                "kill {kill} ({options}, round {rounds}): qemu-img check {}: {}",
                top.display(),
                c.text
            ));
            // Go on with a fresh image: this one says nothing more.
            top = fresh_overlay(&dir, &base, kill + kills, "64k");
            continue;
        }
        let data = std::fs::read(RawCopy::of(&top, "qcow2").path.clone()).unwrap();
        for (first, count) in lines.iter().filter_map(|l| flushed_chunk(l)) {
            tally.flushed_checked += 1;
            let at = (first * 512) as usize;
            let want = guest_pattern(guest_seed ^ SALT_DURABLE, first, count);
            if data.get(at..at + want.len()) != Some(&want[..]) {
                tally.lost_flushed_writes += 1;
                tally.problems.push(format!(
                    "kill {kill} ({options}, round {rounds}): sectors {first}+{count} were reported flushed but do not hold what was written"
                ));
            }
        }
    }
    if std::fs::read(&base).unwrap() != base_before {
        tally.problems.push("the raw base changed".into());
    }
    if tally.problems.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        tally
            .problems
            .push(format!("the images are kept in {}", dir.display()));
    }
    tally
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm on this host")]
fn sigkill_after_flushes_never_corrupts_an_overlay_or_loses_a_flushed_write() {
    let kills = std::env::var("QCOW2_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let tally = crash_runs(kills);
    println!("{}", tally.line());
    assert!(
        tally.problems.is_empty() && tally.kills == kills,
        "{}\n{}",
        tally.line(),
        tally.problems.join("\n")
    );
    assert!(tally.flushed_checked >= kills, "{}", tally.line());
}
