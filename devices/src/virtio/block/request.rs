//! Parsing a virtio-blk request from a descriptor chain, trusting nothing.
//!
//! A request is a device-readable header, data buffers, and a one-byte
//! device-writable status at the end. Every buffer must lie inside guest
//! RAM, point the right way, and fit the disk; anything else is an
//! [`RequestError`] that maps to a status the guest gets back.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Bytes in a virtio-blk sector, whatever the disk's block size.
pub const SECTOR_SIZE: u64 = 512;
/// The largest data transfer one request may ask for.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;
/// The largest number of DISCARD / WRITE_ZEROES segments in one request.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Length of the GET_ID answer.
pub const ID_BYTES: u32 = 20;

const HEADER_LEN: u32 = 16;
const SEGMENT_LEN: u32 = 16;
const WRITE_ZEROES_UNMAP: u32 = 1;

// Request types (virtio 1.2, 5.2.6).
pub(crate) const T_IN: u32 = 0;
pub(crate) const T_OUT: u32 = 1;
pub(crate) const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
pub(crate) const T_DISCARD: u32 = 11;
pub(crate) const T_WRITE_ZEROES: u32 = 13;

/// Status byte values.
pub mod status {
    /// Done.
    pub const OK: u8 = 0;
    /// Failed: bad buffers, out of range, or a host I/O error.
    pub const IOERR: u8 = 1;
    /// The request type is not supported.
    pub const UNSUPP: u8 = 2;
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Write the device's ID string into the data buffer.
    GetId,
    /// Deallocate ranges.
    Discard(Vec<Segment>),
    /// Zero ranges; `unmap` allows deallocating them.
    WriteZeroes(Vec<Segment>),
}

/// One range of a DISCARD or WRITE_ZEROES request, in bytes, checked to
/// lie inside the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First byte.
    pub offset: u64,
    /// Number of bytes.
    pub len: u64,
    /// WRITE_ZEROES with UNMAP: the range may be deallocated.
    pub unmap: bool,
}

/// A data buffer in guest memory, already checked to lie in one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A request whose every buffer has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestKind,
    /// First byte on the disk (IN and OUT; 0 for the others), checked.
    pub offset: u64,
    /// The data buffers, in order; they may cover parts of descriptors.
    pub data: Vec<Buffer>,
    /// Total bytes of the data buffers.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain ended early, looped or outgrew the queue.
    #[error("the descriptor chain is malformed (it loops, outgrows the queue, or lacks a header or status)")]
    MalformedChain,
    /// No device-writable byte for the status, or it lies outside RAM.
    #[error("the request has no device-writable status byte inside guest memory")]
    BadStatus,
    /// A buffer lies (partly) outside guest RAM.
    #[error("a buffer at {addr:#x} (length {len}) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    /// A buffer points the wrong way (device-writable header, read-only IN
    /// buffer, a readable descriptor after a writable one...).
    #[error("a buffer points the wrong way for this request")]
    WrongDirection,
    /// Fewer than 16 device-readable bytes for the header.
    #[error("the request header is too short")]
    ShortHeader,
    /// Data length is not a whole number of sectors (or segments).
    #[error("the data length {0} is not a whole number of sectors or segments")]
    BadLength(u64),
    /// The request reaches past the end of the disk.
    #[error("the request reaches past the end of the disk (sector {sector}, {len} bytes)")]
    OutOfRange { sector: u64, len: u64 },
    /// The request is larger than we accept.
    #[error("the request is larger than {MAX_REQUEST_BYTES} bytes or has too many segments")]
    TooLarge,
    /// A write-like request to a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// An unknown or unoffered request type.
    #[error("request type {0} is not supported")]
    Unsupported(u32),
}

impl RequestError {
    /// The status byte the guest gets for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => status::UNSUPP,
            _ => status::IOERR,
        }
    }
}

/// What the device is, as far as checking requests goes.
#[derive(Debug, Clone, Copy)]
pub struct DiskLimits {
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// Refuse writes.
    pub read_only: bool,
    /// Most data buffers per request (`seg_max`).
    pub max_segments: u32,
    /// DISCARD was offered.
    pub discard: bool,
    /// WRITE_ZEROES was offered.
    pub write_zeroes: bool,
}

