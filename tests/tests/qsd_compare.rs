//! Our VMM against qemu-storage-daemon: the same QMP commands to both, and
//! the same answers expected back. For each command the reply must have the
//! same shape (`return` or `error`; the same JSON types and field names) and
//! an error the same class; descriptions may differ and are printed side by
//! side. For jobs, each job's JOB_STATUS_CHANGE sequence and its BLOCK_JOB_*
//! events, in order among the status changes, must match.
//!
//! Every difference is collected and the test fails at the end listing all
//! of them, so one run shows everything to fix.
//!
//! Needs `qemu-storage-daemon` (Debian `qemu-utils`; `scripts/test.sh`
//! installs it): without it the test fails and says so.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tests::qmp::{Qmp, QmpErr};
use tests::{boot, expect_line, image, temp_path, TempDisk};
use vmm::{VmConfig, VmExit, VmHandle};

const QSD: &str = "qemu-storage-daemon";
/// Every image in these tests; small, so unthrottled jobs end at once.
const SIZE: u64 = 8 << 20;
/// Slow enough that a throttled job of `SIZE` runs for seconds.
const SLOW: u64 = 1 << 20;
const JOB_TIMEOUT: Duration = Duration::from_secs(30);

/// A qemu-storage-daemon with its QMP monitor on a socket; killed when dropped.
struct Qsd {
    child: Child,
    socket: PathBuf,
}

impl Qsd {
    fn start(name: &str) -> Self {
        let socket = temp_path(&format!("{name}-qsd.qmp"));
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(QSD)
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=mon",
                socket.display()
            ))
            .args(["--monitor", "chardev=mon"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // It warns on stderr about null-co targets' block size: noise here.
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {QSD} ({e}): install it with `apt-get install -y qemu-utils` (scripts/test.sh does)")
            });
        Self { child, socket }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn qsd_version() -> String {
    Command::new(QSD)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

/// One event as it arrived: in the window of which command (or wait).
struct Logged {
    window: usize,
    label: String,
    event: Value,
}

/// One server: its connection, the events it sent, and its image files
/// (each side has its own, since qsd locks the files it opens).
struct Side {
    qmp: Qmp,
    log: Vec<Logged>,
    files: HashMap<&'static str, PathBuf>,
    /// The window of the last command, and whether it succeeded.
    last_window: usize,
    last_ok: bool,
}

type Reply = Result<Value, QmpErr>;

impl Side {
    fn new(qmp: Qmp, files: &[(&'static str, TempDisk)]) -> Self {
        Self {
            qmp,
            log: Vec::new(),
            files: files.iter().map(|(k, d)| (*k, d.path.clone())).collect(),
            last_window: 0,
            last_ok: false,
        }
    }

    /// Moves the events received so far into the log, in window `window`.
    fn collect(&mut self, window: usize, label: &str) {
        for event in self.qmp.events.drain(..) {
            self.log.push(Logged {
                window,
                label: label.to_string(),
                event,
            });
        }
    }

    /// `args` with every string "$name" replaced by this side's file `name`.
    fn subst(&self, args: &Value) -> Value {
        match args {
            Value::String(s) if s.starts_with('$') => {
                json!(self.files[&s[1..]].display().to_string())
            }
            Value::Object(m) => {
                Value::Object(m.iter().map(|(k, v)| (k.clone(), self.subst(v))).collect())
            }
            other => other.clone(),
        }
    }

    fn execute(&mut self, window: usize, command: &str, args: &Value) -> Reply {
        let r = self.qmp.execute(command, self.subst(args));
        self.collect(window, command);
        self.last_window = window;
        self.last_ok = r.is_ok();
        r
    }

    fn raw(&mut self, window: usize, text: &str) -> Value {
        // The newline ends a bare number, which a JSON stream cannot
        // otherwise tell is complete.
        self.qmp.send_raw(format!("{text}\n").as_bytes());
        let r = self.qmp.reply();
        self.collect(window, "raw");
        r
    }
}

fn show(r: &Reply) -> String {
    match r {
        Ok(v) => json!({ "return": v }).to_string(),
        Err(e) => json!({"error": {"class": e.class, "desc": e.desc}}).to_string(),
    }
}

/// Where two JSON values differ in shape: JSON types, object keys, array lengths.
fn shape_diffs(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let only_a: Vec<_> = x.keys().filter(|k| !y.contains_key(*k)).collect();
            let only_b: Vec<_> = y.keys().filter(|k| !x.contains_key(*k)).collect();
            if !only_a.is_empty() || !only_b.is_empty() {
                out.push(format!(
                    "{path}: fields only in qsd {only_a:?}, only in ours {only_b:?}"
                ));
            }
            for (k, v) in x {
                if let Some(w) = y.get(k) {
                    shape_diffs(&format!("{path}.{k}"), v, w, out);
                }
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                out.push(format!(
                    "{path}: {} items in qsd, {} in ours",
                    x.len(),
                    y.len()
                ));
            }
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                shape_diffs(&format!("{path}[{i}]"), v, w, out);
            }
        }
        (Value::Number(_), Value::Number(_))
        | (Value::String(_), Value::String(_))
        | (Value::Bool(_), Value::Bool(_))
        | (Value::Null, Value::Null) => {}
        _ => out.push(format!("{path}: {a} in qsd, {b} in ours")),
    }
}

/// The same `field` of every object in `v` (one object or an array of them).
fn field_values(v: &Value, field: &str) -> Vec<Value> {
    match v {
        Value::Array(items) => items.iter().map(|i| i[field].clone()).collect(),
        other => vec![other[field].clone()],
    }
}

/// Log positions on both sides: "events from here on".
#[derive(Clone, Copy)]
struct Mark {
    qsd: usize,
    ours: usize,
}

