//! The wall clock the pod workers read (event times, back-off, deadlines, status times).
//!
//! In unit tests it follows tokio's clock from the moment it is first read, so tests on a
//! paused clock (`tokio::time::pause`, `start_paused`) see back-offs and grace periods pass
//! in no time, with wall time and timers in step.

use std::time::SystemTime;

#[cfg(not(test))]
pub fn now() -> SystemTime {
    SystemTime::now()
}

#[cfg(test)]
pub fn now() -> SystemTime {
    use std::sync::OnceLock;
    static BASE: OnceLock<(SystemTime, std::time::Instant)> = OnceLock::new();
    let (wall, mono) = *BASE.get_or_init(|| (SystemTime::now(), std::time::Instant::now()));
    wall + tokio::time::Instant::now().into_std().saturating_duration_since(mono)
}