/// A request that could not be parsed, with where its status goes if that
/// much could be found. Without a status the request cannot be answered:
/// the device must go to DEVICE_NEEDS_RESET rather than return it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Why.
    pub error: RequestError,
    /// Where the status byte goes, if the chain had a usable one.
    pub status: Option<GuestAddress>,
    /// The request type from the header, if it was read.
    pub request_type: Option<u32>,
}

/// Checks that `len` bytes at `addr` lie in one region of guest RAM (so
/// they become one host iovec).
fn in_memory<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: u32,
) -> Result<Buffer, RequestError> {
    let outside = RequestError::OutsideMemory { addr: addr.0, len };
    if len > 0 {
        mem.get_slice(addr, len as usize).map_err(|_| outside)?;
    } else if !mem.address_in_range(addr) {
        return Err(outside);
    }
    Ok(Buffer { addr, len })
}

/// Takes bytes off the front of a run of descriptors, splitting one where
/// the wanted length ends inside it.
struct Cursor<'a> {
    descs: &'a [Descriptor],
    /// Bytes of `descs[0]` already taken.
    skip: u32,
}

impl<'a> Cursor<'a> {
    fn new(descs: &'a [Descriptor]) -> Self {
        Self { descs, skip: 0 }
    }

    /// The next piece, at most `max` bytes long; None when nothing is left.
    fn take(&mut self, max: u64) -> Option<(GuestAddress, u32)> {
        while let Some(d) = self.descs.first() {
            let left = d.len() - self.skip;
            if left == 0 {
                self.descs = &self.descs[1..];
                self.skip = 0;
                continue;
            }
            let n = u64::from(left).min(max) as u32;
            // A descriptor that wraps the address space is refused by the
            // memory check later; keep the arithmetic from overflowing here.
            let addr = GuestAddress(d.addr().0.wrapping_add(u64::from(self.skip)));
            self.skip += n;
            return Some((addr, n));
        }
        None
    }

    fn is_empty(&self) -> bool {
        self.descs
            .iter()
            .enumerate()
            .all(|(i, d)| d.len() == if i == 0 { self.skip } else { 0 })
    }
}

/// Lists a parser builds requests in, kept between requests so that, once
/// warm, parsing allocates nothing: the chain's descriptors, and the
/// buffer and segment lists of requests given back with
/// [`Scratch::recycle`].
#[derive(Debug, Default)]
pub struct Scratch {
    descs: Vec<Descriptor>,
    writable: Vec<Descriptor>,
    data: Vec<Vec<Buffer>>,
    segments: Vec<Vec<Segment>>,
}

impl Scratch {
    /// Takes back a request's lists for the next ones.
    pub fn recycle(&mut self, req: Request) {
        let Request { kind, data, .. } = req;
        self.keep(data, kind);
    }

    fn keep(&mut self, mut data: Vec<Buffer>, kind: RequestKind) {
        data.clear();
        self.data.push(data);
        if let RequestKind::Discard(mut segs) | RequestKind::WriteZeroes(mut segs) = kind {
            segs.clear();
            self.segments.push(segs);
        }
    }
}

/// Parses the chain into a request, checking it against `limits`; see
/// [`parse_with`].
pub fn parse<M>(chain: DescriptorChain<M>, limits: &DiskLimits) -> Result<Request, Refused>
where
    M: Deref,
    M::Target: GuestMemoryBackend,
{
    parse_with(chain, limits, &mut Scratch::default())
}

/// Parses the chain into a request, checking it against `limits`, with
/// lists taken from `scratch`.
///
/// The layout is free (virtio 1.x "message framing"): the first 16
/// device-readable bytes are the header, the last device-writable byte is
/// the status, and the bytes between are the data, readable for OUT,
/// DISCARD and WRITE_ZEROES, writable for IN and GET_ID. Header, data and
/// status may share descriptors and the header may span several; data
/// buffers then cover parts of descriptors.
pub fn parse_with<M>(
    chain: DescriptorChain<M>,
    limits: &DiskLimits,
    scratch: &mut Scratch,
) -> Result<Request, Refused>
where
    M: Deref,
    M::Target: GuestMemoryBackend,
{
    let mut data = scratch.data.pop().unwrap_or_default();
    let mut segments = scratch.segments.pop().unwrap_or_default();
    let Scratch {
        descs, writable, ..
    } = scratch;
    match parse_into(chain, limits, descs, writable, &mut data, &mut segments) {
        Ok((mut kind, offset, data_len, status)) => {
            if let RequestKind::Discard(segs) | RequestKind::WriteZeroes(segs) = &mut kind {
                *segs = segments;
            } else {
                scratch.segments.push(segments);
            }
            Ok(Request {
                kind,
                offset,
                data,
                data_len,
                status,
            })
        }
        Err(refused) => {
            scratch.keep(data, RequestKind::Discard(segments));
            Err(refused)
        }
    }
}

