//! Block devices' view of storage: the [`BlockBackend`] trait that disk models call, and the
//! per-drive I/O thread ([`BlockQueue`]) that runs backend requests off the vCPU thread.
//!
//! The data path of a guest disk write: the disk controller model builds a [`BlockRequest`] and
//! submits it to its drive's queue; the queue's host thread calls the backend (`pwrite` in vmapp's
//! file backends), sends the [`BlockCompletion`] back and signals the VM's [`IoNotifier`]; the run
//! loop (running guest code or sleeping in HLT) sees the notification, lets the controller finish
//! the command, and the controller raises its interrupt line. A slow disk therefore never stalls
//! the guest's CPU.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes in a disk sector.
pub const SECTOR_SIZE: u64 = 512;

/// Errors from a block backend.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// A host system call on the image failed.
    #[error("{op} of {len} bytes at byte {offset} of {name} failed")]
    Io {
        /// The image.
        name: String,
        /// What was attempted ("read", "write", "flush").
        op: &'static str,
        /// Byte offset in the image.
        offset: u64,
        /// Length of the access.
        len: usize,
        /// The host error.
        #[source]
        source: std::io::Error,
    },
    /// A write to an image opened read-only.
    #[error("{name} is read-only")]
    ReadOnly {
        /// The image.
        name: String,
    },
    /// An access past the end of the image.
    #[error("access of {len} bytes at byte {offset} is past the end of {name} ({size} bytes)")]
    OutOfRange {
        /// The image.
        name: String,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Image size.
        size: u64,
    },
    /// The I/O thread could not be started.
    #[error("cannot start the I/O thread for {name}")]
    Thread {
        /// The image.
        name: String,
        /// The host error.
        #[source]
        source: std::io::Error,
    },
    /// The I/O thread is gone (it panicked); the request was not carried out.
    #[error("the I/O thread of {name} has stopped")]
    ThreadGone {
        /// The image.
        name: String,
    },
}

/// Storage behind a virtual drive: an image file, an overlay over one, memory. Offsets are bytes;
/// callers keep accesses inside `0..len()`.
pub trait BlockBackend: Send {
    /// A name for messages (usually the image's path).
    fn name(&self) -> &str;
    /// Size in bytes.
    fn len(&self) -> u64;
    /// Whether the backend is empty (size 0).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Fills `buf` from byte `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    /// Writes `data` at byte `offset`. The data may sit in a host cache until [`Self::flush`],
    /// unless the backend writes through.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError>;
    /// Makes every completed write durable (fdatasync for files).
    fn flush(&mut self) -> Result<(), BlockError>;
}

/// Checks that `offset..offset+len` lies inside a backend of `size` bytes.
pub fn check_range(name: &str, offset: u64, len: usize, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange {
            name: name.to_string(),
            offset,
            len,
            size,
        }),
    }
}

/// A RAM disk: the image lives in memory (tests, scratch disks).
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    name: String,
    data: Vec<u8>,
    read_only: bool,
    flushes: Arc<AtomicU64>,
}

impl MemoryBackend {
    /// A RAM disk holding `data`.
    pub fn new(name: &str, data: Vec<u8>, read_only: bool) -> Self {
        Self {
            name: name.to_string(),
            data,
            read_only,
            flushes: Arc::default(),
        }
    }

    /// A counter of flushes, shared with clones.
    pub fn flush_counter(&self) -> Arc<AtomicU64> {
        self.flushes.clone()
    }
}

impl BlockBackend for MemoryBackend {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        check_range(&self.name, offset, buf.len(), self.len())?;
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly {
                name: self.name.clone(),
            });
        }
        check_range(&self.name, offset, data.len(), self.len())?;
        let o = offset as usize;
        self.data[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Makes a running engine return to the VM's run loop soon (bt: the exit request translated
/// code checks at every unit entry). Called from I/O threads.
pub type IoWaker = Arc<dyn Fn() + Send + Sync>;

/// Wakes the VM's run loop when an I/O thread completes a request, whether the vCPU is running
/// guest code (the engine's [`IoWaker`] makes it return, and the loop polls
/// [`IoNotifier::take`] at every exit) or halted (it sleeps in [`IoNotifier::wait`]).
#[derive(Clone, Default)]
pub struct IoNotifier {
    inner: Arc<NotifierInner>,
}

impl std::fmt::Debug for IoNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoNotifier")
            .field("pending", &self.inner.pending)
            .field("wakeups", &self.inner.wakeups)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct NotifierInner {
    pending: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
    waker: Mutex<Option<IoWaker>>,
    wakeups: AtomicU64,
}

impl IoNotifier {
    /// A notifier with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks a completion pending, wakes a waiter and makes a running engine return.
    pub fn notify(&self) {
        self.inner.pending.store(true, Ordering::Release);
        {
            let _guard = self.inner.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.inner.wake.notify_all();
        }
        let waker = self
            .inner
            .waker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(w) = waker {
            self.inner.wakeups.fetch_add(1, Ordering::Relaxed);
            w();
        }
    }

    /// Sets what makes the running engine return when a completion arrives.
    pub fn set_waker(&self, waker: IoWaker) {
        *self.inner.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker);
    }

    /// How many completions asked the running engine to return.
    pub fn wakeups(&self) -> u64 {
        self.inner.wakeups.load(Ordering::Relaxed)
    }

    /// Returns whether a completion was pending, and clears it.
    pub fn take(&self) -> bool {
        self.inner.pending.swap(false, Ordering::Acquire)
    }

    /// Sleeps until a completion is pending or `timeout` passes; returns whether one is
    /// pending (without clearing it).
    pub fn wait(&self, timeout: Duration) -> bool {
        let guard = self.inner.lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.inner.pending.load(Ordering::Acquire) {
            return true;
        }
        let _ = self
            .inner
            .wake
            .wait_timeout(guard, timeout)
            .unwrap_or_else(|e| e.into_inner());
        self.inner.pending.load(Ordering::Acquire)
    }
}

