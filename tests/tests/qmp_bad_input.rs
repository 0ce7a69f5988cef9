//! A hostile or careless QMP client gets an error in QMP's own shape, and
//! the VM and every other client carry on.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tests::qmp::Qmp;
use tests::{boot, expect_line, temp_path, testguest, TempDisk};
use vmm::VmExit;

fn read_json(reader: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn malformed_commands_get_qmp_errors_and_the_vm_keeps_serving_everyone() {
    let disk = TempDisk::patterned("qmp-bad", 1 << 20);
    let path = temp_path("bad.qmp");
    let vm = boot(&testguest("idle", &[disk.option("id=vda")], Some(&path)));
    let mut qmp = Qmp::connect(&path);
    expect_line(&vm, "testguest: idle", Duration::from_secs(30));

    // A client that leaves in the middle of a command runs nothing.
    let mut quitter = UnixStream::connect(&path).unwrap();
    quitter
        .write_all(b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"sto")
        .unwrap();
    drop(quitter);

    // Malformed JSON, then a good command on the same connection.
    qmp.send_raw(b"{\"execute\": nonsense}");
    let reply = qmp.reply();
    assert_eq!(reply["error"]["class"], "GenericError", "{reply}");
    assert!(
        reply["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("JSON parse error"),
        "{reply}"
    );
    assert_eq!(qmp.ok("query-status", json!({}))["status"], "running");

    // The request's shape.
    for (raw, desc) in [
        (&b"[1, 2]"[..], "QMP input must be a JSON object"),
        (b"{\"arguments\": {}}", "QMP input lacks member 'execute'"),
        (
            b"{\"execute\": 7}",
            "QMP input member 'execute' must be a string",
        ),
        (
            b"{\"execute\": \"stop\", \"arguments\": []}",
            "QMP input member 'arguments' must be an object",
        ),
    ] {
        qmp.send_raw(raw);
        let reply = qmp.reply();
        assert_eq!(reply["error"]["desc"], desc, "{reply}");
        assert_eq!(reply["error"]["class"], "GenericError", "{reply}");
    }

    // Every command's arguments, and the names it refers to.
    let cases: &[(&str, Value, &str, &str)] = &[
        (
            "no-such-command",
            json!({}),
            "CommandNotFound",
            "The command no-such-command has not been found",
        ),
        (
            "blockdev-del",
            json!({"node-name": 5}),
            "GenericError",
            "Invalid parameter type for 'node-name', expected: string",
        ),
        (
            "blockdev-del",
            json!({}),
            "GenericError",
            "Parameter 'node-name' is missing",
        ),
        (
            "query-status",
            json!({"verbose": true}),
            "GenericError",
            "Parameter 'verbose' is unexpected",
        ),
        (
            "blockdev-del",
            json!({"node-name": "ghost"}),
            "GenericError",
            "Cannot find device='ghost' nor node-name='ghost'",
        ),
        (
            "blockdev-backup",
            json!({"device": "vda", "target": "ghost", "sync": "full"}),
            "GenericError",
            "Cannot find device='ghost' nor node-name='ghost'",
        ),
        (
            "blockdev-backup",
            json!({"device": "vda", "target": "vda", "sync": "sideways"}),
            "GenericError",
            "Parameter 'sync' does not accept value 'sideways'",
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow9", "node-name": "x"}),
            "GenericError",
            "Parameter 'driver' does not accept value 'qcow9'",
        ),
        (
            "blockdev-add",
            json!({"driver": "file", "node-name": "x"}),
            "GenericError",
            "Parameter 'filename' is missing",
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "9x"}),
            "GenericError",
            "Invalid node-name: '9x' (start with a letter; then letters, digits, '-', '.', '_')",
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "vda"}),
            "GenericError",
            "Duplicate nodes with node-name='vda'",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "r", "file": 3}),
            "GenericError",
            "Invalid parameter type for 'file', expected: BlockdevRef (a node-name or an object)",
        ),
        (
            "job-pause",
            json!({"id": "ghost"}),
            "GenericError",
            "Job 'ghost' not found",
        ),
        (
            "block-job-set-speed",
            json!({"device": "ghost", "speed": 1}),
            "DeviceNotActive",
            "Block job 'ghost' not found",
        ),
        (
            "block-job-set-speed",
            json!({"device": "ghost", "speed": "fast"}),
            "GenericError",
            "Invalid parameter type for 'speed', expected: integer",
        ),
    ];
    for (command, args, class, desc) in cases {
        let err = qmp.err(command, args.clone());
        assert_eq!(
            (err.class.as_str(), err.desc.as_str()),
            (*class, *desc),
            "{command} {args}"
        );
    }
    let err = qmp.err(
        "blockdev-add",
        json!({"driver": "file", "node-name": "x", "filename": "/nonexistent/disk.img"}),
    );
    assert!(err.desc.contains("/nonexistent/disk.img"), "{}", err.desc);
    let names: Vec<String> = qmp
        .ok("query-named-block-nodes", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 2, "refused commands added nothing: {names:?}");

    // An id of any JSON type comes back, on success and on error.
    for id in [json!(1), json!("a"), json!({"k": [1, null]}), json!(null)] {
        let msg = json!({"execute": "query-status", "id": id});
        qmp.send_raw(msg.to_string().as_bytes());
        assert_eq!(qmp.reply()["id"], id);
        let msg = json!({"execute": "nope", "id": id});
        qmp.send_raw(msg.to_string().as_bytes());
        let reply = qmp.reply();
        assert_eq!(reply["id"], id);
        assert_eq!(reply["error"]["class"], "CommandNotFound");
    }

    // A second client: no newline, two commands in one write, and a
    // command before negotiation.
    let stream = UnixStream::connect(&path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    assert!(read_json(&mut reader).get("QMP").is_some());
    writer
        .write_all(b"{\"execute\": \"query-status\"}")
        .unwrap();
    let reply = read_json(&mut reader);
    assert_eq!(reply["error"]["class"], "CommandNotFound", "{reply}");
    writer
        .write_all(b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"query-status\", \"id\": 2}")
        .unwrap();
    assert_eq!(read_json(&mut reader), json!({"return": {}}));
    let reply = read_json(&mut reader);
    assert_eq!(
        (reply["id"].clone(), reply["return"]["running"].clone()),
        (json!(2), json!(true))
    );

    // Through all of it the guest ran and the first client still works.
    assert_eq!(qmp.ok("query-status", json!({}))["status"], "running");
    assert!(vm.exit().is_none());
    qmp.ok("quit", json!({}));
    assert_eq!(vm.wait(), VmExit::Quit);
}