/// What [`parse_into`] found: the kind (its segments, if any, are in the
/// caller's list), offset, data length and status address.
type Parsed = (RequestKind, u64, u64, GuestAddress);

/// The parser proper: fills `data` and `segments` (which come empty),
/// using `descs` and `w_descs` as room to work in.
fn parse_into<M>(
    mut chain: DescriptorChain<M>,
    limits: &DiskLimits,
    descs: &mut Vec<Descriptor>,
    w_descs: &mut Vec<Descriptor>,
    data: &mut Vec<Buffer>,
    segments: &mut Vec<Segment>,
) -> Result<Parsed, Refused>
where
    M: Deref,
    M::Target: GuestMemoryBackend,
{
    // Collect first: the chain iterator stops silently on loops, so a last
    // descriptor that still says "next" means the chain was cut short.
    descs.clear();
    descs.extend(chain.by_ref());
    let descs = &descs[..];
    let mem = chain.memory();
    let refuse = |error, status| Refused {
        error,
        status,
        request_type: None,
    };
    match descs.last() {
        Some(last) if !last.has_next() => {}
        _ => return Err(refuse(RequestError::MalformedChain, None)),
    }
    // Readable descriptors come first, then writable ones (2.7.4.2).
    let split = descs
        .iter()
        .position(Descriptor::is_write_only)
        .unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(split);

    // The status: the last byte of the chain, which must be writable.
    let last_w = match writable.iter().rposition(|d| d.len() > 0) {
        Some(i)
            if writable[i + 1..].iter().all(Descriptor::is_write_only)
                && writable[i].is_write_only() =>
        {
            i
        }
        _ => return Err(refuse(RequestError::BadStatus, None)),
    };
    let status_desc = &writable[last_w];
    let status = status_desc
        .addr()
        .0
        .checked_add(u64::from(status_desc.len() - 1))
        .map(GuestAddress)
        .filter(|&a| in_memory(mem, a, 1).is_ok())
        .ok_or_else(|| refuse(RequestError::BadStatus, None))?;
    let with_status = |error| refuse(error, Some(status));
    let fail = |error| Err(with_status(error));

    if writable.iter().any(|d| !d.is_write_only()) {
        return fail(RequestError::WrongDirection);
    }
    // The writable bytes before the status.
    w_descs.clear();
    w_descs.extend_from_slice(&writable[..=last_w]);
    let shortened = w_descs.last_mut().expect("holds the status descriptor");
    *shortened = Descriptor::new(
        shortened.addr().0,
        shortened.len() - 1,
        shortened.flags(),
        0,
    );

    // The header: the first 16 readable bytes, wherever they lie.
    let mut r = Cursor::new(readable);
    let mut header = [0u8; HEADER_LEN as usize];
    let mut got = 0usize;
    while got < header.len() {
        let Some((addr, n)) = r.take((header.len() - got) as u64) else {
            return fail(if descs[0].is_write_only() {
                RequestError::WrongDirection
            } else {
                RequestError::ShortHeader
            });
        };
        if let Err(e) = in_memory(mem, addr, n) {
            return fail(e);
        }
        let piece = &mut header[got..got + n as usize];
        if mem.read_slice(piece, addr).is_err() {
            return fail(RequestError::OutsideMemory {
                addr: addr.0,
                len: n,
            });
        }
        got += n as usize;
    }
    let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let with_status = |error| Refused {
        error,
        status: Some(status),
        request_type: Some(req_type),
    };
    let fail = |error| Err(with_status(error));

    let wants_writable = match req_type {
        T_IN | T_GET_ID => true,
        T_OUT | T_DISCARD | T_WRITE_ZEROES | T_FLUSH => false,
        other => return fail(RequestError::Unsupported(other)),
    };
    let mut w = Cursor::new(w_descs);
    // Data flows one way only: bytes the other way are a driver error.
    if (wants_writable && !r.is_empty()) || (!wants_writable && !w.is_empty()) {
        return fail(RequestError::WrongDirection);
    }
    let source = if wants_writable { &mut w } else { &mut r };
    let mut data_len: u64 = 0;
    while let Some((addr, n)) = source.take(u64::from(u32::MAX)) {
        if data.len() as u32 >= limits.max_segments {
            return fail(RequestError::TooLarge);
        }
        match in_memory(mem, addr, n) {
            Ok(buf) => data.push(buf),
            Err(e) => return fail(e),
        }
        data_len += u64::from(n);
        if data_len > MAX_REQUEST_BYTES {
            return fail(RequestError::TooLarge);
        }
    }

    let writes = matches!(req_type, T_OUT | T_DISCARD | T_WRITE_ZEROES);
    if writes && limits.read_only {
        return fail(RequestError::ReadOnly);
    }
    let mut offset = 0;
    let kind = match req_type {
        T_IN | T_OUT => {
            if !data_len.is_multiple_of(SECTOR_SIZE) {
                return fail(RequestError::BadLength(data_len));
            }
            offset = check_range(limits, sector, data_len).map_err(with_status)?;
            if req_type == T_IN {
                RequestKind::In
            } else {
                RequestKind::Out
            }
        }
        T_FLUSH => RequestKind::Flush,
        T_GET_ID => {
            if data_len < u64::from(ID_BYTES) {
                return fail(RequestError::BadLength(data_len));
            }
            RequestKind::GetId
        }
        T_DISCARD | T_WRITE_ZEROES => {
            let offered = if req_type == T_DISCARD {
                limits.discard
            } else {
                limits.write_zeroes
            };
            if !offered {
                return fail(RequestError::Unsupported(req_type));
            }
            read_segments(mem, data, data_len, limits, segments).map_err(with_status)?;
            // The segments themselves stay in the caller's list.
            if req_type == T_DISCARD {
                RequestKind::Discard(Vec::new())
            } else {
                RequestKind::WriteZeroes(Vec::new())
            }
        }
        other => return fail(RequestError::Unsupported(other)),
    };
    Ok((kind, offset, data_len, status))
}

