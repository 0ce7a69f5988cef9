//! A hostile or careless QMP client gets an error in QMP's own shape, and
//! the VM and every other client carry on.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};
use tests::qmp::Qmp;
use tests::{boot, expect_line, image, TempDisk};
use vmm::{VmConfig, VmExit};

fn read_json(reader: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn malformed_commands_get_qmp_errors_and_the_vm_keeps_serving_everyone() {
    let disk = TempDisk::patterned("qmp-bad", 1 << 20);
    let path = std::env::temp_dir().join(format!("vmm-test-{}-bad.qmp", std::process::id()));
    let mut config = VmConfig::new(image("testguest"));
    config.cmdline = "idle".into();
    config.disks = vec![disk.option("id=vda").parse().unwrap()];
    config.qmp = Some(path.clone());
    let vm = boot(&config);
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
