//! Image garbage collection as the kubelet's image manager does it: every [`PERIOD`], when the
//! image filesystem is used to imageGCHighThresholdPercent or more, unused images are removed,
//! least recently used first, until it is down to imageGCLowThresholdPercent; images unused
//! for imageMaximumGCAge go whatever the disk. An image is in use while any container the
//! runtime knows (running or not) was made from it; images younger than imageMinimumGCAge
//! (since first seen) and pinned ones stay. The eviction manager asks for every unused image
//! to go ([`ImageGc::delete_unused`]) before it evicts pods for disk pressure.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cri::Runtime;
use crate::events::{self, Kind, Recorder};

/// How often the collector looks (the kubelet's ImageGCPeriod).
pub const PERIOD: Duration = Duration::from_secs(300);

/// The settings (KubeletConfiguration's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// imageGCHighThresholdPercent: 100 turns collection by disk use off.
    pub high_percent: u8,
    pub low_percent: u8,
    pub min_age: Duration,
    /// imageMaximumGCAge: zero is off.
    pub max_age: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy { high_percent: 85, low_percent: 80, min_age: Duration::from_secs(120), max_age: Duration::ZERO }
    }
}

/// One image as the runtime lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub id: String,
    pub size: u64,
    pub pinned: bool,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    first_detected: Instant,
    last_used: Instant,
    size: u64,
    pinned: bool,
}

/// What the collector remembers of each image: when it was first seen and last in use.
#[derive(Debug, Default)]
pub struct Records {
    images: HashMap<String, Record>,
}

impl Records {
    /// Takes in the runtime's images and those its containers use, at `now`. Images gone from
    /// the runtime are forgotten.
    pub fn detect(&mut self, images: &[Image], in_use: &HashSet<String>, now: Instant) {
        let listed: HashSet<&str> = images.iter().map(|i| i.id.as_str()).collect();
        self.images.retain(|id, _| listed.contains(id.as_str()));
        for i in images {
            let r = self.images.entry(i.id.clone()).or_insert(Record {
                first_detected: now,
                last_used: now,
                size: i.size,
                pinned: i.pinned,
            });
            (r.size, r.pinned) = (i.size, i.pinned);
            if in_use.contains(&i.id) {
                r.last_used = now;
            }
        }
    }

    /// The images to remove to free `bytes`, in the order to remove them: unused, unpinned,
    /// seen at least `min_age` ago, least recently used first (then first seen first).
    pub fn choose(&self, bytes: u64, in_use: &HashSet<String>, min_age: Duration, now: Instant) -> Vec<(String, u64)> {
        let mut candidates: Vec<(&String, &Record)> = self
            .images
            .iter()
            .filter(|(id, r)| !in_use.contains(*id) && !r.pinned && now.duration_since(r.first_detected) >= min_age)
            .collect();
        candidates.sort_by_key(|(id, r)| (r.last_used, r.first_detected, (*id).clone()));
        let mut freed = 0;
        let mut out = Vec::new();
        for (id, r) in candidates {
            if freed >= bytes {
                break;
            }
            freed += r.size;
            out.push((id.clone(), r.size));
        }
        out
    }

    /// Unused images not used for longer than `max_age` (none when it is zero).
    pub fn too_old(&self, in_use: &HashSet<String>, max_age: Duration, now: Instant) -> Vec<(String, u64)> {
        if max_age.is_zero() {
            return Vec::new();
        }
        let mut out: Vec<(String, u64)> = self
            .images
            .iter()
            .filter(|(id, r)| !in_use.contains(*id) && !r.pinned && now.duration_since(r.last_used) > max_age)
            .map(|(id, r)| (id.clone(), r.size))
            .collect();
        out.sort();
        out
    }

    fn forget(&mut self, id: &str) {
        self.images.remove(id);
    }
}

/// Bytes to free on a filesystem of `capacity` with `available` left: enough to come down to
/// the low threshold, once use reached the high one; None below it.
pub fn to_free(policy: &Policy, capacity: u64, available: u64) -> Option<u64> {
    if capacity == 0 || policy.high_percent >= 100 {
        return None;
    }
    let used_percent = 100 - available.min(capacity) * 100 / capacity;
    (used_percent >= u64::from(policy.high_percent))
        .then(|| (capacity * (100 - u64::from(policy.low_percent)) / 100).saturating_sub(available))
}

/// The collector: its records, and the runtime it lists and removes images through.
pub struct ImageGc {
    policy: Policy,
    runtime: Runtime,
    /// The image store's directory: its filesystem is the imagefs.
    image_root: PathBuf,
    recorder: Arc<dyn Recorder>,
    /// When the collector started: imageMaximumGCAge counts from no earlier.
    began: Instant,
    records: tokio::sync::Mutex<Records>,
}