/// Where the statuses and BLOCK_JOB_* events of one job stand in its sequence.
#[derive(Debug, Clone)]
struct JobEvent {
    window: usize,
    label: String,
    /// A status (`running`) or an event name (`BLOCK_JOB_COMPLETED`).
    token: String,
    data: Value,
}

fn job_events(log: &[Logged], job: &str) -> Vec<JobEvent> {
    log.iter()
        .filter_map(|l| {
            let e = &l.event;
            let name = e["event"].as_str().unwrap_or("");
            let token = if name == "JOB_STATUS_CHANGE" && e["data"]["id"] == job {
                e["data"]["status"].as_str().unwrap_or("?").to_string()
            } else if name.starts_with("BLOCK_JOB_")
                && (e["data"]["device"] == job || e["data"]["id"] == job)
            {
                name.to_string()
            } else {
                return None;
            };
            Some(JobEvent {
                window: l.window,
                label: l.label.clone(),
                token,
                data: e["data"].clone(),
            })
        })
        .collect()
}

/// qsd's events without the drains ours does not imitate.
///
/// QEMU drains a job's nodes around graph changes: `blockdev-backup` keeps
/// its source drained for the whole command (blockdev.c: the transaction
/// action calls `bdrv_drained_begin`, its `.clean` the end; the target is
/// drained by `bdrv_try_change_aio_context`), and the job it creates is
/// started inside that section. A drain pauses every job using the node and
/// resumes it when it ends, so qsd sends `paused` then `running`, both
/// before the command's reply (checked: they arrive in that one window),
/// for the new job and for other running jobs; a refused `blockdev-backup`
/// and a job's completion drain the same way.
///
/// Ours imitates the first, the pair of the job's own start, so that one is
/// kept and compared: a pair in the window where the job was `created`.
/// Any other pair counts as a drain and is left out when both events came
/// in the window of one command that is not job-pause or job-resume (a
/// client's own pause and resume are two commands, so never one window).
fn without_drain_pauses(events: Vec<JobEvent>) -> Vec<JobEvent> {
    let start = events
        .iter()
        .find(|e| e.token == "created")
        .map(|e| e.window);
    let mut out: Vec<JobEvent> = Vec::new();
    for e in events {
        let is_drain_pair = e.token == "running"
            && Some(e.window) != start
            && out.last().is_some_and(|p| {
                p.token == "paused"
                    && p.window == e.window
                    && p.label != "job-pause"
                    && p.label != "job-resume"
            });
        if is_drain_pair {
            out.pop();
        } else {
            out.push(e);
        }
    }
    out
}

/// Both servers, fed the same commands.
struct Compare {
    qsd: Side,
    ours: Side,
    window: usize,
    /// What does not match: the test fails with all of them.
    diffs: Vec<String>,
    /// Error descriptions that differ (allowed; printed for whoever reads the log).
    desc_notes: Vec<String>,
    /// Jobs whose events were compared.
    compared_jobs: Vec<String>,
    /// Our VM, until `quit`.
    vm: Option<VmHandle>,
    /// Kept alive for the test: the daemon and both sides' images.
    _qsd: Qsd,
    _images: Vec<TempDisk>,
}

impl Compare {
    /// Both servers up, connected, each with its own images.
    fn start(name: &str) -> Self {
        let daemon = Qsd::start(name);
        let (vm, ours_path) = our_vm(name);
        let qsd_files = images(&format!("{name}-qsd"));
        let our_files = images(&format!("{name}-ours"));
        let qsd = Side::new(Qmp::connect(&daemon.socket), &qsd_files);
        let ours = Side::new(Qmp::connect(&ours_path), &our_files);
        Self {
            qsd,
            ours,
            vm: Some(vm),
            _qsd: daemon,
            _images: qsd_files
                .into_iter()
                .chain(our_files)
                .map(|(_, d)| d)
                .collect(),
            window: 0,
            diffs: Vec::new(),
            desc_notes: Vec::new(),
            compared_jobs: Vec::new(),
        }
    }

    fn next_window(&mut self) -> usize {
        self.window += 1;
        self.window
    }

    fn diff(&mut self, what: &str, a: &str, b: &str, why: &str) {
        self.diffs.push(format!(
            "{what}\n      qsd:  {a}\n      ours: {b}\n      differs: {why}"
        ));
    }

    /// Runs `command` on both and compares the replies' shapes and error
    /// classes.
    fn same(&mut self, command: &str, args: Value) {
        self.same_fields(command, args, &[])
    }

    /// As `same`, and the values of `fields` in the return value (an object
    /// or an array of objects) must be equal too.
    fn same_fields(&mut self, command: &str, args: Value, fields: &[&str]) {
        let w = self.next_window();
        let a = self.qsd.execute(w, command, &args);
        let b = self.ours.execute(w, command, &args);
        let what = format!("{command} {args}");
        match (&a, &b) {
            (Ok(x), Ok(y)) => {
                let mut why = Vec::new();
                shape_diffs("return", x, y, &mut why);
                for f in fields {
                    let (fx, fy) = (field_values(x, f), field_values(y, f));
                    if fx != fy {
                        why.push(format!("'{f}': {fx:?} in qsd, {fy:?} in ours"));
                    }
                }
                if !why.is_empty() {
                    self.diff(&what, &show(&a), &show(&b), &why.join("; "));
                }
            }
            (Err(x), Err(y)) => {
                if x.class != y.class {
                    self.diff(&what, &show(&a), &show(&b), "error class");
                } else if x.desc != y.desc {
                    self.desc_notes.push(format!(
                        "{what}\n      qsd:  {}\n      ours: {}",
                        x.desc, y.desc
                    ));
                }
            }
            _ => self.diff(&what, &show(&a), &show(&b), "one succeeded, one failed"),
        }
    }

