//! `--disk` options: parsing `path=FILE,id=ID,...` into a [`DiskConfig`].

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use base::cpus::CpuList;
use block::throttle::{Limit, Limits, VALUE_MAX};
use block::{Aio, ImageFormat, Locking};
use devices::virtio::block::{DEFAULT_SUBMIT_BATCH, MAX_QUEUES, MAX_QUEUE_SIZE};

/// One virtio-blk disk as the user asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The host file.
    pub path: PathBuf,
    /// Its format (`format=`, default raw); never probed.
    pub format: ImageFormat,
    /// Writes go to a throwaway qcow2 overlay; the file is never written
    /// (QEMU's `-snapshot`).
    pub snapshot: bool,
    /// The device's name; `vda`, `vdb`... by position when not given.
    pub id: Option<String>,
    /// The block node's name; the device's name when not given.
    pub node_name: Option<String>,
    /// Refuse guest writes.
    pub read_only: bool,
    /// Open the file with O_DIRECT.
    pub direct: bool,
    /// Number of virtqueues.
    pub queues: u16,
    /// Size of each virtqueue.
    pub queue_size: u16,
    /// The GET_ID serial (at most 20 bytes).
    pub serial: Option<String>,
    /// Dataplane polling after work; zero sleeps at once.
    pub poll: Duration,
    /// Requests the dataplane hands to the kernel a call (`submit-batch=`;
    /// 0: all it took in one round).
    pub submit_batch: usize,
    /// Image locks other processes see (QEMU's `file.locking`).
    pub locking: Locking,
    /// The I/O engine: auto, io_uring or sync.
    pub aio: Aio,
    /// I/O limits (`throttling.*`, QEMU's names); none by default.
    pub throttle: Limits,
    /// Time each request for `query-blockstats` (`stats=on`, the default).
    pub timed_stats: bool,
    /// Let the dataplane host block jobs while the guest runs
    /// (`live-jobs=on`; off by default).
    pub live_jobs: bool,
    /// The host CPUs its dataplane thread runs on (`dataplane-cpus=`,
    /// parts split by ':' since ',' splits options).
    pub dataplane_cpus: Option<CpuList>,
}

/// Why a `--disk` value did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskOptionError {
    /// No `path=`.
    #[error("'{0}' has no path=FILE")]
    NoPath(String),
    /// A key we do not know.
    #[error("unknown disk option '{0}' (known: path, format, snapshot, id, node-name, readonly, direct, locking, aio, queues, queue-size, serial, poll, submit-batch, dataplane-cpus, stats, live-jobs, throttling.*)")]
    UnknownKey(String),
    /// A key given twice.
    #[error("disk option '{0}' is given twice")]
    Repeated(String),
    /// A token without `=`.
    #[error("disk option '{0}' has no value (write key=value)")]
    NoValue(String),
    /// A value of the wrong form or out of range.
    #[error("disk option {key}='{value}' is invalid: {why}")]
    BadValue {
        key: String,
        value: String,
        why: String,
    },
    /// Throttling limits that do not go together.
    #[error("disk throttling options are invalid: {0}")]
    Throttle(#[from] block::throttle::LimitsError),
}

fn on_off(key: &str, value: &str) -> Result<bool, DiskOptionError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(DiskOptionError::BadValue {
            key: key.into(),
            value: value.into(),
            why: "write on or off".into(),
        }),
    }
}

fn number(key: &str, value: &str, min: u64, max: u64) -> Result<u64, DiskOptionError> {
    match value.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(DiskOptionError::BadValue {
            key: key.into(),
            value: value.into(),
            why: format!("write a whole number from {min} to {max}"),
        }),
    }
}

/// Sets one `throttling.NAME=VALUE` option, QEMU's names: `iops-total`,
/// `bps-read-max`, `iops-write-max-length`, `iops-size`...
fn throttle_option(
    limits: &mut Limits,
    key: &str,
    name: &str,
    value: &str,
) -> Result<(), DiskOptionError> {
    if name == "iops-size" {
        limits.iops_size = number(key, value, 0, VALUE_MAX)?;
        return Ok(());
    }
    let (kind, rest) = name
        .split_once('-')
        .ok_or_else(|| DiskOptionError::UnknownKey(key.into()))?;
    let (dir, field) = rest.split_once('-').unwrap_or((rest, ""));
    let limit: &mut Limit = match (kind, dir) {
        ("iops", "total") => &mut limits.iops_total,
        ("iops", "read") => &mut limits.iops_read,
        ("iops", "write") => &mut limits.iops_write,
        ("bps", "total") => &mut limits.bps_total,
        ("bps", "read") => &mut limits.bps_read,
        ("bps", "write") => &mut limits.bps_write,
        _ => return Err(DiskOptionError::UnknownKey(key.into())),
    };
    match field {
        "" => limit.avg = number(key, value, 0, VALUE_MAX)?,
        "max" => limit.max = number(key, value, 0, VALUE_MAX)?,
        "max-length" => limit.max_length = number(key, value, 1, VALUE_MAX)?,
        _ => return Err(DiskOptionError::UnknownKey(key.into())),
    }
    Ok(())
}

