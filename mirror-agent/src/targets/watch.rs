//! Watch targets and live captures (`mirror-agent capture`): watchers of a session's copies. A
//! watch target's copies go to its watchers alone (an ad-hoc capture's session); any other
//! session's copies go to its watchers besides its target while someone watches it. The ring drain offers
//! each copy of a watched session to its watchers, each through a bounded queue of its own: a
//! watcher that does not keep up loses copies (counted), and neither the drain nor the datapath
//! ever waits for it. With no watcher, the drain checks one atomic per copy and the datapath
//! nothing more (the session's `watched` flag is off).
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Which copies a watcher takes (its filter expression, read in userspace), from their frames.
pub type Selector = Box<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// Watchers at once, across sessions.
pub const MAX_WATCHERS: usize = 8;
/// Copies a watcher may have waiting; more are lost (counted).
pub const QUEUE_COPIES: usize = 4096;

/// A copy for a watcher.
#[derive(Debug)]
pub struct Watched {
    /// The interface and hook, as a key (ifindex and direction) and as words.
    pub interface: u64,
    pub interface_name: Arc<str>,
    pub timestamp: Duration,
    pub orig_len: u32,
    pub frame: Vec<u8>,
}

/// One watcher: its session, its queue and what it got and lost.
pub struct Watcher {
    pub id: u64,
    pub session: String,
    /// Only the copies this selects (a tcpdump expression, read in userspace).
    filter: Option<Selector>,
    filter_text: Option<String>,
    queue: mpsc::Sender<Watched>,
    sent: AtomicU64,
    lost: AtomicU64,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("id", &self.id)
            .field("session", &self.session)
            .field("filter", &self.filter_text)
            .finish_non_exhaustive()
    }
}

/// What `/status` shows of a watcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatcherView {
    pub session: String,
    /// The watcher's filter expression, if it has one.
    #[serde(default)]
    pub filter: Option<String>,
    /// Copies queued for it.
    pub copies: u64,
    /// Copies lost because its queue was full (it did not read fast enough).
    pub lost: u64,
}

/// The watchers of every session, shared by the API (which adds and removes them) and the ring
/// drain (which feeds them).
#[derive(Debug, Default)]
pub struct Watchers {
    list: Mutex<Vec<Arc<Watcher>>>,
    /// `list.len()`, read by the drain without the lock.
    active: AtomicUsize,
    next_id: AtomicU64,
    /// Ad-hoc captures named so far.
    ad_hoc: AtomicU64,
}

/// Already [`MAX_WATCHERS`] watchers.
#[derive(Debug, thiserror::Error)]
#[error("{MAX_WATCHERS} captures are running already: stop one first")]
pub struct TooMany;

impl Watchers {
    /// A new watcher of `session` (of the copies `filter` selects, written as its text), and
    /// where its copies arrive.
    pub fn add(
        &self,
        session: &str,
        filter: Option<(String, Selector)>,
    ) -> Result<(Arc<Watcher>, mpsc::Receiver<Watched>), TooMany> {
        let mut list = self.lock();
        if list.len() >= MAX_WATCHERS {
            return Err(TooMany);
        }
        let (queue, copies) = mpsc::channel(QUEUE_COPIES);
        let watcher = Arc::new(Watcher {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            session: session.to_owned(),
            filter_text: filter.as_ref().map(|(text, _)| text.clone()),
            filter: filter.map(|(_, filter)| filter),
            queue,
            sent: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        });
        list.push(watcher.clone());
        self.active.store(list.len(), Ordering::Release);
        Ok((watcher, copies))
    }

    /// A new name for an ad-hoc capture's session.
    pub fn ad_hoc_name(&self) -> String {
        format!(
            "capture-{}",
            self.ad_hoc.fetch_add(1, Ordering::Relaxed) + 1
        )
    }

    /// Removes the watcher `id`; whether it was there.
    pub fn remove(&self, id: u64) -> bool {
        let mut list = self.lock();
        let before = list.len();
        list.retain(|w| w.id != id);
        self.active.store(list.len(), Ordering::Release);
        list.len() != before
    }

    /// Whether anyone watches `session`.
    pub fn watches(&self, session: &str) -> bool {
        self.active.load(Ordering::Acquire) != 0 && self.lock().iter().any(|w| w.session == session)
    }

    /// Hands a copy of `session`, of `frame`, to each of its watchers whose filter selects it
    /// (made by `copy` only then); a full queue loses it. Returns how many watchers lost it.
    pub fn offer(&self, session: &str, frame: &[u8], mut copy: impl FnMut() -> Watched) -> u64 {
        if self.active.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let mut lost = 0;
        for watcher in self.lock().iter().filter(|w| w.session == session) {
            if watcher
                .filter
                .as_ref()
                .is_some_and(|selects| !selects(frame))
            {
                continue;
            }
            if watcher.queue.try_send(copy()).is_ok() {
                watcher.sent.fetch_add(1, Ordering::Relaxed);
            } else {
                watcher.lost.fetch_add(1, Ordering::Relaxed);
                lost += 1;
            }
        }
        lost
    }

    pub fn views(&self) -> Vec<WatcherView> {
        self.lock()
            .iter()
            .map(|w| WatcherView {
                session: w.session.clone(),
                filter: w.filter_text.clone(),
                copies: w.sent.load(Ordering::Relaxed),
                lost: w.lost.load(Ordering::Relaxed),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Watcher>>> {
        self.list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Watcher {
    /// (copies queued, copies lost) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy() -> Watched {
        Watched {
            interface: 1,
            interface_name: "eth0 ingress".into(),
            timestamp: Duration::ZERO,
            orig_len: 60,
            frame: vec![0; 60],
        }
    }

    #[test]
    fn a_watcher_that_does_not_read_loses_copies_and_holds_nobody_up() {
        let watchers = Watchers::default();
        let (slow, _unread) = watchers.add("a", None).expect("room");
        let (other, mut read) = watchers.add("b", None).expect("room");
        let mut lost = 0;
        for _ in 0..QUEUE_COPIES + 10 {
            lost += watchers.offer("a", &[], copy);
            lost += watchers.offer("b", &[], copy);
            while read.try_recv().is_ok() {}
        }
        assert_eq!(slow.counts(), (QUEUE_COPIES as u64, 10));
        assert_eq!(lost, 10, "the losses the drain counts for the session");
        assert_eq!(other.counts(), (QUEUE_COPIES as u64 + 10, 0));
        assert!(watchers.watches("a") && !watchers.watches("c"));
        assert!(watchers.remove(slow.id) && !watchers.remove(slow.id));
        assert!(!watchers.watches("a"));
    }

    #[test]
    fn watchers_are_bounded() {
        let watchers = Watchers::default();
        let added: Vec<_> = (0..MAX_WATCHERS)
            .map(|_| watchers.add("a", None).expect("room"))
            .collect();
        assert!(watchers.add("a", None).is_err());
        watchers.remove(added[0].0.id);
        assert!(watchers.add("a", None).is_ok());
    }
}
