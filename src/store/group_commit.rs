//! Group commit: many writers, one flush. A writer that needs durability takes a ticket; if no
//! flush is running it runs one that covers every ticket taken so far, otherwise it waits for a
//! flush that covers its own. Nobody returns before a flush that started after their write.

use std::sync::{Condvar, Mutex};

use super::Backend;
use super::StoreError;

#[derive(Default)]
pub(crate) struct GroupCommit {
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Default)]
struct State {
    /// Tickets handed out.
    taken: u64,
    /// Every ticket up to this one is durable.
    durable: u64,
    flushing: bool,
    /// The last failed flush: tickets up to it failed with this message.
    failed: Option<(u64, String)>,
    /// Flushes run (for metrics and benchmarks: tickets / flushes is the batching factor).
    flushes: u64,
}

impl GroupCommit {
    /// (tickets taken, flushes run).
    pub(crate) fn counts(&self) -> (u64, u64) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (st.taken, st.flushes)
    }

    pub(crate) fn sync(&self, backend: &dyn Backend) -> Result<(), StoreError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.taken += 1;
        let mine = st.taken;
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