    /// Sends `text` as it is to both (malformed QMP input) and compares the
    /// error replies' classes, and that both echo an `id` or neither does.
    fn same_raw(&mut self, text: &str) {
        let w = self.next_window();
        let a = self.qsd.raw(w, text);
        let b = self.ours.raw(w, text);
        let class = |v: &Value| v["error"]["class"].clone();
        if class(&a) != class(&b)
            || a.get("id") != b.get("id")
            || a.get("return").is_some() != b.get("return").is_some()
        {
            self.diff(
                &format!("raw input {text:?}"),
                &a.to_string(),
                &b.to_string(),
                "reply or error class",
            );
        } else if a["error"]["desc"] != b["error"]["desc"] {
            self.desc_notes.push(format!(
                "raw input {text:?}\n      qsd:  {}\n      ours: {}",
                a["error"]["desc"], b["error"]["desc"]
            ));
        }
    }

    /// `blockdev-backup` with `args` on both; Some if both started the job.
    fn started(&mut self, args: Value) -> Option<()> {
        let w = self.window + 1;
        self.same("blockdev-backup", args);
        let ok = |side: &Side| side.last_ok && side.last_window == w;
        (ok(&self.qsd) && ok(&self.ours)).then_some(())
    }

    /// `wait_status` as an Option, for `?`.
    fn reach(&mut self, job: &str, status: &str, since: Mark) -> Option<()> {
        self.wait_status(job, status, since).then_some(())
    }

    /// Cancels and dismisses `job` on both sides, whatever its state,
    /// without comparing anything: a scenario went wrong, and the next one
    /// must not find this job holding its nodes.
    fn abandon(&mut self, job: &str) {
        self.compared_jobs.push(job.to_string());
        let w = self.next_window();
        for side in [&mut self.qsd, &mut self.ours] {
            let _ = side.qmp.execute("job-cancel", json!({ "id": job }));
            side.qmp.events_until(Duration::from_secs(5), |events| {
                events.iter().any(|e| {
                    e["event"] == "JOB_STATUS_CHANGE"
                        && e["data"]["id"] == job
                        && (e["data"]["status"] == "concluded" || e["data"]["status"] == "null")
                })
            });
            let _ = side.qmp.execute("job-dismiss", json!({ "id": job }));
            side.collect(w, "abandon");
        }
    }

    fn mark(&self) -> Mark {
        Mark {
            qsd: self.qsd.log.len() + self.qsd.qmp.events.len(),
            ours: self.ours.log.len() + self.ours.qmp.events.len(),
        }
    }

    /// Waits on both sides until `job` has reached `status` in the events
    /// since `since`; a side that does not is a difference. Whether both did.
    fn wait_status(&mut self, job: &str, status: &str, since: Mark) -> bool {
        let w = self.next_window();
        let mut ok = true;
        for ours in [false, true] {
            let (side, from) = if ours {
                (&mut self.ours, since.ours)
            } else {
                (&mut self.qsd, since.qsd)
            };
            side.collect(w, "wait");
            let already = side.log.len();
            let seen = |events: &[Value], log: &[Logged]| {
                log[from.min(log.len())..]
                    .iter()
                    .map(|l| &l.event)
                    .chain(events)
                    .any(|e| {
                        e["event"] == "JOB_STATUS_CHANGE"
                            && e["data"]["id"] == job
                            && e["data"]["status"] == status
                    })
            };
            let (qmp, log) = (&mut side.qmp, &side.log[..already]);
            let reached = qmp.events_until(JOB_TIMEOUT, |events| seen(events, log));
            side.collect(w, "wait");
            if !reached {
                let seq: Vec<String> = job_events(&side.log, job)
                    .into_iter()
                    .map(|e| e.token)
                    .collect();
                self.diffs.push(format!(
                    "job '{job}' did not reach '{status}' within {JOB_TIMEOUT:?} in {}; its events: {seq:?}",
                    if ours { "ours" } else { "qsd" }
                ));
                ok = false;
            }
        }
        ok
    }

    /// Compares `job`'s status changes and BLOCK_JOB_* events since `since`.
    fn same_job_events(&mut self, job: &str, since: Mark) {
        self.compared_jobs.push(job.to_string());
        let a = without_drain_pauses(job_events(&self.qsd.log[since.qsd..], job));
        let b = job_events(&self.ours.log[since.ours..], job);
        let tokens = |v: &[JobEvent]| v.iter().map(|e| e.token.clone()).collect::<Vec<_>>();
        let (ta, tb) = (tokens(&a), tokens(&b));
        if ta != tb {
            self.diffs.push(format!(
                "job '{job}': status changes and BLOCK_JOB_* events (qsd's drain pauses after its start left out)\n      qsd:  {ta:?}\n      ours: {tb:?}"
            ));
            return;
        }
        for (x, y) in a.iter().zip(&b) {
            if !x.token.starts_with("BLOCK_JOB_") {
                continue;
            }
            let mut why = Vec::new();
            shape_diffs("data", &x.data, &y.data, &mut why);
            for f in ["device", "id", "type", "len", "speed"] {
                if x.data.get(f) != y.data.get(f) {
                    why.push(format!("'{f}'"));
                }
            }
            // Where a cancelled job stopped depends on timing; whether it
            // got to the end does not here.
            let at_end = |d: &Value| d.get("offset").is_some() && d.get("offset") == d.get("len");
            if at_end(&x.data) != at_end(&y.data) {
                why.push("offset == len".into());
            }
            if !why.is_empty() {
                self.diffs.push(format!(
                    "job '{job}' {}\n      qsd:  {}\n      ours: {}\n      differs: {}",
                    x.token,
                    x.data,
                    y.data,
                    why.join(", ")
                ));
            }
        }
    }

