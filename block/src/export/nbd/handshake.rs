//! The fixed newstyle handshake and option haggling, up to the moment a
//! client enters transmission with an export.
//!
//! ```text
//!  S: NBDMAGIC IHAVEOPT flags(FIXED_NEWSTYLE|NO_ZEROES)
//!  C: client flags (FIXED_NEWSTYLE required)
//!  C: IHAVEOPT option length data     ─┐ repeated; each answered with
//!  S: reply-magic option type length  ─┘ replies ending in ACK or an error
//!  C: GO / EXPORT_NAME                  → transmission
//! ```
//!
//! Anything that breaks the framing (a wrong magic, unknown client flags,
//! an option too long to read, a client gone) ends the connection;
//! anything well framed but wrong gets an error reply and haggling goes on.

use std::io::{self, Read, Write};
use std::sync::Arc;

use super::proto::*;
use crate::export::Export;

/// The exports as the handshake sees them.
pub(crate) trait Lookup {
    /// The export named `name`, for `NBD_OPT_INFO` and the meta contexts.
    fn find(&self, name: &str) -> Option<Arc<Export>>;
    /// Every export's name and description, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, Option<String>)>;
    /// The export named `name`, which this connection now uses (`GO`).
    fn attach(&self, name: &str) -> Option<Arc<Export>>;
}

/// A metadata context a client selected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Context {
    /// `base:allocation`.
    Allocation,
    /// `qemu:dirty-bitmap:NAME`: the export's bitmap at this index.
    Bitmap(usize),
}

/// What the client chose, for the transmission phase.
pub(crate) struct Negotiated {
    pub export: Arc<Export>,
    pub structured: bool,
    /// Selected contexts with the ids the client was told.
    pub contexts: Vec<(u32, Context)>,
}

/// Why a handshake ended without an export.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the client does not speak fixed newstyle (client flags {0:#x})")]
    OldClient(u32),
    #[error("the client sent unknown client flags {0:#x}")]
    ClientFlags(u32),
    #[error("the client sent option magic {0:#x}, not IHAVEOPT")]
    Magic(u64),
    #[error("the client sent option {option} with {len} bytes, more than {MAX_OPTION}")]
    TooBig { option: u32, len: u32 },
    #[error("the client asked for export '{0}', which does not exist")]
    NoExport(String),
    #[error("the client aborted the handshake")]
    Aborted,
}

/// The transmission flags of `export`, computed once.
pub(crate) fn transmission_flags(export: &Export) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
    if export.writable {
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    } else {
        // Every client reads the same node through the same page cache.
        flags |= FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN;
    }
    flags
}

/// The block sizes we advertise: the node's alignment, 4 KiB or that
/// alignment, and the largest request.
pub(crate) fn block_sizes(export: &Export) -> (u32, u32, u32) {
    let min = export.min_block;
    (min, min.max(4096), MAX_REQUEST)
}

/// The contexts of `export` a query selects; `list` allows the
/// namespace-wide queries (`base:`, `qemu:`, `qemu:dirty-bitmap:`) that
/// only `NBD_OPT_LIST_META_CONTEXT` takes.
fn select(export: &Export, query: &str, list: bool) -> Vec<(String, Context)> {
    let mut out = Vec::new();
    let bitmaps = || {
        export.bitmaps.iter().enumerate().map(|(i, b)| {
            (
                format!("qemu:dirty-bitmap:{}", b.name()),
                Context::Bitmap(i),
            )
        })
    };
    if query == "base:allocation" || (list && query == "base:") {
        out.push(("base:allocation".to_string(), Context::Allocation));
    } else if list && (query == "qemu:" || query == "qemu:dirty-bitmap:") {
        out.extend(bitmaps());
    } else if let Some(name) = query.strip_prefix("qemu:dirty-bitmap:") {
        out.extend(
            bitmaps().filter(
                |(_, c)| matches!(c, Context::Bitmap(i) if export.bitmaps[*i].name() == name),
            ),
        );
    }
    out
}

/// Every context `export` has.
fn all_contexts(export: &Export) -> Vec<(String, Context)> {
    let mut out = select(export, "base:", true);
    out.extend(select(export, "qemu:", true));
    out
}

