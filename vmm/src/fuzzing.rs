//! Entry points for the fuzz targets in `fuzz/` and for the tests that
//! replay their corpus (`vmm/tests/fuzz_corpus.rs`). Each takes arbitrary
//! bytes and must never panic or hang, whatever they hold.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use ::block::job::JobManager;
use ::block::Graph;
use serde_json::{Map, Value};

use crate::monitor::Monitor;
use crate::qmp::{Commands, EventSink, Next, QmpError, Session};
use crate::runstate::RunState;
use crate::shared::Shared;
use crate::virtio::Disks;

/// Bytes per scratch image.
const IMAGE_BYTES: u64 = 1 << 20;

/// A folder with two small images the QMP target may open; made once per
/// process, so every run sees the same files.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vmm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        for name in ["a.img", "b.img"] {
            let file = std::fs::File::create(dir.join(name)).expect("scratch image");
            file.set_len(IMAGE_BYTES).expect("scratch image size");
        }
        dir
    })
}

/// The real commands, with every `filename` (and `snapshot-file`) moved
/// into the scratch folder (its last path component, or `a.img`), so no
/// input can make the harness open, lock, create or overwrite a file of
/// the host's.
struct Confined(Monitor);

fn confine(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "filename" || key == "snapshot-file" {
                    if let Value::String(name) = v {
                        let base = Path::new(name.as_str())
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .filter(|n| n != "." && n != "..")
                            .unwrap_or_else(|| "a.img".into());
                        *name = scratch().join(base).display().to_string();
                    }
                } else {
                    confine(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(confine),
        _ => {}
    }
}

impl Commands for Confined {
    fn names(&self) -> Vec<&'static str> {
        self.0.names()
    }

    fn execute(&self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
        let mut args = Value::Object(args);
        confine(&mut args);
        let Value::Object(args) = args else {
            unreachable!("confine keeps an object an object")
        };
        self.0.execute(name, args)
    }
}

/// Checks that `reply` is one QMP reply: a JSON object ending in CRLF with
/// either a `return` or an `error` holding a class and a description.
fn check_reply(reply: &[u8]) {
    let text = reply
        .strip_suffix(b"\r\n")
        .unwrap_or_else(|| panic!("a reply must end in CRLF: {reply:?}"));
    let value: Value = serde_json::from_slice(text)
        .unwrap_or_else(|e| panic!("a reply must be JSON ({e}): {reply:?}"));
    let object = value.as_object().expect("a reply is an object");
    match (object.get("return"), object.get("error")) {
        (Some(_), None) => {}
        (None, Some(error)) => {
            assert!(error["class"].is_string(), "{value}");
            assert!(error["desc"].is_string(), "{value}");
        }
        _ => panic!("a reply holds a return or an error: {value}"),
    }
}

/// The QMP input stream and command dispatch: `data[0]` bit 0 negotiates
/// first, `data[1]` sets the size of the chunks the rest arrives in, and
/// the rest is what a client sends. Every reply must be well formed; jobs
/// started are cancelled before the next input.
pub fn qmp(data: &[u8]) {
    let (flags, chunk, input) = match data {
        [flags, chunk, rest @ ..] => (*flags, usize::from(*chunk % 97) + 1, rest),
        _ => return,
    };
    let graph = Arc::new(Graph::new());
    let jobs = Arc::new(JobManager::new());
    let quit = Arc::new(AtomicBool::new(false));
    let run = Arc::new(RunState::new(
        Arc::new(Shared::new().expect("an eventfd")),
        Vec::new(),
    ));
    let said_quit = quit.clone();
    let monitor = Monitor::new(
        run,
        graph.clone(),
        jobs.clone(),
        Disks::default(),
        EventSink::discarding(),
        Box::new(move || said_quit.store(true, Ordering::Relaxed)),
    );
    let commands = Confined(monitor);
    let mut session = Session::new();
    if flags & 1 != 0 {
        session.push_input(br#"{"execute": "qmp_capabilities"}"#);
    }
    for piece in input.chunks(chunk) {
        session.push_input(piece);
        while let Some(next) = session.next(&commands) {
            let reply = match next {
                Next::Reply(reply) => reply,
                Next::Run(request) => {
                    let result = commands.execute(&request.name, request.args.clone());
                    request.reply(result)
                }
            };
            check_reply(&reply);
        }
    }
    jobs.cancel_all_and_wait();
}

/// The incoming migration stream: `data[0]` bit 0 gives every frame the
/// checksum of its payload first (so that mutations reach the decoders),
/// the rest is what a source sends. It ends in an error or at `End`.
pub fn migration_stream(data: &[u8]) {
    crate::migration::fuzz::stream(data);
}

/// A small valid input for [`migration_stream`]: the corpus's seed.
pub fn migration_stream_seed() -> Vec<u8> {
    crate::migration::fuzz::seed()
}