/// Checks that `len` bytes from `sector` lie inside the disk; the byte
/// offset of `sector`. Nothing is multiplied before it is checked.
fn check_range(limits: &DiskLimits, sector: u64, len: u64) -> Result<u64, RequestError> {
    let out_of_range = || RequestError::OutOfRange { sector, len };
    let start = sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)?;
    let end = start.checked_add(len).ok_or_else(out_of_range)?;
    let size = limits
        .capacity
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(out_of_range)?;
    if end <= size {
        Ok(start)
    } else {
        Err(out_of_range())
    }
}

fn read_segments<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    data: &[Buffer],
    data_len: u64,
    limits: &DiskLimits,
    segments: &mut Vec<Segment>,
) -> Result<(), RequestError> {
    if data_len == 0 || !data_len.is_multiple_of(u64::from(SEGMENT_LEN)) {
        return Err(RequestError::BadLength(data_len));
    }
    if data_len / u64::from(SEGMENT_LEN) > u64::from(MAX_DISCARD_SEGMENTS) {
        return Err(RequestError::TooLarge);
    }
    // Segments may straddle buffers: gather the bytes first.
    let mut bytes = [0u8; (MAX_DISCARD_SEGMENTS * SEGMENT_LEN) as usize];
    let bytes = &mut bytes[..data_len as usize];
    let mut start = 0;
    for buf in data {
        let end = start + buf.len as usize;
        mem.read_slice(&mut bytes[start..end], buf.addr)
            .map_err(|_| RequestError::OutsideMemory {
                addr: buf.addr.0,
                len: buf.len,
            })?;
        start = end;
    }
    for raw in bytes.chunks_exact(SEGMENT_LEN as usize) {
        let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap());
        let sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap());
        let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap());
        // A u32 count of sectors times 512 always fits a u64.
        let len = u64::from(sectors) * SECTOR_SIZE;
        segments.push(Segment {
            offset: check_range(limits, sector, len)?,
            len,
            unmap: flags & WRITE_ZEROES_UNMAP != 0,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn limits() -> DiskLimits {
        DiskLimits {
            capacity: 64,
            read_only: false,
            max_segments: 8,
            discard: true,
            write_zeroes: true,
        }
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn header(mem: &GuestMemoryMmap, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Parses a chain of `descs` (NEXT flags filled in) with `limits`.
    fn parse_chain(
        mem: &GuestMemoryMmap,
        descs: &[RawDescriptor],
        limits: &DiskLimits,
    ) -> Result<Request, Refused> {
        let queue = MockSplitQueue::new(mem, 16);
        let chain = queue.build_desc_chain(descs).unwrap();
        parse(chain, limits)
    }

    fn simple(
        mem: &GuestMemoryMmap,
        req_type: u32,
        sector: u64,
        data: RawDescriptor,
    ) -> Result<Request, Refused> {
        header(mem, req_type, sector);
        parse_chain(
            mem,
            &[desc(HDR, 16, 0), data, desc(STATUS, 1, W)],
            &limits(),
        )
    }

    fn error_of(result: Result<Request, Refused>) -> (RequestError, Option<GuestAddress>) {
        let refused = result.unwrap_err();
        (refused.error, refused.status)
    }

    #[test]
    fn a_well_formed_read_is_accepted_with_its_buffers() {
        let m = mem();
        let req = simple(&m, T_IN, 2, desc(DATA, 1024, W)).unwrap();
        assert_eq!(req.kind, RequestKind::In);
        assert_eq!(
            (req.offset, req.data_len, req.status),
            (1024, 1024, GuestAddress(STATUS))
        );
        assert_eq!(
            req.data,
            vec![Buffer {
                addr: GuestAddress(DATA),
                len: 1024
            }]
        );
    }

    #[test]
    fn buffers_outside_guest_memory_get_ioerr() {
        let m = mem();
        let (err, status) = error_of(simple(&m, T_IN, 0, desc(0xffff_0000, 512, W)));
        assert!(matches!(err, RequestError::OutsideMemory { .. }));
        assert_eq!(
            (err.status(), status),
            (status::IOERR, Some(GuestAddress(STATUS)))
        );
        // Straddling the end of RAM is outside too.
        let (err, _) = error_of(simple(&m, T_IN, 0, desc((1 << 20) - 512, 1024, W)));
        assert!(matches!(err, RequestError::OutsideMemory { .. }));
    }

    #[test]
    fn wrong_directions_get_ioerr() {
        let m = mem();
        let (err, _) = error_of(simple(&m, T_IN, 0, desc(DATA, 512, 0)));
        assert_eq!(err, RequestError::WrongDirection);
        let (err, _) = error_of(simple(&m, T_OUT, 0, desc(DATA, 512, W)));
        assert_eq!(err, RequestError::WrongDirection);
        header(&m, T_IN, 0);
        let res = parse_chain(
            &m,
            &[desc(HDR, 16, W), desc(DATA, 512, W), desc(STATUS, 1, W)],
            &limits(),
        );
        assert_eq!(error_of(res).0, RequestError::WrongDirection);
    }

    #[test]
    fn a_read_only_or_missing_status_cannot_be_answered() {
        let m = mem();
        header(&m, T_IN, 0);
        let res = parse_chain(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, 0)],
            &limits(),
        );
        assert_eq!(error_of(res), (RequestError::BadStatus, None));
        let res = parse_chain(&m, &[desc(HDR, 16, 0)], &limits());
        assert_eq!(error_of(res), (RequestError::BadStatus, None));
        let res = parse_chain(&m, &[desc(HDR, 16, 0), desc(0xffff_0000, 1, W)], &limits());
        assert_eq!(error_of(res), (RequestError::BadStatus, None));
    }

    #[test]
    fn requests_past_the_end_of_the_disk_get_ioerr() {
        let m = mem();
        assert!(simple(&m, T_IN, 62, desc(DATA, 1024, W)).is_ok());
        let (err, _) = error_of(simple(&m, T_IN, 63, desc(DATA, 1024, W)));
        assert_eq!(
            err,
            RequestError::OutOfRange {
                sector: 63,
                len: 1024
            }
        );
        let (err, _) = error_of(simple(&m, T_OUT, u64::MAX / 256, desc(DATA, 512, 0)));
        assert!(matches!(err, RequestError::OutOfRange { .. }));
    }

    #[test]
    fn partial_sectors_and_oversized_requests_are_refused() {
        let m = mem();
        let (err, _) = error_of(simple(&m, T_IN, 0, desc(DATA, 100, W)));
        assert_eq!(err, RequestError::BadLength(100));
        header(&m, T_IN, 0);
        let mut descs = vec![desc(HDR, 16, 0)];
        descs.extend((0..9).map(|i| desc(DATA + i * 512, 512, W)));
        descs.push(desc(STATUS, 1, W));
        assert_eq!(
            error_of(parse_chain(&m, &descs, &limits())).0,
            RequestError::TooLarge
        );
    }

    #[test]
    fn unknown_types_get_unsupp_and_writes_to_read_only_disks_ioerr() {
        let m = mem();
        let (err, _) = error_of(simple(&m, 99, 0, desc(DATA, 512, 0)));
        assert_eq!(
            (err.clone(), err.status()),
            (RequestError::Unsupported(99), status::UNSUPP)
        );
        header(&m, T_OUT, 0);
        let ro = DiskLimits {
            read_only: true,
            ..limits()
        };
        let res = parse_chain(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
            &ro,
        );
        assert_eq!(error_of(res).0.status(), status::IOERR);
        let no_discard = DiskLimits {
            discard: false,
            ..limits()
        };
        header(&m, T_DISCARD, 0);
        let res = parse_chain(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, W)],
            &no_discard,
        );
        assert_eq!(error_of(res).0, RequestError::Unsupported(T_DISCARD));
    }

    #[test]
    fn a_looping_chain_is_malformed() {
        let m = mem();
        header(&m, T_IN, 0);
        let queue = MockSplitQueue::new(&m, 16);
        let next = VRING_DESC_F_NEXT as u16;
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, next | W, 2)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, next | W, 0)),
        ];
        let chain = queue.build_multiple_desc_chains(&descs).unwrap();
        assert_eq!(
            error_of(parse(chain, &limits())),
            (RequestError::MalformedChain, None)
        );
    }

    #[test]
    fn discard_and_write_zeroes_segments_are_read_and_range_checked() {
        let m = mem();
        let mut segs = Vec::new();
        for (sector, n, flags) in [(0u64, 8u32, 0u32), (16, 4, 1)] {
            segs.extend_from_slice(&sector.to_le_bytes());
            segs.extend_from_slice(&n.to_le_bytes());
            segs.extend_from_slice(&flags.to_le_bytes());
        }
        m.write_slice(&segs, GuestAddress(DATA)).unwrap();
        let req = simple(&m, T_WRITE_ZEROES, 0, desc(DATA, 32, 0)).unwrap();
        assert_eq!(
            req.kind,
            RequestKind::WriteZeroes(vec![
                Segment {
                    offset: 0,
                    len: 4096,
                    unmap: false
                },
                Segment {
                    offset: 8192,
                    len: 2048,
                    unmap: true
                },
            ])
        );
        m.write_slice(&60u64.to_le_bytes(), GuestAddress(DATA))
            .unwrap();
        let (err, _) = error_of(simple(&m, T_DISCARD, 0, desc(DATA, 32, 0)));
        assert!(matches!(err, RequestError::OutOfRange { sector: 60, .. }));
        let (err, _) = error_of(simple(&m, T_DISCARD, 0, desc(DATA, 20, 0)));
        assert_eq!(err, RequestError::BadLength(20));
    }

    #[test]
    fn sectors_that_overflow_in_bytes_are_out_of_range_not_a_panic() {
        let m = mem();
        for sector in [1u64 << 55, u64::MAX, (u64::MAX / 512) + 1] {
            let (err, status) = error_of(simple(&m, T_IN, sector, desc(DATA, 512, W)));
            assert!(matches!(err, RequestError::OutOfRange { .. }), "{err:?}");
            assert_eq!(status, Some(GuestAddress(STATUS)));
            // FLUSH and GET_ID ignore the sector; nothing multiplies it.
            let req = simple(&m, T_FLUSH, sector, desc(DATA, 0, 0)).unwrap();
            assert_eq!(req.offset, 0);
            let req = simple(&m, T_GET_ID, sector, desc(DATA, 20, W)).unwrap();
            assert_eq!(req.offset, 0);
        }
        let mut seg = Vec::new();
        seg.extend_from_slice(&(1u64 << 55).to_le_bytes());
        seg.extend_from_slice(&u32::MAX.to_le_bytes());
        seg.extend_from_slice(&0u32.to_le_bytes());
        m.write_slice(&seg, GuestAddress(DATA)).unwrap();
        let (err, _) = error_of(simple(&m, T_DISCARD, u64::MAX, desc(DATA, 16, 0)));
        assert!(matches!(err, RequestError::OutOfRange { .. }), "{err:?}");
    }

    #[test]
    fn a_merged_data_and_status_descriptor_is_read_into_up_to_its_last_byte() {
        let m = mem();
        header(&m, T_IN, 1);
        // Data and status in one writable descriptor of 1025 bytes.
        let req = parse_chain(&m, &[desc(HDR, 16, 0), desc(DATA, 1025, W)], &limits()).unwrap();
        assert_eq!(req.kind, RequestKind::In);
        assert_eq!(
            (req.offset, req.data_len, req.status),
            (512, 1024, GuestAddress(DATA + 1024))
        );
        assert_eq!(
            req.data,
            vec![Buffer {
                addr: GuestAddress(DATA),
                len: 1024
            }]
        );
    }

    #[test]
    fn header_and_data_may_share_descriptors_and_the_header_may_be_split() {
        let m = mem();
        // A write: 10 header bytes, then 6 header bytes and 512 data bytes
        // in one descriptor, then the status.
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&T_OUT.to_le_bytes());
        h[8..16].copy_from_slice(&3u64.to_le_bytes());
        m.write_slice(&h[..10], GuestAddress(HDR)).unwrap();
        m.write_slice(&h[10..], GuestAddress(DATA)).unwrap();
        let req = parse_chain(
            &m,
            &[desc(HDR, 10, 0), desc(DATA, 6 + 512, 0), desc(STATUS, 1, W)],
            &limits(),
        )
        .unwrap();
        assert_eq!(req.kind, RequestKind::Out);
        assert_eq!((req.offset, req.data_len), (3 * 512, 512));
        assert_eq!(
            req.data,
            vec![Buffer {
                addr: GuestAddress(DATA + 6),
                len: 512
            }]
        );
        // Everything in one readable and one writable descriptor.
        m.write_slice(&h, GuestAddress(HDR)).unwrap();
        let req =
            parse_chain(&m, &[desc(HDR, 16 + 512, 0), desc(STATUS, 1, W)], &limits()).unwrap();
        assert_eq!(
            req.data,
            vec![Buffer {
                addr: GuestAddress(HDR + 16),
                len: 512
            }]
        );
        // A readable descriptor after a writable one is out of order.
        let res = parse_chain(
            &m,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 512, W),
                desc(DATA, 512, 0),
                desc(STATUS, 1, W),
            ],
            &limits(),
        );
        assert_eq!(error_of(res).0, RequestError::WrongDirection);
        // Header bytes left over in a read are data the wrong way.
        header(&m, T_IN, 0);
        let res = parse_chain(&m, &[desc(HDR, 16 + 512, 0), desc(DATA, 513, W)], &limits());
        assert_eq!(error_of(res).0, RequestError::WrongDirection);
    }

    #[test]
    fn reused_lists_give_the_answers_fresh_ones_do() {
        let m = mem();
        let mut segs = Vec::new();
        for (sector, n, flags) in [(0u64, 8u32, 0u32), (16, 4, 1), (32, 1, 0)] {
            segs.extend_from_slice(&sector.to_le_bytes());
            segs.extend_from_slice(&n.to_le_bytes());
            segs.extend_from_slice(&flags.to_le_bytes());
        }
        m.write_slice(&segs, GuestAddress(DATA)).unwrap();
        // Lists left longer by earlier requests, refused ones included,
        // must not leak into later ones.
        let cases: [(u32, u64, &[RawDescriptor]); 6] = [
            (
                T_IN,
                0,
                &[
                    desc(HDR, 16, 0),
                    desc(DATA, 1024, W),
                    desc(DATA + 1024, 512, W),
                    desc(STATUS, 1, W),
                ],
            ),
            (
                T_DISCARD,
                0,
                &[desc(HDR, 16, 0), desc(DATA, 48, 0), desc(STATUS, 1, W)],
            ),
            (
                T_OUT,
                70,
                &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
            ),
            (
                T_WRITE_ZEROES,
                0,
                &[desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, W)],
            ),
            (
                T_DISCARD,
                0,
                &[desc(HDR, 16, 0), desc(DATA, 20, 0), desc(STATUS, 1, W)],
            ),
            (T_OUT, 1, &[desc(HDR, 16 + 512, 0), desc(STATUS, 1, W)]),
        ];
        let mut scratch = Scratch::default();
        for round in 0..2 {
            for (req_type, sector, descs) in cases {
                header(&m, req_type, sector);
                let fresh = parse_chain(&m, descs, &limits());
                let queue = MockSplitQueue::new(&m, 16);
                let chain = queue.build_desc_chain(descs).unwrap();
                let reused = parse_with(chain, &limits(), &mut scratch);
                assert_eq!(reused, fresh, "type {req_type}, round {round}");
                if let Ok(req) = reused {
                    scratch.recycle(req);
                }
            }
        }
    }

    #[test]
    fn get_id_needs_twenty_writable_bytes() {
        let m = mem();
        assert_eq!(
            simple(&m, T_GET_ID, 0, desc(DATA, 20, W)).unwrap().kind,
            RequestKind::GetId
        );
        let (err, _) = error_of(simple(&m, T_GET_ID, 0, desc(DATA, 19, W)));
        assert_eq!(err, RequestError::BadLength(19));
    }
}