/// xorshift64*: the same messages every run, without a crate for it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const STRESS_CLIENTS: u64 = 16;
const STRESS_PER_CLIENT: u64 = 820;

/// Client `client`'s `n`th hostile (or, now and then, valid) message.
fn stress_message(rng: &mut Rng, client: u64, n: u64) -> Vec<u8> {
    let id = format!("c{client}-{n}");
    match rng.below(100) {
        // Random bytes, then what ends any text they left open: a quote
        // either closes a string (and the next quote opens one) or opens
        // one, and a newline inside a string ends the text.
        0..=19 => {
            let len = 1 + rng.below(300) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            bytes.extend_from_slice(b"\"\n\"\n");
            bytes
        }
        // Malformed JSON.
        20..=34 => {
            let bad: [&[u8]; 8] = [
                b"{\"execute\": nonsense}",
                b"{\"execute\": \"query-status\",}",
                b"{\"execute\" \"query-status\"}",
                b"}}}]]]",
                b"{\"execute\": \"query-status\", \"arguments\": {\"a\": tru}}",
                b"[1, 2, ",
                b"{\"execute\": \"\\uZZZZ\"}",
                b"\"unterminated\n",
            ];
            let mut text = bad[rng.below(bad.len() as u64) as usize].to_vec();
            // `[1, 2, ` needs closing before anything else is read.
            text.extend_from_slice(b"]\n");
            text
        }
        // Unknown commands.
        35..=49 => json!({"execute": format!("x-no-such-{}", rng.next()), "id": id})
            .to_string()
            .into_bytes(),
        // Wrong argument types and names.
        50..=69 => {
            let cases = [
                json!({"execute": "blockdev-add", "arguments": {"driver": 7, "node-name": []}}),
                json!({"execute": "blockdev-backup", "arguments": {"device": {"a": 1}, "target": "tgt", "sync": "full"}}),
                json!({"execute": "block-job-set-speed", "arguments": {"device": "job0", "speed": "fast"}}),
                json!({"execute": "job-cancel", "arguments": {"id": 12}}),
                json!({"execute": "query-status", "arguments": {"verbose": true}}),
                json!({"execute": "blockdev-del", "arguments": {"node-name": null}}),
                json!({"execute": "stop", "arguments": []}),
                json!({"execute": 42}),
                json!({"arguments": {}}),
                json!([{"execute": "quit"}]),
            ];
            let mut msg = cases[rng.below(cases.len() as u64) as usize].clone();
            if let Some(obj) = msg.as_object_mut() {
                obj.insert("id".into(), json!(id));
            }
            msg.to_string().into_bytes()
        }
        // A string past the 1 MiB limit.
        70..=71 => {
            let mut msg = b"{\"execute\": \"query-status\", \"id\": \"".to_vec();
            msg.resize(msg.len() + (1 << 20) + 4096, b'x');
            msg.extend_from_slice(b"\"}");
            msg
        }
        // Nested 10,000 deep.
        72..=76 => {
            let mut msg = b"{\"execute\": \"query-status\", \"arguments\": {\"a\": ".to_vec();
            msg.extend(std::iter::repeat_n(b'[', 10_000));
            msg.extend(std::iter::repeat_n(b']', 10_000));
            msg.extend_from_slice(b"}}");
            msg
        }
        // Valid commands that change nothing (the speed stays as set).
        _ => {
            let valid = [
                json!({"execute": "query-status", "id": id}),
                json!({"execute": "query-jobs", "id": id}),
                json!({"execute": "query-block-jobs", "id": id}),
                json!({"execute": "query-named-block-nodes", "id": id}),
                json!({"execute": "query-version", "id": id}),
                json!({"execute": "query-commands", "id": id}),
                json!({"execute": "block-job-set-speed", "arguments": {"device": "job0", "speed": STRESS_SPEED}, "id": id}),
            ];
            valid[rng.below(valid.len() as u64) as usize]
                .to_string()
                .into_bytes()
        }
    }
}

