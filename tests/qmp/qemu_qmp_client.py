#!/usr/bin/env python3
"""Drives a QMP server with `qemu.qmp`, the Python client QEMU's own tests use,
unchanged: our VMM must work with a client written for QEMU.

    qemu_qmp_client.py SOCKET [--parts machine,errors,jobs] [--device vda --node drive0]
                       [--backup-source FILE --backup-target FILE --size BYTES] [--qemu]

tests/tests/qemu_qmp_client.rs runs it against our VMM and checks its exit
status and its last line. Every check prints `ok: ...`; the first failed one
prints `FAIL: ...` and ends the script with status 1. Without `qemu.qmp` it
prints how to install it and ends with status 3.

Parts:
  machine  the greeting, query-status, query-block (device --device with node
           --node), stop and cont with their STOP and RESUME events
  errors   commands that fail raise ExecuteError with QEMU's error class
  jobs     blockdev-backup of --backup-source to --backup-target (file nodes
           of --size bytes), its JOB_STATUS_CHANGE and BLOCK_JOB_COMPLETED
           events, query-jobs; then a cancelled job into a null-co node
Then `quit`, and its SHUTDOWN event.

`--qemu` is for checking this script itself against qemu-storage-daemon
(`--parts errors,jobs`), which sends no SHUTDOWN event.
"""

import argparse
import asyncio
import sys

try:
    from qemu.qmp import EventListener, ExecuteError, QMPClient, Runstate
except ImportError as e:
    print(
        f"qemu_qmp_client: the Python package qemu.qmp is not importable ({e}) by {sys.executable}; "
        "install it with: python3 -m pip install 'qemu.qmp==0.0.6' (scripts/test.sh does)",
        file=sys.stderr,
    )
    sys.exit(3)

EVENT_TIMEOUT = 30.0
CHECKS = 0


class CheckFailed(Exception):
    pass


def check(cond, what, detail=""):
    global CHECKS
    if not cond:
        raise CheckFailed(f"{what}{': ' + str(detail) if detail != '' else ''}")
    CHECKS += 1
    print(f"ok: {what}", flush=True)


async def next_event(listener, names):
    """The next event named in `names`; others that come first are returned too, in order."""
    skipped = []
    while True:
        try:
            event = await asyncio.wait_for(listener.get(), EVENT_TIMEOUT)
        except asyncio.TimeoutError:
            raise CheckFailed(f"no {'/'.join(names)} event within {EVENT_TIMEOUT:.0f} s; "
                              f"other events meanwhile: {skipped}")
        if event["event"] in names:
            return event, skipped
        skipped.append(event)


async def expect_error(qmp, cmd, args, error_class, what):
    try:
        ret = await qmp.execute(cmd, args)
    except ExecuteError as e:
        check(e.error_class == error_class,
              f"{what}: ExecuteError class {error_class}", f"got {e.error_class} ({e})")
        # str(ExecuteError) is the server's desc; the client shows it to users.
        check(str(e) != "", f"{what}: ExecuteError carries a description")
        return e
    raise CheckFailed(f"{what}: {cmd} {args} returned {ret!r}, expected ExecuteError {error_class}")


async def part_machine(qmp, listener, opts):
    status = await qmp.execute("query-status")
    check(status == {"running": True, "status": "running"}, "query-status: running", status)

    block = await qmp.execute("query-block")
    devices = {d.get("device"): d for d in block}
    check(opts.device in devices, f"query-block lists device '{opts.device}'", block)
    inserted = devices[opts.device].get("inserted", {})
    check(inserted.get("node-name") == opts.node,
          f"query-block: '{opts.device}' has node '{opts.node}'", inserted)

    listener.clear()
    check(await qmp.execute("stop") == {}, "stop returns {}")
    event, skipped = await next_event(listener, ["STOP"])
    check(not skipped, "STOP is the first event after stop", skipped)
    check("timestamp" in event and "seconds" in event["timestamp"], "STOP has a timestamp", event)
    status = await qmp.execute("query-status")
    check(status == {"running": False, "status": "paused"}, "query-status: paused", status)

    check(await qmp.execute("cont") == {}, "cont returns {}")
    event, skipped = await next_event(listener, ["RESUME"])
    check(not skipped, "RESUME is the first event after cont", skipped)
    status = await qmp.execute("query-status")
    check(status["status"] == "running", "query-status: running again", status)


