//! Descriptors held only to save reopening them, under a process-wide cap.
//!
//! A node may hold 10,000 pods within an open-files limit of 20,000, so a pod cannot keep a
//! descriptor it can reopen by path: its log file and its pinned network namespace. Each is
//! kept open after use (writes and namespace switches stay one syscall), and the oldest opened
//! is closed once more than a budget's cap are open; its next use opens it again.

use std::collections::VecDeque;
use std::sync::{Mutex, Weak};

/// Something holding a descriptor it can reopen.
pub(crate) trait Reopens: Send + Sync {
    /// Closes the descriptor; the next use opens it again.
    fn close_idle(&self);
}

/// At most `cap` reopenable descriptors of one kind open at once.
pub(crate) struct Budget {
    cap: usize,
    /// In the order they were opened (entries of dropped holders count until they come out).
    open: Mutex<VecDeque<Weak<dyn Reopens>>>,
}

/// Containers' log files.
pub(crate) static LOGS: Budget = Budget::new(1024);
/// Pinned network namespaces.
pub(crate) static NAMESPACES: Budget = Budget::new(1024);

impl Budget {
    pub(crate) const fn new(cap: usize) -> Budget {
        Budget { cap, open: Mutex::new(VecDeque::new()) }
    }

    /// `who` has just opened its descriptor: the oldest ones past the cap are closed.
    /// Call without holding `who`'s own lock.
    pub(crate) fn opened(&self, who: Weak<dyn Reopens>) {
        let over: Vec<_> = {
            let mut q = self.open.lock().unwrap_or_else(|e| e.into_inner());
            q.push_back(who);
            let n = q.len().saturating_sub(self.cap.max(1));
            q.drain(..n).collect()
        };
        for holder in over.iter().filter_map(Weak::upgrade) {
            holder.close_idle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Holder(AtomicBool);
    impl Reopens for Holder {
        fn close_idle(&self) {
            self.0.store(false, Ordering::Relaxed);
        }
    }

    #[test]
    fn the_oldest_past_the_cap_are_closed() {
        let budget = Budget::new(2);
        let holders: Vec<Arc<Holder>> = (0..4).map(|_| Arc::new(Holder(AtomicBool::new(true)))).collect();
        let open = |h: &Arc<Holder>| {
            let w: Weak<dyn Reopens> = Arc::downgrade(h) as Weak<dyn Reopens>;
            budget.opened(w)
        };
        let state = || holders.iter().map(|h| h.0.load(Ordering::Relaxed)).collect::<Vec<_>>();
        open(&holders[0]);
        open(&holders[1]);
        assert_eq!(state(), [true, true, true, true], "within the cap nothing closes");
        open(&holders[2]);
        assert_eq!(state(), [false, true, true, true]);
        let gone = Arc::new(Holder(AtomicBool::new(true)));
        open(&gone);
        drop(gone);
        open(&holders[3]);
        assert_eq!(state(), [false, false, false, true]);
        // Reopened: the dropped holder's entry is the one that comes out, nothing is closed.
        holders[0].0.store(true, Ordering::Relaxed);
        open(&holders[0]);
        assert_eq!(state(), [true, false, false, true]);
    }
}