    /// Status changes of jobs never compared: jobs made and dropped inside
    /// a refused command, or started on one side only.
    fn stray_jobs(&self) -> Vec<String> {
        let ids = |log: &[Logged]| {
            log.iter()
                .filter(|l| l.event["event"] == "JOB_STATUS_CHANGE")
                .filter_map(|l| l.event["data"]["id"].as_str().map(str::to_string))
                .collect::<Vec<_>>()
        };
        let mut all = ids(&self.qsd.log);
        all.extend(ids(&self.ours.log));
        all.sort();
        all.dedup();
        all.retain(|id| !self.compared_jobs.contains(id));
        all.iter()
            .map(|id| {
                let seq = |log: &[Logged]| {
                    job_events(log, id)
                        .into_iter()
                        .map(|e| format!("{} (in {})", e.token, e.label))
                        .collect::<Vec<_>>()
                };
                format!(
                    "job '{id}'\n      qsd:  {:?}\n      ours: {:?}",
                    seq(&self.qsd.log),
                    seq(&self.ours.log)
                )
            })
            .collect()
    }

    /// `quit` to both (our VM must end with it), then fails the test with
    /// every difference; prints the notes.
    fn finish(mut self, name: &str) {
        self.same("quit", json!({}));
        let vm = self.vm.take().unwrap();
        assert_eq!(vm.wait(), VmExit::Quit, "our VM ends with `quit`");
        eprintln!("{name}: compared against {}", qsd_version());
        let stray = self.stray_jobs();
        if !stray.is_empty() {
            // Not asserted: a job made and dropped inside a refused command
            // is QEMU's internal order of checks, and a job only one side
            // started already shows as a differing reply above.
            eprintln!("{name}: events of jobs not compared (made inside a refused command, or started on one side only):");
            for n in &stray {
                eprintln!("  {n}");
            }
        }
        if !self.desc_notes.is_empty() {
            eprintln!(
                "{name}: same error class, different description ({}):",
                self.desc_notes.len()
            );
            for n in &self.desc_notes {
                eprintln!("  {n}");
            }
        }
        assert!(
            self.diffs.is_empty(),
            "{name}: {} differences between qemu-storage-daemon and ours:\n  {}",
            self.diffs.len(),
            self.diffs.join("\n  ")
        );
    }
}

/// Our VMM: the test guest idling, no disk, QMP on a socket.
fn our_vm(name: &str) -> (VmHandle, PathBuf) {
    let path = temp_path(&format!("{name}-ours.qmp"));
    let mut config = VmConfig::new(image("testguest"));
    config.cmdline = "idle".into();
    config.qmp = Some(path.clone());
    let vm = boot(&config);
    expect_line(&vm, "testguest: idle", Duration::from_secs(30));
    (vm, path)
}