async def part_errors(qmp, opts):
    await expect_error(qmp, "no-such-command", None, "CommandNotFound", "unknown command")
    await expect_error(qmp, "blockdev-add", {"node-name": "x0"}, "GenericError",
                       "blockdev-add without a driver")
    await expect_error(qmp, "blockdev-del", {"node-name": "no-such-node"}, "GenericError",
                       "blockdev-del of an unknown node")
    await expect_error(qmp, "query-block", {"bogus": 1}, "GenericError",
                       "an unexpected argument")
    # The connection is still usable after errors, and replies still match
    # the ids the client gave its commands (qemu.qmp checks that itself).
    version = await qmp.execute("query-version")
    check(isinstance(version.get("qemu", {}).get("major"), int), "query-version after errors", version)


def statuses(events, job):
    return [e["data"]["status"] for e in events
            if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job]


async def job_events(listener, job, last):
    """Every event until JOB_STATUS_CHANGE `last` of `job`."""
    events = []
    while True:
        try:
            event = await asyncio.wait_for(listener.get(), EVENT_TIMEOUT)
        except asyncio.TimeoutError:
            raise CheckFailed(f"job {job} did not reach '{last}' within {EVENT_TIMEOUT:.0f} s; "
                              f"events: {[(e['event'], e.get('data')) for e in events]}")
        events.append(event)
        if (event["event"] == "JOB_STATUS_CHANGE" and event["data"]["id"] == job
                and event["data"]["status"] == last):
            return events


async def part_jobs(qmp, listener, opts):
    size = opts.size
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "qq-src",
                                       "filename": opts.backup_source})
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "qq-dst",
                                       "filename": opts.backup_target})
    await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "qq-sink", "size": size})
    check(await qmp.execute("query-jobs") == [], "query-jobs: no jobs yet")

    listener.clear()
    ret = await qmp.execute("blockdev-backup", {"job-id": "qq-job0", "device": "qq-src",
                                                "target": "qq-dst", "sync": "full"})
    check(ret == {}, "blockdev-backup returns {}", ret)
    events = await job_events(listener, "qq-job0", "null")
    seq = statuses(events, "qq-job0")
    # QEMU starts a backup inside a drained section of its source, so the
    # job pauses at once and resumes when blockdev-backup returns; ours
    # sends the same.
    check(seq == ["created", "running", "paused", "running", "waiting", "pending", "concluded", "null"],
          "JOB_STATUS_CHANGE sequence of a completed backup", seq)
    done = [e for e in events if e["event"] == "BLOCK_JOB_COMPLETED"]
    check(len(done) == 1, "one BLOCK_JOB_COMPLETED", events)
    data = done[0]["data"]
    check(data.get("device") == "qq-job0" and data.get("type") == "backup", "BLOCK_JOB_COMPLETED names the job", data)
    check(data.get("len") == size and data.get("offset") == size and "error" not in data,
          "BLOCK_JOB_COMPLETED: the whole disk, no error", data)
    names = [e["event"] if e["event"] != "JOB_STATUS_CHANGE" else e["data"]["status"] for e in events]
    check(names.index("pending") < names.index("BLOCK_JOB_COMPLETED") < names.index("concluded"),
          "BLOCK_JOB_COMPLETED between pending and concluded", names)
    check(await qmp.execute("query-jobs") == [], "query-jobs: the job is gone (auto-dismiss)")

    # A slow job, cancelled: BLOCK_JOB_CANCELLED, not COMPLETED.
    listener.clear()
    await qmp.execute("blockdev-backup", {"job-id": "qq-job1", "device": "qq-src",
                                          "target": "qq-sink", "sync": "full", "speed": 1 << 20})
    jobs = await qmp.execute("query-jobs")
    check(len(jobs) == 1 and jobs[0].get("id") == "qq-job1" and jobs[0].get("type") == "backup",
          "query-jobs lists the running job", jobs)
    await expect_error(qmp, "blockdev-backup", {"job-id": "qq-job1", "device": "qq-src",
                                                "target": "qq-dst", "sync": "full"},
                       "GenericError", "blockdev-backup with a job id in use")
    check(await qmp.execute("job-cancel", {"id": "qq-job1"}) == {}, "job-cancel returns {}")
    events = await job_events(listener, "qq-job1", "null")
    kinds = [e["event"] for e in events]
    check("BLOCK_JOB_CANCELLED" in kinds and "BLOCK_JOB_COMPLETED" not in kinds,
          "a cancelled job sends BLOCK_JOB_CANCELLED", kinds)
    seq = statuses(events, "qq-job1")
    check(seq[-3:] == ["aborting", "concluded", "null"], "a cancelled job ends aborting, concluded, null", seq)

    for node in ("qq-src", "qq-dst", "qq-sink"):
        ret = await qmp.execute("blockdev-del", {"node-name": node})
        check(ret == {}, f"blockdev-del {node} once the jobs are gone", ret)


