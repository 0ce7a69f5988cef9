//! Hosting: a lease holder carrying out others' I/O on its node.
//!
//! The lease stays exclusive. A holder that offers hosting (a virtio-blk
//! dataplane with `live-jobs=on`) publishes a [`Host`] on its node; whoever
//! then asks for the node ([`NodeRef::take_access`]) gets a [`Hosted`]
//! handle instead of the refusal. Its engine ([`HostedIo`]) queues reads
//! with the host, which submits them on its own ring between its own
//! requests and hands the completions back. Hosted access only reads: a
//! job that must write the holder's node is still refused.
//!
//! A hosted job that must see the holder's writes before they land
//! (copy-before-write) registers a [`BeforeWrite`] hook: the holder asks it
//! about every write it is about to submit, and holds the write back until
//! the hook releases the ticket it returned.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base::sync::lock;
use vmm_sys_util::eventfd::EventFd;

use super::node::{next_id, NodeRef};
use super::{Holder, Lease};
use crate::error::BlockError;
use crate::io::{new_notifier, AsyncIo, Completion, IoError};

/// Decides, for a write the holder is about to submit, whether it must
/// wait: the hosted job's view of the node before the write lands.
pub trait BeforeWrite: Send + Sync {
    /// A write of `[offset, offset + len)` is about to be submitted: `None`
    /// lets it go; `Some(ticket)` holds it until [`Host::release`] of that
    /// ticket. Called on the holder's thread; must not block.
    fn before_write(&self, offset: u64, len: u64) -> Option<u64>;
}

/// A read a guest of the host asked for.
pub struct HostedRead {
    /// Where on the node.
    pub offset: u64,
    /// Where the bytes go (the guest keeps the buffers alive until it
    /// drained this read's completion).
    pub iovecs: Vec<libc::iovec>,
    /// The guest's tag, handed back with the completion.
    pub user_data: u64,
    /// Where the completion goes.
    pub reply: Arc<Replies>,
}

// SAFETY: the iovecs point into buffers their owner keeps valid and
// untouched until the read's completion is delivered (the `AsyncIo`
// contract of the engine that queued it); whichever thread carries the
// read out only hands them to the kernel.
unsafe impl Send for HostedRead {}

/// Completions on their way back to one hosted engine.
pub struct Replies {
    done: Mutex<VecDeque<Completion>>,
    notifier: EventFd,
}

impl Replies {
    /// Hands back a finished read.
    pub fn complete(&self, user_data: u64, result: i32) {
        lock(&self.done).push_back(Completion { user_data, result });
        // An eventfd write fails only when its counter would overflow,
        // and then it is signalled anyway.
        let _ = self.notifier.write(1);
    }
}

/// What a holder that hosts shares with its guests.
pub struct Host {
    holder: Holder,
    reads: Mutex<VecDeque<HostedRead>>,
    /// Wakes the holder: reads queued, tickets released.
    kick: EventFd,
    guests: Mutex<Vec<(u64, Holder)>>,
    hooks: Mutex<Vec<(u64, Arc<dyn BeforeWrite>)>>,
    /// Whether any hook is registered: the holder's write path reads only
    /// this flag when there is none.
    hooked: AtomicBool,
    released: Mutex<Vec<u64>>,
    next_ticket: AtomicU64,
    /// Reads queued or tickets released since the holder last looked: its
    /// poll loop reads this flag, not the locks.
    work: AtomicBool,
    /// The holder stopped hosting: reads fail at once.
    closed: AtomicBool,
}

