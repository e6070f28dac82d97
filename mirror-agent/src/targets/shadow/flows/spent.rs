//! Connections whose later segments count nothing more, remembered for a while: copies of a
//! connection can still come after it ended (a frame the drain held for its chunks), and a
//! connection counted from the middle must not be counted again.
use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

type Key = (SocketAddr, SocketAddr);

/// Why a connection's later segments count nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spent {
    /// It ended or was evicted: only a new handshake opens it again.
    Closed,
    /// First seen in the middle of a message after the ring refused copies: its request is
    /// counted lost to the ring, and a start line may still open it.
    Counted,
}

/// A bounded memory of spent connections: the oldest are forgotten first, and each one a while
/// after it was last touched.
#[derive(Debug)]
pub struct SpentConnections {
    by_key: HashMap<Key, (Spent, Instant)>,
    /// Keys in the order they were touched, with when (older touches of a key are stale).
    order: VecDeque<(Key, Instant)>,
    capacity: usize,
}

/// How often a connection's time is renewed: bounds [`SpentConnections::order`]'s growth.
const TOUCH_EVERY: Duration = Duration::from_secs(1);

impl SpentConnections {
    pub fn new(capacity: usize) -> Self {
        SpentConnections {
            by_key: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn get(&self, key: &Key) -> Option<Spent> {
        self.by_key.get(key).map(|(spent, _)| *spent)
    }

    pub fn remove(&mut self, key: &Key) -> Option<Spent> {
        self.by_key.remove(key).map(|(spent, _)| spent)
    }

    pub fn insert(&mut self, key: Key, spent: Spent, now: Instant) {
        self.by_key.insert(key, (spent, now));
        self.order.push_back((key, now));
        while self.by_key.len() > self.capacity || self.order.len() > 2 * self.capacity {
            self.pop_oldest();
        }
    }

    /// `key` was seen again at `now`: it is kept for longer.
    pub fn touch(&mut self, key: Key, now: Instant) {
        if let Some(&(spent, at)) = self.by_key.get(&key)
            && now.duration_since(at) >= TOUCH_EVERY
        {
            self.insert(key, spent, now);
        }
    }

    /// Forgets the connections not touched within `ttl` of `now`.
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        while self
            .order
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) > ttl)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((key, at)) = self.order.pop_front()
            && self.by_key.get(&key).is_some_and(|(_, last)| *last == at)
        {
            self.by_key.remove(&key);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_is_bounded_and_forgets_untouched_connections() {
        let key = |port: u16| {
            (
                SocketAddr::from(([10, 0, 0, 1], port)),
                SocketAddr::from(([10, 0, 0, 2], 80)),
            )
        };
        let start = Instant::now();
        let mut spent = SpentConnections::new(3);
        for port in 1..=4 {
            spent.insert(key(port), Spent::Closed, start);
        }
        // Past its capacity, the oldest is forgotten.
        assert_eq!((spent.len(), spent.get(&key(1))), (3, None));
        spent.insert(key(2), Spent::Counted, start + Duration::from_secs(1));
        spent.touch(key(3), start + Duration::from_secs(5));
        spent.expire(start + Duration::from_secs(6), Duration::from_secs(2));
        // 2 was replaced at 1 s and 4 never touched: both older than 2 s; 3 was touched at 5 s.
        assert_eq!(
            [2, 3, 4].map(|p| spent.get(&key(p))),
            [None, Some(Spent::Closed), None]
        );
        assert_eq!(spent.remove(&key(3)), Some(Spent::Closed));
        assert_eq!(spent.len(), 0);
    }
}