struct Haggle<'a, W: Read + Write> {
    wire: &'a mut W,
    structured: bool,
    /// The export the last SET_META_CONTEXT named, and what it chose.
    meta: Option<(String, Vec<String>)>,
}

/// Runs the handshake on `wire` up to transmission.
pub(crate) fn negotiate<W: Read + Write>(
    wire: &mut W,
    exports: &dyn Lookup,
) -> Result<Negotiated, HandshakeError> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    wire.write_all(&hello)?;
    let client = read_u32(wire)?;
    if client & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::OldClient(client));
    }
    if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::ClientFlags(client));
    }
    let no_zeroes = client & FLAG_C_NO_ZEROES != 0;
    let mut h = Haggle {
        wire,
        structured: false,
        meta: None,
    };
    loop {
        let magic = read_u64(h.wire)?;
        if magic != IHAVEOPT {
            return Err(HandshakeError::Magic(magic));
        }
        let option = read_u32(h.wire)?;
        let len = read_u32(h.wire)?;
        if len > MAX_OPTION {
            if option != OPT_EXPORT_NAME {
                let _ = h.error(option, REP_ERR_TOO_BIG, "option too long");
            }
            return Err(HandshakeError::TooBig { option, len });
        }
        let mut data = vec![0u8; len as usize];
        h.wire.read_exact(&mut data)?;
        if let Some(done) = h.option(option, &data, no_zeroes, exports)? {
            return Ok(done);
        }
    }
}