#[cfg(test)]
mod proptests {
    //! The parser against descriptor tables a hostile driver could write.
    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 1 << 20;
    const QUEUE: u16 = 16;

    fn addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            0x1_0000u64..MEM,
            MEM - 64..MEM + 64,
            Just(u64::MAX - 8),
            any::<u64>(),
        ]
    }

    fn descriptor() -> impl Strategy<Value = (u64, u32, u16, u16)> {
        let flags = prop_oneof![
            Just(0u16),
            Just(VRING_DESC_F_NEXT as u16),
            Just(VRING_DESC_F_WRITE as u16),
            Just((VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16),
            Just(VRING_DESC_F_INDIRECT as u16),
            any::<u16>(),
        ];
        let len = prop_oneof![Just(16u32), Just(1), Just(512), 0u32..8192, any::<u32>()];
        (addr(), len, flags, 0u16..QUEUE + 4)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        #[test]
        fn any_chain_is_refused_or_accepted_only_with_checked_buffers(
            descs in proptest::collection::vec(descriptor(), QUEUE as usize),
            head in 0u16..QUEUE,
            req_type in prop_oneof![Just(T_IN), Just(T_OUT), Just(T_FLUSH), Just(T_GET_ID), Just(T_DISCARD), Just(T_WRITE_ZEROES), any::<u32>()],
            sector in prop_oneof![0u64..80, any::<u64>()],
            read_only in any::<bool>(),
        ) {
            let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
            // Every in-range descriptor address holds the same header.
            let mut header = [0u8; 16];
            header[0..4].copy_from_slice(&req_type.to_le_bytes());
            header[8..16].copy_from_slice(&sector.to_le_bytes());
            for (a, ..) in &descs {
                let _ = mem.write_slice(&header, GuestAddress(*a));
            }
            let queue = MockSplitQueue::new(&mem, QUEUE);
            for (i, (a, len, flags, next)) in descs.iter().enumerate() {
                let d = RawDescriptor::from(SplitDescriptor::new(*a, *len, *flags, *next));
                queue.desc_table().store(i as u16, d).unwrap();
            }
            queue.avail().ring().ref_at(0).unwrap().store(u16::to_le(head));
            queue.avail().idx().store(u16::to_le(1));
            let mut q: Queue = queue.create_queue().unwrap();
            let chain = q.iter(&mem).unwrap().next().unwrap();
            let limits = DiskLimits { capacity: 64, read_only, max_segments: 8, discard: true, write_zeroes: true };

            match parse(chain, &limits) {
                Ok(req) => {
                    prop_assert!(mem.get_slice(req.status, 1).is_ok());
                    let mut total = 0u64;
                    for b in &req.data {
                        prop_assert!(b.len == 0 || mem.get_slice(b.addr, b.len as usize).is_ok());
                        total += u64::from(b.len);
                    }
                    prop_assert_eq!(total, req.data_len);
                    prop_assert!(req.data_len <= MAX_REQUEST_BYTES);
                    match req.kind {
                        RequestKind::In | RequestKind::Out => {
                            prop_assert!(req.offset + req.data_len <= 64 * SECTOR_SIZE);
                            prop_assert_eq!(req.offset, sector * SECTOR_SIZE);
                            prop_assert!(!(read_only && req.kind == RequestKind::Out));
                        }
                        RequestKind::Discard(_) | RequestKind::WriteZeroes(_) => prop_assert!(!read_only),
                        _ => {}
                    }
                }
                Err(refused) => {
                    if let Some(status) = refused.status {
                        prop_assert!(mem.get_slice(status, 1).is_ok());
                    }
                }
            }
        }
    }
}