async def run(opts):
    qmp = QMPClient("vmm-test")
    await qmp.connect(opts.socket)
    # connect() read the greeting and negotiated capabilities: it raises if
    # either fails, so getting here means both were accepted.
    check(qmp.runstate == Runstate.RUNNING, "connected: greeting accepted, capabilities negotiated")
    greeting = qmp.greeting
    # The client parsed it into its own model; the version is left as JSON.
    version = greeting.QMP.version if greeting else None
    check(isinstance(version, dict) and isinstance(version.get("qemu", {}).get("major"), int)
          and isinstance(greeting.QMP.capabilities, list),
          "the greeting has QEMU's version and capabilities", greeting)
    listener = EventListener()
    qmp.register_listener(listener)

    parts = opts.parts.split(",")
    if "machine" in parts:
        await part_machine(qmp, listener, opts)
    if "errors" in parts:
        await part_errors(qmp, opts)
    if "jobs" in parts:
        await part_jobs(qmp, listener, opts)

    listener.clear()
    check(await qmp.execute("quit") == {}, "quit returns {}")
    if not opts.qemu:
        event, _ = await next_event(listener, ["SHUTDOWN"])
        check(event["data"] == {"guest": False, "reason": "host-qmp-quit"}, "SHUTDOWN after quit", event)
    try:
        await qmp.disconnect()
    except EOFError:
        # The server ended after `quit`, as it should: the client sees its hang-up.
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("--parts", default="machine,errors,jobs")
    parser.add_argument("--device", default="vda")
    parser.add_argument("--node", default="drive0")
    parser.add_argument("--backup-source")
    parser.add_argument("--backup-target")
    parser.add_argument("--size", type=int)
    parser.add_argument("--qemu", action="store_true")
    opts = parser.parse_args()
    if "jobs" in opts.parts.split(",") and not (opts.backup_source and opts.backup_target and opts.size):
        parser.error("the jobs part needs --backup-source, --backup-target and --size")
    try:
        asyncio.run(run(opts))
    except CheckFailed as e:
        print(f"FAIL: {e}", flush=True)
        sys.exit(1)
    except ExecuteError as e:
        # A command expected to succeed failed.
        print(f"FAIL: {e.sent.get('execute')} {e.sent.get('arguments', {})}: "
              f"{e.error_class}: {e}", flush=True)
        sys.exit(1)
    print(f"qemu_qmp_client: all {CHECKS} checks passed", flush=True)


if __name__ == "__main__":
    main()