/// What a request asks of the backend.
#[derive(Debug)]
pub enum BlockOp {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes to read.
        len: usize,
    },
    /// Write `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
        /// Flush before completing (the drive's write cache is disabled).
        durable: bool,
    },
    /// Make every completed write durable.
    Flush,
}

/// A request to a drive's I/O thread.
#[derive(Debug)]
pub struct BlockRequest {
    /// Chosen by the submitter; returned with the completion.
    pub tag: u64,
    /// The operation.
    pub op: BlockOp,
}

/// A finished request: the data read (reads), or the written buffer handed back (writes,
/// empty for flushes).
#[derive(Debug)]
pub struct BlockCompletion {
    /// The request's tag.
    pub tag: u64,
    /// The data, or why the request failed.
    pub result: Result<Vec<u8>, BlockError>,
}

/// Counters of one drive's I/O thread.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Read requests.
    pub reads: AtomicU64,
    /// Write requests.
    pub writes: AtomicU64,
    /// Flush requests.
    pub flushes: AtomicU64,
    /// Bytes read.
    pub bytes_read: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
    /// Failed requests.
    pub errors: AtomicU64,
}

/// One drive's I/O thread: requests go in, completions come out in order, and each completion
/// signals the VM's [`IoNotifier`]. Dropping the queue lets the thread finish every request
/// already submitted, then joins it, so no accepted write is lost when the VM ends.
pub struct BlockQueue {
    name: String,
    len: u64,
    read_only: bool,
    requests: Option<Sender<BlockRequest>>,
    completions: Receiver<BlockCompletion>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<BlockCounters>,
}