impl FromStr for DiskConfig {
    type Err = DiskOptionError;

    fn from_str(s: &str) -> Result<Self, DiskOptionError> {
        let mut disk = DiskConfig {
            path: PathBuf::new(),
            format: ImageFormat::Raw,
            snapshot: false,
            id: None,
            node_name: None,
            read_only: false,
            direct: false,
            queues: 1,
            queue_size: 256,
            serial: None,
            poll: Duration::ZERO,
            submit_batch: DEFAULT_SUBMIT_BATCH,
            locking: Locking::Auto,
            aio: Aio::Auto,
            throttle: Limits::default(),
            timed_stats: true,
            live_jobs: false,
            dataplane_cpus: None,
        };
        let mut seen: Vec<&str> = Vec::new();
        for token in s.split(',') {
            let (key, value) = token
                .split_once('=')
                .ok_or_else(|| DiskOptionError::NoValue(token.to_string()))?;
            if seen.contains(&key) {
                return Err(DiskOptionError::Repeated(key.into()));
            }
            seen.push(key);
            let bad = |why: &str| DiskOptionError::BadValue {
                key: key.into(),
                value: value.into(),
                why: why.into(),
            };
            match key {
                "path" if value.is_empty() => return Err(bad("give a file")),
                "path" => disk.path = PathBuf::from(value),
                "format" => disk.format = value.parse().map_err(|why: String| bad(&why))?,
                "snapshot" => disk.snapshot = on_off(key, value)?,
                "id" => {
                    let ok = !value.is_empty()
                        && value.len() <= 32
                        && value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                    if !ok {
                        return Err(bad("use 1 to 32 letters, digits, '-', '_' or '.'"));
                    }
                    disk.id = Some(value.into());
                }
                "node-name" => {
                    // QEMU's rule for node names, so blockdev commands accept it.
                    let ok =
                        value.len() <= block::name::MAX_NODE_NAME && block::name::wellformed(value);
                    if !ok {
                        return Err(bad("start with a letter, then letters, digits, '-', '_' or '.'; at most 31"));
                    }
                    disk.node_name = Some(value.into());
                }
                "readonly" => disk.read_only = on_off(key, value)?,
                "direct" => disk.direct = on_off(key, value)?,
                "stats" => disk.timed_stats = on_off(key, value)?,
                "live-jobs" => disk.live_jobs = on_off(key, value)?,
                "locking" => disk.locking = value.parse().map_err(|why: String| bad(&why))?,
                "aio" => disk.aio = value.parse().map_err(|why: String| bad(&why))?,
                "queues" => disk.queues = number(key, value, 1, u64::from(MAX_QUEUES))? as u16,
                "queue-size" => {
                    let n = number(key, value, 2, u64::from(MAX_QUEUE_SIZE))?;
                    if !n.is_power_of_two() {
                        return Err(bad("a queue size must be a power of two"));
                    }
                    disk.queue_size = n as u16;
                }
                "serial" => {
                    if value.len() > 20 || !value.chars().all(|c| c.is_ascii_graphic()) {
                        return Err(bad("use at most 20 printable ASCII characters"));
                    }
                    disk.serial = Some(value.into());
                }
                "poll" => disk.poll = Duration::from_micros(number(key, value, 0, 1_000_000)?),
                "dataplane-cpus" => {
                    let cpus = CpuList::parse(value, ':').map_err(|e| bad(&e.to_string()))?;
                    disk.dataplane_cpus = Some(cpus);
                }
                "submit-batch" => {
                    disk.submit_batch = number(key, value, 0, u64::from(MAX_QUEUE_SIZE))? as usize
                }
                other => match other.strip_prefix("throttling.") {
                    Some(limit) => throttle_option(&mut disk.throttle, key, limit, value)?,
                    None => return Err(DiskOptionError::UnknownKey(other.into())),
                },
            }
        }
        if disk.path.as_os_str().is_empty() {
            return Err(DiskOptionError::NoPath(s.into()));
        }
        disk.throttle.validate()?;
        Ok(disk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_is_read() {
        let d: DiskConfig = "path=/tmp/a.img,id=root,node-name=drive0,readonly=on,direct=on,locking=off,aio=sync,queues=4,queue-size=128,serial=SN1,poll=50,submit-batch=8,dataplane-cpus=1:4-5"
            .parse()
            .unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert_eq!(d.id.as_deref(), Some("root"));
        assert_eq!(d.node_name.as_deref(), Some("drive0"));
        assert!(d.read_only && d.direct);
        assert_eq!((d.queues, d.queue_size), (4, 128));
        assert_eq!(d.serial.as_deref(), Some("SN1"));
        assert_eq!(d.poll, Duration::from_micros(50));
        assert_eq!(d.submit_batch, 8);
        assert_eq!(
            d.dataplane_cpus.map(|c| c.to_string()).as_deref(),
            Some("1,4-5")
        );
        assert_eq!(d.locking, Locking::Off);
        assert_eq!(d.aio, Aio::Sync);
        let plain: DiskConfig = "path=x".parse().unwrap();
        assert_eq!(
            (plain.queues, plain.queue_size, plain.read_only),
            (1, 256, false)
        );
        assert_eq!(plain.locking, Locking::Auto);
        assert_eq!(plain.dataplane_cpus, None);
        assert_eq!(plain.aio, Aio::Auto);
        assert_eq!((plain.format, plain.snapshot), (ImageFormat::Raw, false));
        let q: DiskConfig = "path=x,format=qcow2,snapshot=on".parse().unwrap();
        assert_eq!((q.format, q.snapshot), (ImageFormat::Qcow2, true));
    }

    #[test]
    fn bad_options_are_named() {
        let err = |s: &str| s.parse::<DiskConfig>().unwrap_err().to_string();
        assert_eq!(err("id=a"), "'id=a' has no path=FILE");
        assert!(err("path=x,color=red").contains("unknown disk option 'color'"));
        assert!(err("path=x,path=y").contains("given twice"));
        assert!(err("path=x,readonly").contains("'readonly' has no value"));
        assert!(err("path=x,readonly=maybe").contains("readonly='maybe' is invalid"));
        assert!(err("path=x,queues=0").contains("from 1 to 16"));
        assert!(err("path=x,queue-size=100").contains("power of two"));
        assert!(err("path=x,queue-size=4096").contains("from 2 to 1024"));
        assert!(err("path=x,serial=waytoolongserialnumber1").contains("at most 20"));
        assert!(err("path=x,id=a b").contains("letters"));
        assert!(err("path=x,node-name=1x").contains("start with a letter"));
        assert!(err("path=x,poll=-1").contains("poll='-1'"));
        assert!(err("path=x,submit-batch=2000").contains("from 0 to 1024"));
        assert_eq!(
            err("path=x,dataplane-cpus=3-1"),
            "disk option dataplane-cpus='3-1' is invalid: the range '3-1' ends before it starts"
        );
        assert_eq!(
            err("path=x,dataplane-cpus="),
            "disk option dataplane-cpus='' is invalid: a CPU list names at least one CPU (e.g. 0-3:6)"
        );
        // ',' ends the option: "0" is the list, "1" a token without '='.
        assert!(err("path=x,dataplane-cpus=0,1").contains("'1' has no value"));
        assert_eq!(
            err("path=x,locking=yes"),
            "disk option locking='yes' is invalid: 'yes' is not one of on, off, auto"
        );
        assert_eq!(
            err("path=x,aio=native"),
            "disk option aio='native' is invalid: 'native' is not one of auto, io_uring, sync"
        );
        assert_eq!(
            err("path=x,format=vmdk"),
            "disk option format='vmdk' is invalid: 'vmdk' is not one of raw, qcow2"
        );
        assert!(err("path=x,throttling.iops-sideways=5").contains("'throttling.iops-sideways'"));
        assert!(err("path=x,throttling.iops-total-min=5").contains("unknown disk option"));
        assert!(err("path=x,throttling.bps-read=lots").contains("throttling.bps-read='lots'"));
    }

    #[test]
    fn throttling_options_use_qemus_names_and_rules() {
        let d: DiskConfig = "path=x,throttling.iops-total=500,throttling.iops-total-max=1000,throttling.iops-total-max-length=3,throttling.bps-read=1048576,throttling.bps-write=2097152,throttling.iops-size=8192"
            .parse()
            .unwrap();
        let t = d.throttle;
        assert_eq!(
            (t.iops_total.avg, t.iops_total.max, t.iops_total.max_length),
            (500, 1000, 3)
        );
        assert_eq!(
            (t.bps_read.avg, t.bps_write.avg, t.iops_size),
            (1 << 20, 2 << 20, 8192)
        );
        let plain: DiskConfig = "path=x".parse().unwrap();
        assert!(!plain.throttle.enabled());
        assert!(plain.timed_stats);
        let untimed: DiskConfig = "path=x,stats=off".parse().unwrap();
        assert!(!untimed.timed_stats);
        let err = "path=x,throttling.iops-total=5,throttling.iops-read=1"
            .parse::<DiskConfig>()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "disk throttling options are invalid: bps/iops/max total values and read/write values cannot be used at the same time"
        );
        let err = "path=x,throttling.iops-read-max=10"
            .parse::<DiskConfig>()
            .unwrap_err();
        assert!(err.to_string().contains("require corresponding"), "{err}");
    }
}
