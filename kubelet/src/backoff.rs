//! Per-key exponential back-off, as the kubelet keeps it for crash loops and image pulls
//! (`flowcontrol.Backoff` with the kubelet's expiry rule): 10 s doubling to 300 s, forgotten
//! once more than 600 s pass between two restarts. Pure: the caller passes the clock.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// The kubelet's initial crash-loop and image-pull back-off.
pub const INITIAL: Duration = Duration::from_secs(10);
/// The cap (`MaxContainerBackOff`, and the image back-off's maximum).
pub const MAX: Duration = Duration::from_secs(300);
/// An entry older than this (twice the cap) when the next event comes is reset.
pub const EXPIRY: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy)]
struct Entry {
    backoff: Duration,
    last_update: SystemTime,
}

/// Back-off state for many keys (`name_ns_uid_container_hash`, or `uid_image`).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    entries: HashMap<String, Entry>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(INITIAL, MAX)
    }
}

fn elapsed(later: SystemTime, earlier: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_default()
}

impl Backoff {
    /// A back-off that starts at `initial` and doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, entries: HashMap::new() }
    }

    fn expired(&self, event: SystemTime, entry: &Entry) -> bool {
        // The kubelet's HasExpiredFunc: 600 s between the event and the last step.
        elapsed(event, entry.last_update) > EXPIRY.max(self.max * 2)
    }

    /// Whether `now` still falls inside the back-off that follows `event` (a container's
    /// `finishedAt`, or a failed pull).
    pub fn in_backoff_since(&self, key: &str, event: SystemTime, now: SystemTime) -> bool {
        let Some(entry) = self.entries.get(key) else { return false };
        if self.expired(event, entry) {
            return false;
        }
        elapsed(now, event) < entry.backoff
    }

    /// Whether `now` is within the back-off that follows the last step (image pulls).
    pub fn in_backoff_since_update(&self, key: &str, now: SystemTime) -> bool {
        self.entries.get(key).is_some_and(|e| elapsed(now, e.last_update) < e.backoff)
    }

    /// Records one more restart (or pull attempt) at `now`: the first sets the initial back-off,
    /// each later one doubles it up to the cap; an expired entry starts over.
    pub fn next(&mut self, key: &str, event: SystemTime, now: SystemTime) {
        let backoff = match self.entries.get(key) {
            Some(e) if !self.expired(event, e) => (e.backoff * 2).min(self.max),
            _ => self.initial,
        };
        self.entries.insert(key.to_string(), Entry { backoff, last_update: now });
    }

    /// The current back-off of `key`, if it has one.
    pub fn get(&self, key: &str) -> Option<Duration> {
        self.entries.get(key).map(|e| e.backoff)
    }

    /// When the back-off that follows `event` ends.
    pub fn ends_at(&self, key: &str, event: SystemTime) -> Option<SystemTime> {
        self.entries.get(key).map(|e| event + e.backoff)
    }

    /// Forgets every key that starts with `prefix` (a pod's keys when it goes away).
    pub fn forget_prefix(&mut self, prefix: &str) {
        self.entries.retain(|k, _| !k.starts_with(prefix));
    }

    /// Drops entries not touched for the expiry period, as the kubelet's GC does.
    pub fn gc(&mut self, now: SystemTime) {
        let keep = EXPIRY.max(self.max * 2);
        self.entries.retain(|_, e| elapsed(now, e.last_update) <= keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn first_exit_restarts_at_once_then_10_20_40_up_to_300() {
        let mut b = Backoff::default();
        let key = "web_default_uid_app_1234";
        // First exit: no entry, so no back-off; the restart records 10 s.
        assert!(!b.in_backoff_since(key, t(0), t(0)));
        b.next(key, t(0), t(0));
        assert_eq!(b.get(key), Some(Duration::from_secs(10)));
        // The next exits wait 10, 20, 40, 80, 160, 300, 300 s.
        let mut now = 0;
        let mut seen = Vec::new();
        for _ in 0..7 {
            now += 1; // the container ran one second
            let finished = t(now);
            let wait = b.get(key).unwrap().as_secs();
            assert!(b.in_backoff_since(key, finished, t(now + wait - 1)), "inside the back-off at {now}");
            assert!(!b.in_backoff_since(key, finished, t(now + wait)), "after the back-off at {now}");
            seen.push(wait);
            now += wait;
            b.next(key, finished, t(now));
        }
        assert_eq!(seen, [10, 20, 40, 80, 160, 300, 300]);
    }

    #[test]
    fn resets_after_ten_minutes_between_restarts() {
        let mut b = Backoff::default();
        let key = "k";
        b.next(key, t(0), t(0));
        b.next(key, t(5), t(15));
        assert_eq!(b.get(key), Some(Duration::from_secs(20)));
        // The container then ran for exactly 600 s: not yet expired.
        assert!(b.in_backoff_since(key, t(615), t(616)));
        // More than 600 s after the last restart: no back-off, and the next one is 10 s again.
        assert!(!b.in_backoff_since(key, t(616), t(616)));
        b.next(key, t(616), t(616));
        assert_eq!(b.get(key), Some(Duration::from_secs(10)));
    }

    #[test]
    fn keys_are_independent_and_forgotten_by_prefix() {
        let mut b = Backoff::default();
        b.next("uid1_a", t(0), t(0));
        b.next("uid1_a", t(0), t(10));
        b.next("uid2_a", t(0), t(0));
        assert_eq!(b.get("uid1_a"), Some(Duration::from_secs(20)));
        assert_eq!(b.get("uid2_a"), Some(Duration::from_secs(10)));
        b.forget_prefix("uid1_");
        assert_eq!(b.get("uid1_a"), None);
        b.gc(t(700));
        assert_eq!(b.get("uid2_a"), None);
    }
}