impl Host {
    fn new(holder: Holder) -> std::io::Result<Self> {
        Ok(Self {
            holder,
            reads: Mutex::new(VecDeque::new()),
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            guests: Mutex::new(Vec::new()),
            hooks: Mutex::new(Vec::new()),
            hooked: AtomicBool::new(false),
            released: Mutex::new(Vec::new()),
            next_ticket: AtomicU64::new(1),
            work: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    /// The holder doing the hosting.
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// The eventfd the holder waits on for hosted work.
    pub fn kick(&self) -> &EventFd {
        &self.kick
    }

    /// Who is hosted now.
    pub fn guests(&self) -> Vec<Holder> {
        lock(&self.guests).iter().map(|(_, h)| h.clone()).collect()
    }

    /// Whether anyone is hosted.
    pub fn has_guests(&self) -> bool {
        !lock(&self.guests).is_empty()
    }

    /// Whether reads were queued or tickets released since the last call
    /// (which clears it).
    pub fn has_work(&self) -> bool {
        self.work.swap(false, Ordering::AcqRel)
    }

    /// Takes the reads queued since the last call (into `into`).
    pub fn take_reads(&self, into: &mut Vec<HostedRead>) {
        into.extend(lock(&self.reads).drain(..));
    }

    /// Asks every hook about a write of `[offset, offset + len)`; the
    /// tickets it must wait for go into `tickets` (none: it may go).
    pub fn before_write(&self, offset: u64, len: u64, tickets: &mut Vec<u64>) {
        if !self.hooked.load(Ordering::Acquire) {
            return;
        }
        for (_, hook) in lock(&self.hooks).iter() {
            if let Some(t) = hook.before_write(offset, len) {
                tickets.push(t);
            }
        }
    }

    /// A new ticket number, for a hook to hand out.
    pub fn ticket(&self) -> u64 {
        self.next_ticket.fetch_add(1, Ordering::Relaxed)
    }

    /// Lets the writes waiting for `ticket` go.
    pub fn release(&self, ticket: u64) {
        lock(&self.released).push(ticket);
        self.work.store(true, Ordering::Release);
        let _ = self.kick.write(1);
    }

    /// Takes the tickets released since the last call.
    pub fn take_released(&self, into: &mut Vec<u64>) {
        into.append(&mut lock(&self.released));
    }

    /// Registers `hook`; its id, for [`Host::unhook`].
    pub fn hook(&self, hook: Arc<dyn BeforeWrite>) -> u64 {
        let id = next_id();
        lock(&self.hooks).push((id, hook));
        self.hooked.store(true, Ordering::Release);
        id
    }

    /// Removes hook `id`. The hook's owner releases its tickets itself.
    pub fn unhook(&self, id: u64) {
        let mut hooks = lock(&self.hooks);
        hooks.retain(|(h, _)| *h != id);
        self.hooked.store(!hooks.is_empty(), Ordering::Release);
    }

    fn queue(&self, read: HostedRead) {
        let mut reads = lock(&self.reads);
        if self.closed.load(Ordering::Acquire) {
            drop(reads);
            read.reply.complete(read.user_data, -libc::EIO);
            return;
        }
        reads.push_back(read);
        self.work.store(true, Ordering::Release);
    }

    /// Stops hosting: reads queued and not taken fail (`EIO`), and so does
    /// every later one; the holder answers those it took.
    pub fn close(&self) {
        let mut reads = lock(&self.reads);
        self.closed.store(true, Ordering::Release);
        for read in reads.drain(..) {
            read.reply.complete(read.user_data, -libc::EIO);
        }
    }
}

impl Lease {
    /// Offers to host others' reads (and write hooks) on the leased node
    /// until the lease goes; the [`Host`] the holder then serves.
    pub fn offer_hosting(&self) -> std::io::Result<Arc<Host>> {
        let host = Arc::new(Host::new(self.holder().clone())?);
        *lock(&self.node().node.host) = Some(host.clone());
        Ok(host)
    }
}

/// How a holder reaches a node: its own lease, or reads carried out by
/// the node's lease holder.
pub enum Access {
    /// The holder has the node to itself.
    Lease(Lease),
    /// The node's lease holder carries out this holder's reads.
    Hosted(Hosted),
}

impl Access {
    /// The node reached.
    pub fn node(&self) -> &NodeRef {
        match self {
            Access::Lease(l) => l.node(),
            Access::Hosted(h) => &h.node,
        }
    }

    /// An engine on the node for `depth` operations in flight.
    pub fn open_io(&self, depth: u32) -> Result<Box<dyn AsyncIo>, BlockError> {
        match self {
            Access::Lease(l) => l.open_io(depth),
            Access::Hosted(h) => h.open_io(),
        }
    }

    /// The host, for a hosted access.
    pub fn host(&self) -> Option<&Arc<Host>> {
        match self {
            Access::Lease(_) => None,
            Access::Hosted(h) => Some(&h.host),
        }
    }
}

/// A guest of a node's lease holder. Dropping it leaves.
pub struct Hosted {
    node: NodeRef,
    host: Arc<Host>,
    id: u64,
}

impl Hosted {
    /// An engine whose reads the host carries out (writes are refused).
    pub fn open_io(&self) -> Result<Box<dyn AsyncIo>, BlockError> {
        let notifier = new_notifier("hosted").map_err(|source| BlockError::Io {
            node: self.node.name().to_string(),
            source,
        })?;
        Ok(Box::new(HostedIo {
            host: self.host.clone(),
            replies: Arc::new(Replies {
                done: Mutex::new(VecDeque::new()),
                notifier,
            }),
            queued: false,
        }))
    }
}

impl Drop for Hosted {
    fn drop(&mut self) {
        lock(&self.host.guests).retain(|(id, _)| *id != self.id);
    }
}

impl NodeRef {
    /// The node for `holder`: its lease if free; reads through its lease
    /// holder if that holder hosts and `hosted` is allowed; else the
    /// refusal naming the holder.
    pub fn take_access(&self, holder: Holder, hosted: bool) -> Result<Access, BlockError> {
        match self.take_lease(holder.clone()) {
            Ok(lease) => Ok(Access::Lease(lease)),
            Err(busy @ BlockError::Busy { .. }) => {
                let host = lock(&self.node.host).clone();
                match host {
                    Some(host) if hosted => {
                        let id = next_id();
                        lock(&host.guests).push((id, holder.clone()));
                        Ok(Access::Hosted(Hosted {
                            node: self.clone_for(holder),
                            host,
                            id,
                        }))
                    }
                    _ => Err(busy),
                }
            }
            Err(e) => Err(e),
        }
    }
}

/// The engine of a hosted guest: reads go to the host's queue, writes are
/// refused (`EROFS`), flushes have nothing to do.
struct HostedIo {
    host: Arc<Host>,
    replies: Arc<Replies>,
    /// Reads were queued since the host was last kicked.
    queued: bool,
}

impl AsyncIo for HostedIo {
    fn notifier(&self) -> &EventFd {
        &self.replies.notifier
    }

    unsafe fn read_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError> {
        self.host.queue(HostedRead {
            offset,
            iovecs: iovecs.to_vec(),
            user_data,
            reply: self.replies.clone(),
        });
        self.queued = true;
        Ok(())
    }

    unsafe fn write_vectored(
        &mut self,
        _offset: u64,
        _iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<(), IoError> {
        self.replies.complete(user_data, -libc::EROFS);
        Ok(())
    }

    fn flush(&mut self, user_data: u64) -> Result<(), IoError> {
        self.replies.complete(user_data, 0);
        Ok(())
    }

    fn punch_hole(&mut self, _offset: u64, _len: u64, user_data: u64) -> Result<(), IoError> {
        self.replies.complete(user_data, -libc::EROFS);
        Ok(())
    }

    fn write_zeroes(&mut self, _offset: u64, _len: u64, user_data: u64) -> Result<(), IoError> {
        self.replies.complete(user_data, -libc::EROFS);
        Ok(())
    }

    fn submit(&mut self) -> Result<(), IoError> {
        if std::mem::take(&mut self.queued) {
            self.host.kick.write(1).map_err(IoError::Submit)?;
        }
        Ok(())
    }

    fn next_completion(&mut self) -> Option<Completion> {
        lock(&self.replies.done).pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{DriverOptions, Graph, NodeOptions};
    use std::time::Duration;

    fn graph() -> Graph {
        let graph = Graph::new();
        graph
            .add(NodeOptions {
                node_name: Some("drive0".into()),
                read_only: false,
                driver: DriverOptions::Null { size: 1 << 20 },
            })
            .unwrap();
        graph
    }

    fn dataplane() -> Holder {
        Holder::Dataplane {
            kind: "virtio-blk",
            id: "vda".into(),
        }
    }

    fn job() -> Holder {
        Holder::Job { id: "job0".into() }
    }

    #[test]
    fn a_held_node_is_refused_unless_its_holder_hosts() {
        let graph = graph();
        let node = graph.get("drive0", Holder::Monitor).unwrap();
        let lease = node.take_lease(dataplane()).unwrap();
        let busy = node.take_access(job(), true).err().unwrap().to_string();
        assert_eq!(
            busy,
            "Node 'drive0' is busy: block device is in use by virtio-blk dataplane of device 'vda'"
        );
        let host = lease.offer_hosting().unwrap();
        assert!(
            node.take_access(job(), false).is_err(),
            "only who asks to be hosted is"
        );
        let access = node.take_access(job(), true).unwrap();
        assert!(matches!(access, Access::Hosted(_)));
        assert_eq!(graph.info(&node).hosted, vec![job()]);
        assert_eq!(graph.info(&node).lease, Some(dataplane()));
        drop(access);
        assert!(
            graph.info(&node).hosted.is_empty(),
            "a guest that goes leaves"
        );
        assert!(!host.has_guests());
        drop(lease);
        assert!(
            matches!(node.take_access(job(), true).unwrap(), Access::Lease(_)),
            "hosting ends with the lease"
        );
    }

    #[test]
    fn hosted_reads_are_carried_out_by_the_holder_and_writes_refused() {
        let graph = graph();
        let node = graph.get("drive0", Holder::Monitor).unwrap();
        let lease = node.take_lease(dataplane()).unwrap();
        let host = lease.offer_hosting().unwrap();
        let access = node.take_access(job(), true).unwrap();
        let mut io = access.open_io(4).unwrap();
        let mut buf = vec![0xffu8; 4096];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the buffer outlives the completion below.
        unsafe { io.read_vectored(8192, &iov, 7).unwrap() };
        let data = [1u8; 512];
        let wiov = [libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: 512,
        }];
        // SAFETY: as above.
        unsafe { io.write_vectored(0, &wiov, 8).unwrap() };
        io.submit().unwrap();
        assert_eq!(
            io.next_completion(),
            Some(Completion {
                user_data: 8,
                result: -libc::EROFS
            }),
            "a hosted guest only reads"
        );
        // The holder's side: take the read, carry it out on its engine.
        assert!(host.has_work());
        let mut reads = Vec::new();
        host.take_reads(&mut reads);
        assert_eq!(reads.len(), 1);
        let mut engine = lease.open_io(4).unwrap();
        let read = reads.pop().unwrap();
        // SAFETY: the iovecs point into `buf`, alive until the end.
        unsafe { engine.read_vectored(read.offset, &read.iovecs, 1).unwrap() };
        engine.submit().unwrap();
        engine.submit_and_wait(1, Duration::from_secs(5)).unwrap();
        let done = engine.next_completion().unwrap();
        read.reply.complete(read.user_data, done.result);
        assert_eq!(
            io.next_completion(),
            Some(Completion {
                user_data: 7,
                result: 4096
            })
        );
        assert!(buf.iter().all(|&b| b == 0), "null-co reads zeros");
    }

    struct Hold;

    impl BeforeWrite for Hold {
        fn before_write(&self, offset: u64, _len: u64) -> Option<u64> {
            (offset == 0).then_some(42)
        }
    }

    #[test]
    fn hooks_hold_writes_until_their_tickets_come_back() {
        let graph = graph();
        let node = graph.get("drive0", Holder::Monitor).unwrap();
        let lease = node.take_lease(dataplane()).unwrap();
        let host = lease.offer_hosting().unwrap();
        let mut tickets = Vec::new();
        host.before_write(0, 512, &mut tickets);
        assert!(tickets.is_empty(), "no hook, no wait");
        let id = host.hook(Arc::new(Hold));
        host.before_write(4096, 512, &mut tickets);
        assert!(tickets.is_empty());
        host.before_write(0, 512, &mut tickets);
        assert_eq!(tickets, vec![42]);
        host.release(42);
        assert!(host.has_work());
        let mut released = Vec::new();
        host.take_released(&mut released);
        assert_eq!(released, vec![42]);
        host.unhook(id);
        tickets.clear();
        host.before_write(0, 512, &mut tickets);
        assert!(tickets.is_empty(), "an unhooked hook holds nothing");
    }
}