/// Images for one side: `src` patterned, `dst` and `other` zeroed, all `SIZE`.
fn images(side: &str) -> Vec<(&'static str, TempDisk)> {
    vec![
        ("src", TempDisk::patterned(&format!("{side}-src"), SIZE)),
        ("dst", TempDisk::new(&format!("{side}-dst"), SIZE)),
        ("other", TempDisk::new(&format!("{side}-other"), SIZE)),
    ]
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn block_graph_commands_and_errors_match_qsd() {
    let name = "qsd-graph";
    let mut c = Compare::start(name);

    // Nodes of each driver.
    c.same(
        "blockdev-add",
        json!({"driver": "file", "node-name": "src", "filename": "$src"}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f2", "filename": "$dst"}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r2", "file": "f2"}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "sink", "size": SIZE}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "dflt"}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r3", "file": {"driver": "file", "filename": "$other"}}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "ro", "read-only": true}),
    );

    // Refused adds.
    c.same(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "sink"}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "file", "node-name": "src", "filename": "$other"}),
    );
    for bad in ["1bad", "a b", "-x", "_x", "x@y", "#block1", ""] {
        c.same(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": bad}),
        );
    }
    c.same(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "a".repeat(32)}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "a".repeat(31)}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "file", "filename": "$other"}),
    );
    c.same("blockdev-add", json!({"driver": "null-co"}));
    c.same(
        "blockdev-add",
        json!({"driver": "no-such-driver", "node-name": "x1"}),
    );
    c.same("blockdev-add", json!({"driver": "file", "node-name": "x2"}));
    c.same(
        "blockdev-add",
        json!({"driver": "file", "node-name": "x3", "filename": "/nonexistent/vmm-test.img"}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "x4", "file": "no-such-node"}),
    );
    c.same("blockdev-add", json!({"driver": "raw", "node-name": "x5"}));
    c.same(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "x6", "file": 7}),
    );

    // Wrong argument types, missing and unexpected arguments.
    c.same(
        "blockdev-add",
        json!({"driver": "file", "node-name": "x7", "filename": 5}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "x8", "size": "big"}),
    );
    // Not `"size": -1`: qsd 10.0.2 aborts on it ("Unexpected error in
    // parse_option_size()", status 134), so there is nothing to compare.
    c.same("blockdev-add", json!({"driver": "null-co", "node-name": 5}));
    c.same(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "x10", "read-only": "yes"}),
    );
    c.same("blockdev-add", json!({"driver": 3, "node-name": "x11"}));
    c.same(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "x12", "bogus": 1}),
    );
    c.same("blockdev-add", json!({}));
    c.same("blockdev-del", json!({}));
    c.same("blockdev-del", json!({"node-name": 5}));
    c.same("blockdev-del", json!({"node-name": "sink", "bogus": 1}));
    c.same("query-block", json!({"bogus": 1}));
    c.same("query-version", json!({"bogus": 1}));
    c.same("query-named-block-nodes", json!({"flat": "yes"}));
    c.same("no-such-command", json!({}));
    c.same("query-version", json!({}));
    // Neither has a guest device: qsd has none, our VM was given no disk.
    c.same("query-block", json!({}));

    // Deleting: unknown, in use by a parent, then the parent and the child.
    c.same("blockdev-del", json!({"node-name": "no-such-node"}));
    c.same("blockdev-del", json!({"node-name": "f2"}));
    c.same("blockdev-del", json!({"node-name": "r2"}));
    c.same("blockdev-del", json!({"node-name": "f2"}));
    c.same("blockdev-del", json!({"node-name": "f2"}));
    c.same("blockdev-del", json!({"node-name": "r3"}));
    c.same("blockdev-del", json!({"node-name": "dflt"}));

    // Malformed QMP input, below the commands.
    c.same_raw(r#"{"execute": 5}"#);
    c.same_raw(r#"{"arguments": {}}"#);
    c.same_raw(r#"{"execute": "query-version", "arguments": []}"#);
    c.same_raw(r#"{"execute": "query-version", "bogus": 1}"#);
    c.same_raw(r#"{"execute": "query-version", "id": {"n": [1, "x"]}}"#);
    c.same_raw(r#"{"execute": "no-such-command", "id": 7}"#);
    c.same_raw("[]");
    c.same_raw("42");

    c.finish(name);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn job_lifecycles_match_qsd() {
    let name = "qsd-jobs";
    let mut c = Compare::start(name);
    c.same(
        "blockdev-add",
        json!({"driver": "file", "node-name": "src", "filename": "$src"}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "file", "node-name": "dst", "filename": "$dst"}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "file", "node-name": "src2", "filename": "$other"}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "sink", "size": SIZE}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "sink2", "size": SIZE}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "small", "size": SIZE / 8}),
    );
    c.same("query-jobs", json!({}));
    c.same("query-block-jobs", json!({}));

    // Refused backups.
    c.same("blockdev-backup", backup("e1", "no-such-node", "sink"));
    c.same("blockdev-backup", backup("e2", "src", "no-such-node"));
    c.same("blockdev-backup", backup("e3", "src", "small"));
    c.same("blockdev-backup", backup("e4", "src", "src"));
    c.same("blockdev-backup", backup("1bad", "src", "sink"));
    c.same(
        "blockdev-backup",
        json!({"device": "src", "target": "sink", "sync": "full"}),
    );
    c.same(
        "blockdev-backup",
        json!({"job-id": "e5", "device": "src", "target": "sink"}),
    );
    c.same(
        "blockdev-backup",
        json!({"job-id": "e6", "device": "src", "target": "sink", "sync": "bogus"}),
    );
    c.same(
        "blockdev-backup",
        json!({"job-id": "e7", "device": "src", "target": "sink", "sync": "full", "speed": "fast"}),
    );
    // qsd creates job e8 before it checks the speed, and sends its created
    // and null status changes (see the notes at the end).
    c.same(
        "blockdev-backup",
        json!({"job-id": "e8", "device": "src", "target": "sink", "sync": "full", "speed": -1}),
    );
    c.same("blockdev-backup", json!({"job-id": "e9", "device": "src", "target": "sink", "sync": "full", "auto-finalize": "no"}));
    c.same(
        "blockdev-backup",
        json!({"job-id": "e10", "device": "src", "target": "sink", "sync": "full", "bogus": 1}),
    );
    c.same(
        "blockdev-backup",
        json!({"job-id": "e11", "device": 4, "target": "sink", "sync": "full"}),
    );
    c.same("query-jobs", json!({}));
    // Verbs on a job that does not exist.
    for verb in [
        "job-pause",
        "job-resume",
        "job-cancel",
        "job-finalize",
        "job-dismiss",
    ] {
        c.same(verb, json!({"id": "no-such-job"}));
        c.same(verb, json!({}));
    }
    c.same(
        "block-job-set-speed",
        json!({"device": "no-such-job", "speed": 1}),
    );
    c.same("query-jobs", json!({"bogus": 1}));

    scenario(&mut c, "j1", auto_finalize_and_dismiss);
    scenario(&mut c, "j2", manual_finalize_and_dismiss);
    scenario(&mut c, "j3", cancelled_while_pending);
    scenario(&mut c, "j4", throttled_paused_resumed);
    scenario(&mut c, "j5", throttled_and_cancelled);
    c.same("query-jobs", json!({}));
    c.same("blockdev-del", json!({"node-name": "sink"}));

    c.finish(name);
}

const JOB_FIELDS: [&str; 4] = ["id", "type", "status", "total-progress"];
const BLOCK_JOB_FIELDS: [&str; 10] = [
    "device",
    "type",
    "status",
    "len",
    "speed",
    "paused",
    "ready",
    "io-status",
    "auto-finalize",
    "auto-dismiss",
];

fn backup(id: &str, from: &str, to: &str) -> Value {
    json!({"job-id": id, "device": from, "target": to, "sync": "full"})
}

/// Runs one job's scenario; if it could not go on (a start or a state one
/// side did not reach), drops the job on both sides so the next starts clean.
fn scenario(c: &mut Compare, job: &str, run: fn(&mut Compare, &str) -> Option<()>) {
    if run(c, job).is_none() {
        c.abandon(job);
    }
}

/// auto-finalize and auto-dismiss (the defaults): it runs to the end and
/// goes away by itself.
fn auto_finalize_and_dismiss(c: &mut Compare, job: &str) -> Option<()> {
    let m = c.mark();
    c.started(backup(job, "src", "sink"))?;
    c.reach(job, "null", m)?;
    c.same_job_events(job, m);
    Some(())
}

/// Neither: it waits in pending, then in concluded, for the client; verbs
/// those states do not take are refused.
fn manual_finalize_and_dismiss(c: &mut Compare, job: &str) -> Option<()> {
    let m = c.mark();
    let mut args = backup(job, "src", "dst");
    args["auto-finalize"] = json!(false);
    args["auto-dismiss"] = json!(false);
    c.started(args)?;
    c.reach(job, "pending", m)?;
    let mut fields = JOB_FIELDS.to_vec();
    // Done copying, whatever the timing.
    fields.push("current-progress");
    c.same_fields("query-jobs", json!({}), &fields);
    c.same_fields("query-block-jobs", json!({}), &BLOCK_JOB_FIELDS);
    c.same("job-dismiss", json!({ "id": job }));
    c.same("job-pause", json!({ "id": job }));
    c.same("job-resume", json!({ "id": job }));
    c.same("block-job-set-speed", json!({"device": job, "speed": 1}));
    c.same("job-finalize", json!({ "id": job }));
    c.reach(job, "concluded", m)?;
    c.same_fields("query-jobs", json!({}), &fields);
    c.same("job-finalize", json!({ "id": job }));
    c.same("job-cancel", json!({ "id": job }));
    c.same("job-pause", json!({ "id": job }));
    c.same("job-dismiss", json!({ "id": job }));
    c.reach(job, "null", m)?;
    c.same_job_events(job, m);
    c.same("job-dismiss", json!({ "id": job }));
    c.same("query-jobs", json!({}));
    Some(())
}

/// auto-finalize off, auto-dismiss on: cancelled while pending.
fn cancelled_while_pending(c: &mut Compare, job: &str) -> Option<()> {
    let m = c.mark();
    let mut args = backup(job, "src", "sink");
    args["auto-finalize"] = json!(false);
    c.started(args)?;
    c.reach(job, "pending", m)?;
    c.same("job-cancel", json!({ "id": job }));
    c.reach(job, "null", m)?;
    c.same_job_events(job, m);
    Some(())
}

/// Throttled, paused and resumed, its speed changed; a second job with its
/// id refused meanwhile; then unthrottled, it ends.
fn throttled_paused_resumed(c: &mut Compare, job: &str) -> Option<()> {
    let m = c.mark();
    let mut args = backup(job, "src", "sink");
    args["speed"] = json!(SLOW);
    c.started(args)?;
    c.same_fields("query-jobs", json!({}), &JOB_FIELDS);
    c.same_fields("query-block-jobs", json!({}), &BLOCK_JOB_FIELDS);
    c.same("blockdev-backup", backup(job, "src2", "sink2"));
    let p = c.mark();
    c.same("job-pause", json!({ "id": job }));
    c.reach(job, "paused", p)?;
    c.same_fields("query-jobs", json!({}), &JOB_FIELDS);
    c.same_fields("query-block-jobs", json!({}), &BLOCK_JOB_FIELDS);
    c.same("job-pause", json!({ "id": job }));
    c.same(
        "block-job-set-speed",
        json!({"device": job, "speed": 2 * SLOW}),
    );
    c.same("block-job-set-speed", json!({"device": job, "speed": -1}));
    c.same("block-job-set-speed", json!({"device": job, "speed": "x"}));
    c.same("block-job-set-speed", json!({ "device": job }));
    c.same_fields("query-block-jobs", json!({}), &BLOCK_JOB_FIELDS);
    let r = c.mark();
    c.same("job-resume", json!({ "id": job }));
    c.reach(job, "running", r)?;
    c.same("job-resume", json!({ "id": job }));
    c.same("block-job-set-speed", json!({"device": job, "speed": 0}));
    c.reach(job, "null", m)?;
    c.same_job_events(job, m);
    Some(())
}

/// Throttled and cancelled while it runs.
fn throttled_and_cancelled(c: &mut Compare, job: &str) -> Option<()> {
    let m = c.mark();
    let mut args = backup(job, "src", "sink");
    args["speed"] = json!(SLOW);
    c.started(args)?;
    c.same("job-cancel", json!({ "id": job }));
    c.reach(job, "null", m)?;
    c.same_job_events(job, m);
    Some(())
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn nbd_export_commands_and_errors_match_qsd() {
    let name = "qsd-nbd";
    let mut c = Compare::start(name);
    for (side, tag) in [(&mut c.qsd, "qsd"), (&mut c.ours, "ours")] {
        side.files
            .insert("sock", temp_path(&format!("{name}-{tag}.nbd")));
    }
    let sock = json!({"type": "unix", "data": {"path": "$sock"}});
    c.same(
        "blockdev-add",
        json!({"driver": "file", "node-name": "src", "filename": "$src"}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "$dst"}}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "ro", "read-only": true}),
    );
    // Nothing before the server runs.
    c.same(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "src"}),
    );
    c.same("nbd-server-stop", json!({}));
    c.same("nbd-server-add", json!({"device": "src"}));
    c.same("nbd-server-start", json!({"addr": sock}));
    c.same("nbd-server-start", json!({"addr": sock}));
    c.same("query-block-exports", json!({}));
    // Refused adds.
    c.same(
        "block-export-add",
        json!({"type": "nbd", "node-name": "src"}),
    );
    c.same("block-export-add", json!({"type": "nbd", "id": "e0"}));
    c.same(
        "block-export-add",
        json!({"type": "bogus", "id": "e0", "node-name": "src"}),
    );
    c.same(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "nope"}),
    );
    c.same(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "src", "unknown": 1}),
    );
    c.same(
        "block-export-add",
        json!({"type": "nbd", "id": "w", "node-name": "ro", "writable": true}),
    );
    c.same(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "src", "writable": "yes"}),
    );
    // Accepted, then the duplicates.
    c.same(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "src", "description": "d"}),
    );
    c.same(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "ro"}),
    );
    c.same(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "ro", "name": "src"}),
    );
    c.same(
        "nbd-server-add",
        json!({"device": "r", "name": "rexp", "writable": true}),
    );
    c.same("query-block-exports", json!({}));
    // Deletes.
    c.same("block-export-del", json!({"id": "nope"}));
    c.same("block-export-del", json!({"id": "e0", "mode": "bogus"}));
    c.same("block-export-del", json!({"id": "e0"}));
    c.same("block-export-del", json!({"id": "e0"}));
    c.same("block-export-del", json!({"id": "rexp", "mode": "hard"}));
    c.same("query-block-exports", json!({}));
    c.same(
        "block-export-add",
        json!({"type": "nbd", "id": "e2", "node-name": "ro"}),
    );
    c.same("nbd-server-stop", json!({}));
    c.same("nbd-server-stop", json!({}));
    c.same("query-block-exports", json!({}));
    c.finish(name);
}

