//! Reading an upload under limits a hostile client cannot stretch: a size cap, a deadline
//! for the whole body and for each silence between chunks, and a memory budget shared by
//! every upload in flight. A client that trickles one byte every few seconds is cut off at
//! the deadline; a crowd of clients that each declare a large body runs out of budget and
//! is told to retry, instead of pinning gigabytes between them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::time::Instant;

/// Limits on one upload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UploadLimits {
    /// Largest body accepted.
    pub max_bytes: usize,
    /// Time from the first byte of the body to its last.
    pub deadline: Duration,
    /// Longest silence between two chunks.
    pub idle: Duration,
}

impl UploadLimits {
    /// `max_bytes` with the server's default deadlines (30 s in all, 10 s of silence).
    pub fn of_size(max_bytes: usize) -> Self {
        Self { max_bytes, deadline: Duration::from_secs(30), idle: Duration::from_secs(10) }
    }
}

/// Bytes that uploads in flight may hold together. Each upload reserves what it will hold
/// (its declared length, or what it has grown to) and gives it back when dropped.
#[derive(Debug)]
pub struct MemoryBudget {
    capacity: usize,
    used: AtomicUsize,
    /// Bytes given back since the heap was last trimmed (see [`crate::memory`]).
    released: AtomicUsize,
}

impl MemoryBudget {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self { capacity, used: AtomicUsize::new(0), released: AtomicUsize::new(0) })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    fn try_take(&self, bytes: usize) -> bool {
        self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| used.checked_add(bytes).filter(|total| *total <= self.capacity)).is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        self.released.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Whether at least `bytes` were given back since the last time this said yes; saying
    /// yes starts the count again.
    pub fn take_released(&self, bytes: usize) -> bool {
        self.released.fetch_update(Ordering::AcqRel, Ordering::Acquire, |released| (released >= bytes).then_some(0)).is_ok()
    }
}

/// A share of the budget; returned when dropped (after the search that reads the bytes).
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: usize,
}

impl Reservation {
    fn empty(budget: &Arc<MemoryBudget>) -> Self {
        Self { budget: budget.clone(), bytes: 0 }
    }

    /// Grows the share to `bytes`; false when the budget cannot give that much.
    fn grow_to(&mut self, bytes: usize) -> bool {
        if bytes <= self.bytes {
            return true;
        }
        if !self.budget.try_take(bytes - self.bytes) {
            return false;
        }
        self.bytes = bytes;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

/// Why an upload was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadError {
    TooLarge {
        limit: usize,
    },
    Deadline {
        seconds: u64,
    },
    Idle {
        seconds: u64,
    },
    /// Every byte of the shared budget is held by uploads in flight.
    MemoryBusy,
    /// The connection failed or ended mid-body.
    Payload(String),
}

/// An upload read in full, with the share of the budget it holds.
#[derive(Debug)]
pub struct Upload {
    pub bytes: Vec<u8>,
    pub reservation: Reservation,
}

/// Smallest step a body's buffer grows by when its length was not declared.
const MIN_GROWTH: usize = 64 * 1024;

/// Reads `payload` under `limits`, holding a share of `budget` for what it buffers.
/// `declared` is the Content-Length when there is one: the whole of it is reserved (and
/// allocated, untouched pages costing nothing) up front.
pub async fn read_body<S>(mut payload: S, declared: Option<usize>, limits: UploadLimits, budget: &Arc<MemoryBudget>) -> Result<Upload, UploadError>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    let too_large = UploadError::TooLarge { limit: limits.max_bytes };
    let mut reservation = Reservation::empty(budget);
    let mut bytes = Vec::new();
    if let Some(len) = declared {
        if len > limits.max_bytes {
            return Err(too_large);
        }
        if !reservation.grow_to(len) {
            return Err(UploadError::MemoryBusy);
        }
        bytes.reserve_exact(len);
    }
    let deadline = Instant::now() + limits.deadline;
    loop {
        let wake = deadline.min(Instant::now() + limits.idle);
        let chunk = match tokio::time::timeout_at(wake, payload.next()).await {
            Err(_) if Instant::now() >= deadline => return Err(UploadError::Deadline { seconds: limits.deadline.as_secs() }),
            Err(_) => return Err(UploadError::Idle { seconds: limits.idle.as_secs() }),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(UploadError::Payload(e.to_string())),
            Ok(Some(Ok(chunk))) => chunk,
        };
        let needed = bytes.len() + chunk.len();
        if needed > limits.max_bytes {
            return Err(too_large);
        }
        if needed > bytes.capacity() {
            let grown = needed.max(bytes.capacity() * 2).max(MIN_GROWTH).min(limits.max_bytes);
            if !reservation.grow_to(grown) {
                return Err(UploadError::MemoryBusy);
            }
            bytes.reserve_exact(grown - bytes.len());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Upload { bytes, reservation })
}

#[cfg(test)]
mod tests {
    use futures_util::stream;