impl std::fmt::Debug for BlockQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockQueue")
            .field("name", &self.name)
            .field("len", &self.len)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl BlockQueue {
    /// Starts the I/O thread for `backend`; completions signal `notifier`.
    pub fn spawn(
        mut backend: Box<dyn BlockBackend>,
        notifier: IoNotifier,
    ) -> Result<Self, BlockError> {
        let name = backend.name().to_string();
        let len = backend.len();
        let read_only = backend.read_only();
        let (req_tx, req_rx) = channel::<BlockRequest>();
        let (done_tx, done_rx) = channel();
        let counters = Arc::new(BlockCounters::default());
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("bt86-blk".into())
            .spawn(move || {
                while let Ok(req) = req_rx.recv() {
                    let result = execute(backend.as_mut(), req.op, &c);
                    if result.is_err() {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    if done_tx
                        .send(BlockCompletion {
                            tag: req.tag,
                            result,
                        })
                        .is_err()
                    {
                        // The VM is gone; keep executing what was submitted.
                        continue;
                    }
                    notifier.notify();
                }
            })
            .map_err(|source| BlockError::Thread {
                name: name.clone(),
                source,
            })?;
        Ok(Self {
            name,
            len,
            read_only,
            requests: Some(req_tx),
            completions: done_rx,
            thread: Some(thread),
            counters,
        })
    }

    /// The backend's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the backend is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the backend refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The thread's counters.
    pub fn counters(&self) -> &BlockCounters {
        &self.counters
    }

    /// Hands `request` to the I/O thread. If the thread is gone, the failure comes back as a
    /// completion, so the device still finishes the command (with an error).
    pub fn submit(&self, request: BlockRequest) -> Result<(), BlockCompletion> {
        let tag = request.tag;
        let gone = || BlockCompletion {
            tag,
            result: Err(BlockError::ThreadGone {
                name: self.name.clone(),
            }),
        };
        match &self.requests {
            Some(tx) => tx.send(request).map_err(|_| gone()),
            None => Err(gone()),
        }
    }

    /// A completion, if one is ready.
    pub fn try_complete(&self) -> Option<BlockCompletion> {
        match self.completions.try_recv() {
            Ok(c) => Some(c),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => None,
        }
    }

    /// Waits for the next completion (tests and synchronous callers). None if the thread is
    /// gone.
    pub fn wait_complete(&self) -> Option<BlockCompletion> {
        self.completions.recv().ok()
    }
}

fn execute(
    backend: &mut dyn BlockBackend,
    op: BlockOp,
    c: &BlockCounters,
) -> Result<Vec<u8>, BlockError> {
    match op {
        BlockOp::Read { offset, len } => {
            c.reads.fetch_add(1, Ordering::Relaxed);
            check_range(backend.name(), offset, len, backend.len())?;
            let mut buf = vec![0u8; len];
            backend.read_at(offset, &mut buf)?;
            c.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
            Ok(buf)
        }
        BlockOp::Write {
            offset,
            data,
            durable,
        } => {
            c.writes.fetch_add(1, Ordering::Relaxed);
            if backend.read_only() {
                return Err(BlockError::ReadOnly {
                    name: backend.name().to_string(),
                });
            }
            check_range(backend.name(), offset, data.len(), backend.len())?;
            backend.write_at(offset, &data)?;
            if durable {
                c.flushes.fetch_add(1, Ordering::Relaxed);
                backend.flush()?;
            }
            c.bytes_written
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            Ok(data)
        }
        BlockOp::Flush => {
            c.flushes.fetch_add(1, Ordering::Relaxed);
            backend.flush()?;
            Ok(Vec::new())
        }
    }
}

impl Drop for BlockQueue {
    fn drop(&mut self) {
        // Closing the request channel ends the thread after the requests already queued.
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_backend_reads_writes_and_checks_ranges() {
        let mut b = MemoryBackend::new("ram", vec![0; 1024], false);
        b.write_at(510, &[1, 2, 3, 4]).unwrap();
        let mut buf = [0u8; 4];
        b.read_at(510, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        assert!(matches!(
            b.read_at(1022, &mut buf),
            Err(BlockError::OutOfRange { size: 1024, .. })
        ));
        let mut ro = MemoryBackend::new("ro", vec![0; 512], true);
        assert!(matches!(
            ro.write_at(0, &[1]),
            Err(BlockError::ReadOnly { .. })
        ));
    }

    #[test]
    fn queue_runs_requests_in_order_and_notifies() {
        let backend = MemoryBackend::new("ram", vec![0; 4096], false);
        let flushes = backend.flush_counter();
        let notifier = IoNotifier::new();
        let q = BlockQueue::spawn(Box::new(backend), notifier.clone()).unwrap();
        q.submit(BlockRequest {
            tag: 1,
            op: BlockOp::Write {
                offset: 512,
                data: vec![0xAB; 512],
                durable: false,
            },
        })
        .unwrap();
        q.submit(BlockRequest {
            tag: 2,
            op: BlockOp::Flush,
        })
        .unwrap();
        q.submit(BlockRequest {
            tag: 3,
            op: BlockOp::Read {
                offset: 1020,
                len: 8,
            },
        })
        .unwrap();
        q.submit(BlockRequest {
            tag: 4,
            op: BlockOp::Read {
                offset: 4090,
                len: 8,
            },
        })
        .unwrap();
        let tags: Vec<_> = (0..4).map(|_| q.wait_complete().unwrap()).collect();
        assert_eq!(tags.iter().map(|c| c.tag).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(
            tags[2].result.as_ref().unwrap(),
            &[0xAB, 0xAB, 0xAB, 0xAB, 0, 0, 0, 0]
        );
        assert!(matches!(tags[3].result, Err(BlockError::OutOfRange { .. })));
        assert_eq!(flushes.load(Ordering::Relaxed), 1);
        assert!(notifier.take());
        assert_eq!(q.counters().errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn notifier_wait_returns_when_notified_from_another_thread() {
        let n = IoNotifier::new();
        assert!(!n.wait(Duration::from_millis(1)));
        let n2 = n.clone();
        let t = std::thread::spawn(move || n2.notify());
        // Waits until the other thread's notify, however long that takes.
        while !n.wait(Duration::from_secs(5)) {}
        t.join().unwrap();
        assert!(n.take());
        assert!(!n.take());
    }

    #[test]
    fn a_completion_calls_the_waker() {
        let n = IoNotifier::new();
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        n.set_waker(Arc::new(move || {
            c.fetch_add(1, Ordering::Relaxed);
        }));
        let q = BlockQueue::spawn(
            Box::new(MemoryBackend::new("ram", vec![0; 512], false)),
            n.clone(),
        )
        .unwrap();
        q.submit(BlockRequest {
            tag: 1,
            op: BlockOp::Flush,
        })
        .unwrap();
        q.wait_complete().unwrap();
        drop(q); // joins the thread: its notify (and the waker call) happened
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!(n.wakeups(), 1);
    }

    #[test]
    fn read_only_queue_refuses_writes() {
        let q = BlockQueue::spawn(
            Box::new(MemoryBackend::new("ro", vec![7; 512], true)),
            IoNotifier::new(),
        )
        .unwrap();
        assert!(q.read_only());
        q.submit(BlockRequest {
            tag: 9,
            op: BlockOp::Write {
                offset: 0,
                data: vec![0; 512],
                durable: false,
            },
        })
        .unwrap();
        let c = q.wait_complete().unwrap();
        assert!(matches!(c.result, Err(BlockError::ReadOnly { .. })));
    }
}
