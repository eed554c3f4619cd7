//! Kubernetes events as the kubelet records them (reasons and messages from upstream), sent to
//! a [`Recorder`]: printed by `wasmlet run`, posted to the API server by a node.

use std::sync::Mutex;
use std::time::SystemTime;

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    Warning,
}

/// One event about a pod, or one of its containers (`spec.containers{name}`); or, with no pod
/// named, about the node itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    /// The field path of the container (`spec.initContainers{init}`), empty for the pod.
    pub field_path: String,
    pub kind: Kind,
    pub reason: String,
    pub message: String,
    pub time: SystemTime,
}

impl Event {
    /// An event about the node (image garbage collection, its disks).
    pub fn about_node(kind: Kind, reason: &str, message: &str) -> Event {
        Event {
            namespace: String::new(),
            pod: String::new(),
            uid: String::new(),
            field_path: String::new(),
            kind,
            reason: reason.to_string(),
            message: message.to_string(),
            time: SystemTime::now(),
        }
    }

    pub fn is_about_node(&self) -> bool {
        self.pod.is_empty()
    }
}

/// Where events go.
pub trait Recorder: Send + Sync {
    fn record(&self, event: Event);
}

/// Keeps every event in memory (tests, and `wasmlet run`'s describe output).
#[derive(Default)]
pub struct Memory {
    pub events: Mutex<Vec<Event>>,
}

impl Recorder for Memory {
    fn record(&self, event: Event) {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).push(event);
    }
}

impl Memory {
    pub fn reasons(&self) -> Vec<String> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|e| e.reason.clone()).collect()
    }
}
