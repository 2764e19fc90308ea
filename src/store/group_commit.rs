//! Group commit: many writers, one flush. A writer that needs durability takes a ticket; if no
//! flush is running it runs one that covers every ticket taken so far, otherwise it waits for a
//! flush that covers its own. Nobody returns before a flush that started after their write.
//!
//! Writes go through [`GroupCommit::write`] so the flusher knows how many batches are being
//! applied at this moment: it waits (briefly, bounded) for them before flushing. Without that,
//! writers stalled behind the previous flush trickle in one by one and each starts a flush of
//! its own (measured with 8 writers: 1.9 writes per flush without the wait, 4.6 with it).

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::Batch;

use super::Backend;
use super::StoreError;

#[derive(Default)]
pub(crate) struct GroupCommit {
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Default)]
struct State {
    /// Batches applied (each write is a ticket: a flush started after it covers it).
    taken: u64,
    /// Every ticket up to this one is durable.
    durable: u64,
    flushing: bool,
    /// The last failed flush: tickets up to it failed with this message.
    failed: Option<(u64, String)>,
    /// Flushes run (for metrics and benchmarks: tickets / flushes is the batching factor).
    flushes: u64,
    /// Batches being applied right now.
    writing: u32,
}

/// How long a flusher waits for batches being applied to join its flush.
const JOIN_WAIT: Duration = Duration::from_millis(2);

impl GroupCommit {
    /// (batches applied, flushes run).
    pub(crate) fn counts(&self) -> (u64, u64) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (st.taken, st.flushes)
    }

    /// Apply a batch (not yet durable), letting a flusher know it is under way.
    pub(crate) fn write(&self, backend: &dyn Backend, batch: Batch) -> Result<(), StoreError> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).writing += 1;
        let r = backend.write(batch);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.writing -= 1;
        // A failed write is a ticket too (a flush covering it is harmless): a reader that
        // counted it while it was under way must not wait for a ticket that never comes.
        st.taken += 1;
        if st.writing == 0 {
            self.done.notify_all();
        }
        r
    }

    /// Return once every batch applied before this call is durable. Cheap when nothing is
    /// pending, so readers can call it before serving what they read (never serve, push or
    /// acknowledge anything that a crash could still take back).
    pub(crate) fn sync(&self, backend: &dyn Backend) -> Result<(), StoreError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Batches being applied right now count: a reader may already see what they wrote.
        let mine = st.taken + u64::from(st.writing);
        loop {
            if st.durable >= mine {
                return Ok(());
            }
            if let Some((upto, msg)) = &st.failed {
                if *upto >= mine {
                    return Err(StoreError::Io(msg.clone()));
                }
            }
            if !st.flushing {
                st.flushing = true;
                // Let batches being applied now join this flush (bounded: a steady stream of
                // writers must not starve the ones already waiting).
                let deadline = Instant::now() + JOIN_WAIT;
                while st.writing > 0 {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    st = self
                        .done
                        .wait_timeout(st, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                let target = st.taken;
                drop(st);
                let result = backend.sync();
                st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.flushing = false;
                st.flushes += 1;
                match result {
                    Ok(()) => st.durable = st.durable.max(target),
                    Err(e) => st.failed = Some((target, e.to_string())),
                }
                self.done.notify_all();
                continue;
            }
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}