/// The backup's speed while the clients hammer: its 32 MiB take over a
/// minute at this rate, far longer than the flood.
const STRESS_SPEED: u64 = 512 << 10;

/// One hostile client: writes its messages on one thread while this one
/// reads every line the server sends (each must be a JSON object), until
/// the reply to its last, valid command arrives.
fn stress_client(path: &Path, client: u64) -> usize {
    let stream = UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    assert!(read_json(&mut reader).get("QMP").is_some());
    writer
        .write_all(b"{\"execute\": \"qmp_capabilities\"}")
        .unwrap();
    assert_eq!(read_json(&mut reader), json!({"return": {}}));
    let last = format!("last-{client}");
    let sender = {
        let last = last.clone();
        std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (client + 1).wrapping_mul(0x1000_0001));
            for n in 0..STRESS_PER_CLIENT {
                writer
                    .write_all(&stress_message(&mut rng, client, n))
                    .unwrap();
            }
            let msg = json!({"execute": "query-status", "id": last});
            writer.write_all(msg.to_string().as_bytes()).unwrap();
            writer
        })
    };
    let mut lines = 0;
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("client {client}: read after {lines} lines: {e}"));
        assert!(
            n > 0,
            "client {client}: the server hung up after {lines} lines"
        );
        lines += 1;
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("client {client}: {line:?}: {e}"));
        assert!(
            v.get("return").is_some() || v.get("error").is_some() || v.get("event").is_some(),
            "client {client}: {v}"
        );
        if v["id"] == json!(last) {
            assert_eq!(v["return"]["status"], "paused", "{v}");
            break;
        }
    }
    drop(sender.join().unwrap());
    lines
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn thirteen_thousand_hostile_messages_from_sixteen_clients_while_a_backup_runs() {
    const DISK: u64 = 32 << 20;
    let disk = TempDisk::patterned("stress-src", DISK);
    let target = TempDisk::new("stress-dst", DISK);
    let path = temp_path("stress.qmp");
    let vm = boot(&testguest(
        "idle",
        &[disk.option("id=vda,node-name=drive0")],
        Some(&path),
    ));
    let mut qmp = Qmp::connect(&path);
    expect_line(&vm, "testguest: idle", Duration::from_secs(30));

    // The guest's dataplane gives up the lease while the VM is stopped.
    qmp.ok("stop", json!({}));
    qmp.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "tgt", "filename": target.path}),
    );
    qmp.ok(
        "blockdev-backup",
        json!({"job-id": "job0", "device": "drive0", "target": "tgt", "sync": "full", "speed": STRESS_SPEED}),
    );

    let started = std::time::Instant::now();
    let clients: Vec<_> = (0..STRESS_CLIENTS)
        .map(|client| {
            let path = path.clone();
            std::thread::spawn(move || stress_client(&path, client))
        })
        .collect();
    let lines: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    let took = started.elapsed();
    eprintln!(
        "{} messages from {STRESS_CLIENTS} clients answered with {lines} lines in {took:?}",
        STRESS_CLIENTS * (STRESS_PER_CLIENT + 1)
    );

    // Nothing was disturbed: the VM lives, a new client is served, and the
    // backup ran all through.
    assert!(vm.exit().is_none(), "{:?}", vm.exit());
    let mut fresh = Qmp::connect(&path);
    assert_eq!(
        fresh.ok("query-status", json!({})),
        json!({"running": false, "status": "paused"})
    );
    let jobs = fresh.ok("query-jobs", json!({}));
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
    assert_eq!(jobs[0]["id"], "job0");
    assert_eq!(jobs[0]["status"], "running", "{jobs}");
    assert!(
        jobs[0]["current-progress"].as_u64().unwrap() < DISK,
        "{jobs}"
    );

    fresh.ok("block-job-set-speed", json!({"device": "job0", "speed": 0}));
    let done = fresh.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60), |d| {
        d["device"] == "job0"
    });
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["offset"], DISK);
    assert!(
        std::fs::read(&target.path).unwrap() == std::fs::read(&disk.path).unwrap(),
        "the target does not hold the source's bytes"
    );
    fresh.ok("quit", json!({}));
    assert_eq!(vm.wait(), VmExit::Quit);
}