impl ImageGc {
    pub fn new(policy: Policy, runtime: Runtime, image_root: PathBuf, recorder: Arc<dyn Recorder>) -> ImageGc {
        ImageGc { policy, runtime, image_root, recorder, began: Instant::now(), records: Default::default() }
    }

    /// Lists the images and the images in use, and brings the records up to date.
    async fn detect(&self, records: &mut Records) -> Result<HashSet<String>, tonic::Status> {
        let images = self.runtime.images().await?;
        let in_use = self.runtime.images_in_use().await?;
        records.detect(&images, &in_use, Instant::now());
        Ok(in_use)
    }

    /// Removes `images`; returns the bytes freed, and the first failure.
    async fn remove(&self, records: &mut Records, images: Vec<(String, u64)>, why: &str) -> (u64, Option<String>) {
        let mut freed = 0;
        let mut failed = None;
        for (id, size) in images {
            match self.runtime.remove_image(&id).await {
                Ok(()) => {
                    tracing::info!(image = %id, size, reason = why, "image garbage collected");
                    records.forget(&id);
                    freed += size;
                }
                Err(e) => {
                    tracing::warn!(image = %id, error = %e.message(), "image garbage collection: removal failed");
                    failed.get_or_insert_with(|| format!("failed to remove image {id}: {}", e.message()));
                }
            }
        }
        (freed, failed)
    }

    /// One round: images past imageMaximumGCAge, then space down to the low threshold.
    pub async fn garbage_collect(&self) -> Result<u64, String> {
        let mut records = self.records.lock().await;
        let in_use = self.detect(&mut records).await.map_err(|e| e.message().to_string())?;
        let now = Instant::now();
        let mut freed = 0;
        if now.duration_since(self.began) > self.policy.max_age {
            let old = records.too_old(&in_use, self.policy.max_age, now);
            freed += self.remove(&mut records, old, "age").await.0;
        }
        let Some((capacity, available)) =
            crate::eviction::filesystem(&self.image_root).map(|(b, _)| (b.capacity, b.available))
        else {
            return Ok(freed);
        };
        if capacity == 0 {
            let msg = "invalid capacity 0 on image filesystem".to_string();
            self.node_event("InvalidDiskCapacity", &msg);
            return Err(msg);
        }
        let Some(want) = to_free(&self.policy, capacity, available) else { return Ok(freed) };
        tracing::info!(
            want,
            high = self.policy.high_percent,
            low = self.policy.low_percent,
            "disk usage on the image filesystem is over the high threshold, freeing down to the low one"
        );
        let chosen = records.choose(want, &in_use, self.policy.min_age, now);
        let (got, failed) = self.remove(&mut records, chosen, "space").await;
        freed += got;
        if let Some(e) = failed {
            return Err(e);
        }
        if got < want {
            let msg = format!(
                "Failed to garbage collect required amount of images. Attempted to free {want} bytes, but only found {got} bytes eligible to free."
            );
            self.node_event("FreeDiskSpaceFailed", &msg);
            return Err(msg);
        }
        Ok(freed)
    }

    /// Every unused image that may go (the eviction manager's reclaim before it evicts for
    /// disk pressure); returns the bytes freed.
    pub async fn delete_unused(&self) -> u64 {
        let mut records = self.records.lock().await;
        let Ok(in_use) = self.detect(&mut records).await else { return 0 };
        let chosen = records.choose(u64::MAX, &in_use, self.policy.min_age, Instant::now());
        self.remove(&mut records, chosen, "disk pressure").await.0
    }

    fn node_event(&self, reason: &str, message: &str) {
        self.recorder.record(events::Event::about_node(Kind::Warning, reason, message));
    }
}