impl<W: Read + Write> Haggle<'_, W> {
    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        self.wire.write_all(&option_reply(option, kind, data))
    }

    fn error(&mut self, option: u32, kind: u32, message: &str) -> io::Result<()> {
        self.reply(option, kind, message.as_bytes())
    }

    /// Answers one option; `Some` when the client enters transmission.
    fn option(
        &mut self,
        option: u32,
        data: &[u8],
        no_zeroes: bool,
        exports: &dyn Lookup,
    ) -> Result<Option<Negotiated>, HandshakeError> {
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data).into_owned();
                // No way to say why: the spec has the server close.
                let export = exports
                    .attach(&name)
                    .ok_or(HandshakeError::NoExport(name))?;
                let mut out = export.size.to_be_bytes().to_vec();
                out.extend_from_slice(&transmission_flags(&export).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                self.wire.write_all(&out)?;
                let contexts = self.chosen(&export);
                return Ok(Some(Negotiated {
                    export,
                    structured: self.structured,
                    contexts,
                }));
            }
            OPT_ABORT => {
                let _ = self.reply(option, REP_ACK, &[]);
                return Err(HandshakeError::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.error(option, REP_ERR_INVALID, "OPT_LIST should not have length")?;
                    return Ok(None);
                }
                for (name, description) in exports.list() {
                    let mut out = (name.len() as u32).to_be_bytes().to_vec();
                    out.extend_from_slice(name.as_bytes());
                    out.extend_from_slice(description.unwrap_or_default().as_bytes());
                    self.reply(option, REP_SERVER, &out)?;
                }
                self.reply(option, REP_ACK, &[])?;
            }
            OPT_STARTTLS => {
                // QEMU's answer without tls-creds.
                self.error(option, REP_ERR_POLICY, "TLS not configured")?;
            }
            OPT_INFO | OPT_GO => return self.info(option, data, exports),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.error(option, REP_ERR_INVALID, "option should have zero length")?;
                } else if self.structured {
                    self.error(
                        option,
                        REP_ERR_INVALID,
                        "structured reply already negotiated",
                    )?;
                } else {
                    self.structured = true;
                    self.reply(option, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, exports)?;
            }
            _ => {
                let message = format!("Unsupported option {option:#x}");
                self.error(option, REP_ERR_UNSUP, &message)?;
            }
        }
        Ok(None)
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`.
    fn info(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &dyn Lookup,
    ) -> Result<Option<Negotiated>, HandshakeError> {
        let mut r = Fields(data);
        let parsed = (|| {
            let name = r.string()?;
            let n = r.u16()?;
            let mut wanted = Vec::new();
            for _ in 0..n {
                wanted.push(r.u16()?);
            }
            r.end()?;
            Some((name, wanted))
        })();
        let Some((name, wanted)) = parsed else {
            self.error(option, REP_ERR_INVALID, "request data has the wrong length")?;
            return Ok(None);
        };
        let export = if option == OPT_GO {
            exports.attach(&name)
        } else {
            exports.find(&name)
        };
        let Some(export) = export else {
            self.error(
                option,
                REP_ERR_UNKNOWN,
                &format!("export '{name}' not present"),
            )?;
            return Ok(None);
        };
        if wanted.contains(&INFO_NAME) {
            let mut out = INFO_NAME.to_be_bytes().to_vec();
            out.extend_from_slice(export.name.as_bytes());
            self.reply(option, REP_INFO, &out)?;
        }
        if let Some(description) = export
            .description
            .as_ref()
            .filter(|_| wanted.contains(&INFO_DESCRIPTION))
        {
            let mut out = INFO_DESCRIPTION.to_be_bytes().to_vec();
            out.extend_from_slice(description.as_bytes());
            self.reply(option, REP_INFO, &out)?;
        }
        // Always: a client that did not ask still learns our limits.
        let (min, preferred, max) = block_sizes(&export);
        let mut out = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [min, preferred, max] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        self.reply(option, REP_INFO, &out)?;
        let mut out = INFO_EXPORT.to_be_bytes().to_vec();
        out.extend_from_slice(&export.size.to_be_bytes());
        out.extend_from_slice(&transmission_flags(&export).to_be_bytes());
        self.reply(option, REP_INFO, &out)?;
        self.reply(option, REP_ACK, &[])?;
        if option == OPT_INFO {
            return Ok(None);
        }
        let contexts = self.chosen(&export);
        Ok(Some(Negotiated {
            export,
            structured: self.structured,
            contexts,
        }))
    }

    /// The contexts the last SET_META_CONTEXT chose, if it named this
    /// export; the ids are their places in that reply, from 1.
    fn chosen(&self, export: &Export) -> Vec<(u32, Context)> {
        let Some((name, chosen)) = &self.meta else {
            return Vec::new();
        };
        if *name != export.name {
            return Vec::new();
        }
        let all = all_contexts(export);
        chosen
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                all.iter()
                    .find(|(n, _)| n == c)
                    .map(|(_, ctx)| (i as u32 + 1, ctx.clone()))
            })
            .collect()
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
    fn meta_context(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &dyn Lookup,
    ) -> Result<(), HandshakeError> {
        let list = option == OPT_LIST_META_CONTEXT;
        if !self.structured {
            self.error(
                option,
                REP_ERR_INVALID,
                "request not valid before structured replies are negotiated",
            )?;
            return Ok(());
        }
        let mut r = Fields(data);
        let parsed = (|| {
            let name = r.string()?;
            let n = r.u32()?;
            let mut queries = Vec::new();
            for _ in 0..n {
                queries.push(r.string()?);
            }
            r.end()?;
            Some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            self.error(option, REP_ERR_INVALID, "request data has the wrong length")?;
            return Ok(());
        };
        if !list {
            // A SET replaces what came before, even when it fails.
            self.meta = None;
        }
        let Some(export) = exports.find(&name) else {
            self.error(
                option,
                REP_ERR_UNKNOWN,
                &format!("export '{name}' not present"),
            )?;
            return Ok(());
        };
        let mut chosen: Vec<(String, Context)> = Vec::new();
        if list && queries.is_empty() {
            chosen = all_contexts(&export);
        }
        for q in &queries {
            for c in select(&export, q, list) {
                if !chosen.contains(&c) {
                    chosen.push(c);
                }
            }
        }
        for (i, (context, _)) in chosen.iter().enumerate() {
            let id = if list { 0 } else { i as u32 + 1 };
            let mut out = id.to_be_bytes().to_vec();
            out.extend_from_slice(context.as_bytes());
            self.reply(option, REP_META_CONTEXT, &out)?;
        }
        if !list {
            self.meta = Some((name, chosen.into_iter().map(|(n, _)| n).collect()));
        }
        self.reply(option, REP_ACK, &[])?;
        Ok(())
    }
}

/// Big-endian fields of an option's data, each read only if present.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    /// A 32-bit length, then that many bytes of UTF-8, at most 4096.
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }

    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