    use super::*;

    fn limits() -> UploadLimits {
        UploadLimits { max_bytes: 1000, deadline: Duration::from_secs(30), idle: Duration::from_secs(10) }
    }

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, PayloadError>> + Unpin {
        stream::iter(parts.iter().map(|p| Ok(Bytes::from_static(p))).collect::<Vec<_>>())
    }

    #[tokio::test]
    async fn reads_a_body_and_returns_its_budget_when_done() {
        let budget = MemoryBudget::new(1 << 20);
        let upload = read_body(chunks(&[b"ab", b"cd"]), None, limits(), &budget).await.unwrap();
        assert_eq!(upload.bytes, b"abcd");
        assert!(budget.used() >= 4);
        drop(upload);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn freed_uploads_add_up_to_one_trim() {
        let budget = MemoryBudget::new(1 << 20);
        for _ in 0..3 {
            drop(read_body(chunks(&[b"x"]), Some(400), limits(), &budget).await.unwrap());
        }
        // 1,200 bytes given back: one trim of 1,000 is due, and then none until 1,000 more.
        assert!(!budget.take_released(1300));
        assert!(budget.take_released(1000));
        assert!(!budget.take_released(1000));
        drop(read_body(chunks(&[b"x"]), Some(999), limits(), &budget).await.unwrap());
        assert!(!budget.take_released(1000));
        drop(read_body(chunks(&[b"x"]), Some(1), limits(), &budget).await.unwrap());
        assert!(budget.take_released(1000));
    }

    #[tokio::test]
    async fn over_the_size_or_the_budget_is_refused() {
        let budget = MemoryBudget::new(1 << 20);
        assert_eq!(read_body(chunks(&[b"x"]), Some(1001), limits(), &budget).await.unwrap_err(), UploadError::TooLarge { limit: 1000 });
        let big: &'static [u8] = Box::leak(vec![0u8; 600].into_boxed_slice());
        assert_eq!(read_body(chunks(&[big, big]), None, limits(), &budget).await.unwrap_err(), UploadError::TooLarge { limit: 1000 });
        // Two uploads declaring 600 bytes each under a 1000-byte budget: the second waits
        // for nothing, it is refused while the first holds its share.
        let small = MemoryBudget::new(1000);
        let first = read_body(chunks(&[b"a"]), Some(600), limits(), &small).await.unwrap();
        assert_eq!(read_body(chunks(&[b"b"]), Some(600), limits(), &small).await.unwrap_err(), UploadError::MemoryBusy);
        drop(first);
        assert!(read_body(chunks(&[b"b"]), Some(600), limits(), &small).await.is_ok());
        assert_eq!(small.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickling_client_is_cut_off_at_the_deadline() {
        // One byte every 4.5 s: never silent for the 10 s idle limit, over the 30 s deadline.
        let trickle = stream::unfold(0u32, |n| async move {
            tokio::time::sleep(Duration::from_millis(4500)).await;
            Some((Ok::<_, PayloadError>(Bytes::from_static(b"x")), n + 1))
        });
        let budget = MemoryBudget::new(1 << 20);
        let err = read_body(Box::pin(trickle), Some(900), limits(), &budget).await.unwrap_err();
        assert_eq!(err, UploadError::Deadline { seconds: 30 });
        assert_eq!(budget.used(), 0);
        let silent = stream::pending::<Result<Bytes, PayloadError>>();
        assert_eq!(read_body(silent, None, limits(), &budget).await.unwrap_err(), UploadError::Idle { seconds: 10 });
    }
}