/// Collects every [`PERIOD`] (the first round at once), as the kubelet's loop does; a failed
/// round is an ImageGCFailed event once failures repeat.
pub async fn run(gc: Arc<ImageGc>) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed_before = false;
    loop {
        tick.tick().await;
        match gc.garbage_collect().await {
            Ok(_) => failed_before = false,
            Err(e) => {
                tracing::warn!(error = %e, "image garbage collection failed");
                if failed_before {
                    gc.node_event("ImageGCFailed", &e);
                }
                failed_before = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, size: u64) -> Image {
        Image { id: id.into(), size, pinned: false }
    }

    #[test]
    fn unused_old_enough_images_go_least_recently_used_first() {
        let t0 = Instant::now();
        let min_age = Duration::from_secs(120);
        let mut r = Records::default();
        let all = [image("a", 100), image("b", 200), image("c", 300), Image { pinned: true, ..image("p", 50) }];
        let used = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
        r.detect(&all, &used(&["a", "b", "c"]), t0);
        // Too young to go, whatever the need.
        assert!(r.choose(u64::MAX, &used(&[]), min_age, t0 + Duration::from_secs(60)).is_empty());
        // b was used last at t0 + 200 s, a and c at t0: a and c go before b, c before b.
        r.detect(&all, &used(&["b"]), t0 + Duration::from_secs(200));
        let later = t0 + Duration::from_secs(300);
        let ids = |v: Vec<(String, u64)>| v.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
        assert_eq!(ids(r.choose(u64::MAX, &used(&[]), min_age, later)), ["a", "c", "b"], "pinned p stays");
        // Only what is needed: 100 bytes are a.
        assert_eq!(ids(r.choose(100, &used(&[]), min_age, later)), ["a"]);
        assert_eq!(ids(r.choose(101, &used(&[]), min_age, later)), ["a", "c"]);
        // In use now: never.
        assert_eq!(ids(r.choose(u64::MAX, &used(&["a"]), min_age, later)), ["c", "b"]);
        // Gone from the runtime: forgotten.
        r.detect(&[image("b", 200)], &used(&[]), later);
        assert_eq!(ids(r.choose(u64::MAX, &used(&[]), min_age, later)), ["b"]);
    }

    #[test]
    fn maximum_age_and_thresholds() {
        let t0 = Instant::now();
        let mut r = Records::default();
        r.detect(&[image("a", 1), image("b", 1)], &HashSet::from(["a".to_string()]), t0);
        r.detect(&[image("a", 1), image("b", 1)], &HashSet::from(["b".to_string()]), t0 + Duration::from_secs(50));
        let none = HashSet::new();
        let at = t0 + Duration::from_secs(100);
        assert!(r.too_old(&none, Duration::ZERO, at).is_empty(), "zero is off");
        assert_eq!(r.too_old(&none, Duration::from_secs(60), at), [("a".to_string(), 1)]);
        let p = Policy::default();
        // 85% used of 1000: free down to 80%, that is to 200 available.
        assert_eq!(to_free(&p, 1000, 150), Some(50));
        // Use is counted as the kubelet counts it, in whole percent of what is available
        // (84.9% used is 85).
        assert_eq!(to_free(&p, 1000, 151), Some(49));
        assert_eq!(to_free(&p, 1000, 160), None);
        assert_eq!(to_free(&Policy { high_percent: 100, ..p }, 1000, 0), None, "100 is off");
        assert_eq!(to_free(&p, 0, 0), None);
    }

    #[tokio::test]
    async fn a_full_image_filesystem_loses_its_unused_images_and_says_what_it_could_not_free() {
        use crate::cri::RuntimeClient;
        let fake = crate::fake::FakeRuntime::new();
        for i in ["used", "spare", "other"] {
            fake.add_image(i);
        }
        let sandbox = fake.run_sandbox(cri_proto::v1::PodSandboxConfig::default()).await.unwrap();
        let config = cri_proto::v1::ContainerConfig {
            image: Some(cri_proto::v1::ImageSpec { image: "used".into(), ..Default::default() }),
            ..Default::default()
        };
        fake.create_container(&sandbox, config, Default::default()).await.unwrap();
        let recorder = Arc::new(crate::events::Memory::default());
        // Any used disk is over a 1% threshold, and nothing brings it to 0%.
        let policy = Policy { high_percent: 1, low_percent: 0, min_age: Duration::ZERO, max_age: Duration::ZERO };
        let dir = tempfile::tempdir().unwrap();
        let gc = ImageGc::new(policy, fake.clone(), dir.path().to_path_buf(), recorder.clone());
        let err = gc.garbage_collect().await.unwrap_err();
        assert!(err.starts_with("Failed to garbage collect required amount of images. Attempted to free "), "{err}");
        assert!(err.ends_with(", but only found 2000 bytes eligible to free."), "{err}");
        let left: Vec<String> = fake.images().await.unwrap().into_iter().map(|i| i.id).collect();
        assert_eq!(left, ["used"], "the image in use stays");
        assert_eq!(recorder.reasons(), ["FreeDiskSpaceFailed"]);
        assert!(recorder.events.lock().unwrap()[0].is_about_node());
        // Nothing unused is left for the eviction manager's reclaim.
        assert_eq!(gc.delete_unused().await, 0);
        // With a young image and the default minimum age, nothing goes.
        fake.add_image("new");
        let gc = ImageGc::new(
            Policy { min_age: Duration::from_secs(120), ..policy },
            fake.clone(),
            dir.path().into(),
            recorder,
        );
        assert_eq!(gc.delete_unused().await, 0);
        assert_eq!(fake.images().await.unwrap().len(), 2);
    }
}