impl Compare {
    /// `query-named-block-nodes` on both: node `node`'s `dirty-bitmaps`
    /// (absent with none) must be equal, every field.
    fn same_bitmaps(&mut self, node: &str) {
        let w = self.next_window();
        let args = json!({});
        let pick = |r: &Reply| -> Value {
            let Ok(Value::Array(nodes)) = r else {
                return json!("query failed");
            };
            nodes
                .iter()
                .find(|n| n["node-name"] == node)
                .map(|n| n.get("dirty-bitmaps").cloned().unwrap_or(Value::Null))
                .unwrap_or(json!("no such node"))
        };
        let a = pick(&self.qsd.execute(w, "query-named-block-nodes", &args));
        let b = pick(&self.ours.execute(w, "query-named-block-nodes", &args));
        if a != b {
            self.diff(
                &format!("dirty-bitmaps of '{node}'"),
                &a.to_string(),
                &b.to_string(),
                "values",
            );
        }
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn dirty_bitmap_commands_and_errors_match_qsd() {
    let name = "qsd-bitmaps";
    let mut c = Compare::start(name);
    c.same(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "src", "file": {"driver": "file", "node-name": "srcf", "filename": "$src"}}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "dst", "file": {"driver": "file", "filename": "$dst"}}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "sink", "size": SIZE}),
    );
    c.same_bitmaps("src");

    // Adding: defaults, each argument, and every refusal.
    let add = |name: &str| json!({"node": "src", "name": name});
    c.same("block-dirty-bitmap-add", add("b0"));
    c.same("block-dirty-bitmap-add", add("b0"));
    c.same("block-dirty-bitmap-add", add(""));
    c.same("block-dirty-bitmap-add", add(&"x".repeat(1024)));
    c.same("block-dirty-bitmap-add", add(&"x".repeat(1023)));
    c.same(
        "block-dirty-bitmap-add",
        json!({"node": "nope", "name": "b"}),
    );
    c.same(
        "block-dirty-bitmap-add",
        json!({"node": "nope", "name": ""}),
    );
    for g in [
        json!(256),
        json!(3000),
        json!(1u64 << 32),
        json!(-1),
        json!("big"),
    ] {
        c.same(
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "g", "granularity": g}),
        );
    }
    c.same(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "g512", "granularity": 512}),
    );
    c.same(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "g2g", "granularity": 1u64 << 31}),
    );
    c.same(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "off", "disabled": true}),
    );
    for node in ["src", "srcf", "sink"] {
        c.same(
            "block-dirty-bitmap-add",
            json!({"node": node, "name": "p", "persistent": true}),
        );
    }
    c.same(
        "block-dirty-bitmap-add",
        json!({"node": "sink", "name": "s"}),
    );
    c.same(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b9", "bogus": 1}),
    );
    c.same("block-dirty-bitmap-add", json!({"node": "src"}));
    c.same_bitmaps("src");
    c.same_bitmaps("sink");
    c.same_bitmaps("srcf");

    // The others: unknown node, unknown bitmap, then each verb.
    for verb in [
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
    ] {
        c.same(verb, json!({"node": "nope", "name": "b0"}));
        c.same(verb, json!({"node": "src", "name": "nope"}));
        c.same(verb, json!({"node": "src"}));
    }
    c.same(
        "block-dirty-bitmap-disable",
        json!({"node": "src", "name": "b0"}),
    );
    c.same(
        "block-dirty-bitmap-disable",
        json!({"node": "src", "name": "b0"}),
    );
    c.same_bitmaps("src");
    c.same(
        "block-dirty-bitmap-enable",
        json!({"node": "src", "name": "b0"}),
    );
    c.same(
        "block-dirty-bitmap-clear",
        json!({"node": "src", "name": "off"}),
    );
    c.same(
        "block-dirty-bitmap-remove",
        json!({"node": "src", "name": "x".repeat(1023)}),
    );
    c.same_bitmaps("src");

    // blockdev-backup's checks of sync, bitmap and bitmap-mode.
    let b = |sync: &str, extra: Value| {
        let mut v = json!({"job-id": "j0", "device": "src", "target": "sink", "sync": sync});
        if let Value::Object(extra) = extra {
            v.as_object_mut().unwrap().extend(extra);
        }
        v
    };
    for args in [
        b("incremental", json!({})),
        b("bitmap", json!({})),
        b("bitmap", json!({"bitmap": "b0"})),
        b("bitmap", json!({"bitmap": "nope"})),
        b("bitmap", json!({"bitmap": "nope", "bitmap-mode": "never"})),
        b(
            "incremental",
            json!({"bitmap": "b0", "bitmap-mode": "never"}),
        ),
        b(
            "incremental",
            json!({"bitmap": "b0", "bitmap-mode": "always"}),
        ),
        b("full", json!({"bitmap-mode": "always"})),
        b("full", json!({"bitmap": "b0"})),
        b("full", json!({"bitmap": "b0", "bitmap-mode": "never"})),
        b(
            "bitmap",
            json!({"bitmap": "b0", "bitmap-mode": "sometimes"}),
        ),
        b("bitmap", json!({"bitmap": 5, "bitmap-mode": "never"})),
    ] {
        c.same("blockdev-backup", args);
    }

    // A backup holding b0 frozen: busy for every verb and for another
    // backup; its successor shows, unnamed.
    let job = "j1";
    let m = c.mark();
    let mut args = b("full", json!({"bitmap": "b0", "bitmap-mode": "on-success"}));
    args["job-id"] = json!(job);
    args["speed"] = json!(SLOW);
    if c.started(args).is_some() {
        c.same_bitmaps("src");
        for verb in [
            "block-dirty-bitmap-remove",
            "block-dirty-bitmap-clear",
            "block-dirty-bitmap-enable",
            "block-dirty-bitmap-disable",
        ] {
            c.same(verb, json!({"node": "src", "name": "b0"}));
        }
        let mut other = b("bitmap", json!({"bitmap": "b0", "bitmap-mode": "never"}));
        other["job-id"] = json!("j2");
        other["target"] = json!("dst");
        c.same("blockdev-backup", other);
        c.same("job-cancel", json!({ "id": job }));
        if c.reach(job, "null", m).is_some() {
            c.same_job_events(job, m);
        }
        c.same_bitmaps("src");
    }
    // Free again: an incremental backup of a clean bitmap copies nothing.
    let m = c.mark();
    let mut args = b("incremental", json!({"bitmap": "b0"}));
    args["job-id"] = json!("j3");
    if c.started(args).is_some() && c.reach("j3", "null", m).is_some() {
        c.same_job_events("j3", m);
    }
    c.same(
        "block-dirty-bitmap-remove",
        json!({"node": "src", "name": "b0"}),
    );
    c.same_bitmaps("src");
    c.finish(name);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn nbd_export_bitmaps_match_qsd() {
    let name = "qsd-nbd-bitmaps";
    let mut c = Compare::start(name);
    for (side, tag) in [(&mut c.qsd, "qsd"), (&mut c.ours, "ours")] {
        side.files
            .insert("sock", temp_path(&format!("{name}-{tag}.nbd")));
    }
    c.same(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "src", "file": {"driver": "file", "node-name": "srcf", "filename": "$src"}}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "dst", "file": {"driver": "file", "filename": "$dst"}}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "big", "size": 2 * SIZE}),
    );
    c.same(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "ro", "size": SIZE, "read-only": true}),
    );
    for (node, bitmap, disabled) in [
        ("src", "b0", false),
        ("src", "off", true),
        ("srcf", "fb", false),
        ("big", "bb", false),
        ("ro", "rb", false),
    ] {
        c.same(
            "block-dirty-bitmap-add",
            json!({"node": node, "name": bitmap, "disabled": disabled}),
        );
    }
    c.same(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": "$sock"}}}),
    );
    let export = |id: &str, node: &str, writable: bool, bitmaps: Value| {
        json!({"type": "nbd", "id": id, "name": id, "node-name": node,
               "writable": writable, "bitmaps": bitmaps})
    };
    // Refused: each lookup, the read-only rule, the argument's shapes; and
    // the export's own checks come before the bitmaps'.
    for args in [
        export("e0", "src", false, json!(["nope"])),
        export("e0", "src", false, json!(["b0"])),
        export("e0", "src", false, json!(["fb"])),
        export("e0", "src", false, json!([{"node": "nope", "name": "b0"}])),
        export("e0", "src", false, json!([{"node": "src", "name": "nope"}])),
        export("e0", "src", false, json!([{"node": "src"}])),
        export("e0", "src", false, json!([{"name": "b0"}])),
        export(
            "e0",
            "src",
            false,
            json!([{"node": "src", "name": "b0", "x": 1}]),
        ),
        export("e0", "src", false, json!([5])),
        export("e0", "src", false, json!("b0")),
        export("e0", "nope", false, json!(["nope"])),
        export("e0", "ro", true, json!(["nope"])),
        export("e0", "big", false, json!(["off"])),
        export("e0", "src", true, json!(["b0", "nope"])),
    ] {
        c.same("block-export-add", args);
    }
    c.same_bitmaps("src");
    // Accepted: an enabled bitmap named by node on a read-only export,
    // another node's bitmap of another size, a name twice, a read-only
    // node's enabled bitmap; each busy while exported.
    c.same(
        "block-export-add",
        export("e1", "src", false, json!([{"node": "src", "name": "b0"}])),
    );
    c.same(
        "block-export-add",
        export("e2", "dst", false, json!([{"node": "big", "name": "bb"}])),
    );
    c.same("block-export-add", export("e3", "ro", false, json!(["rb"])));
    c.same_bitmaps("src");
    c.same_bitmaps("big");
    c.same_bitmaps("ro");
    for verb in [
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
    ] {
        c.same(verb, json!({"node": "src", "name": "b0"}));
    }
    // Busy: a bitmap another export offers, even with a good one first.
    c.same(
        "nbd-server-add",
        json!({"device": "big", "name": "w", "bitmap": "bb", "writable": true}),
    );
    c.same(
        "nbd-server-add",
        json!({"device": "big", "name": "w", "bitmap": {"node": "big", "name": "bb"}}),
    );
    c.same(
        "nbd-server-add",
        json!({"device": "nope", "bitmap": "nope"}),
    );
    c.same("block-export-del", json!({"id": "e1"}));
    c.same("block-export-del", json!({"id": "e2"}));
    c.same_bitmaps("src");
    c.same(
        "nbd-server-add",
        json!({"device": "big", "name": "w", "bitmap": "bb", "writable": true}),
    );
    c.same(
        "block-export-add",
        export("e4", "src", true, json!(["off", "off", "b0"])),
    );
    c.same(
        "block-export-add",
        export("e5", "dst", true, json!([{"node": "src", "name": "off"}])),
    );
    c.same_bitmaps("src");
    c.same_bitmaps("big");
    c.same("query-block-exports", json!({}));
    c.same("nbd-server-stop", json!({}));
    c.same_bitmaps("src");
    c.same_bitmaps("big");
    c.same_bitmaps("ro");
    // Every refusal here is QEMU's, word for word.
    assert!(
        c.desc_notes.is_empty(),
        "{name}: descriptions differ:\n  {}",
        c.desc_notes.join("\n  ")
    );
    c.finish(name);
}
