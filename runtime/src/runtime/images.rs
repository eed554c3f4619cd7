//! Images as the runtime uses them: pulls shared by reference and compiled ahead of the
//! first start; compiled code found and forgotten.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use wasmlet_images::{Auth, ImageRecord, Reference};

use crate::engine::Program;
use crate::{Error, Result};

use super::Runtime;

impl Runtime {
    pub(super) fn find_image(&self, image: &str) -> Result<ImageRecord> {
        if image.is_empty() {
            return Err(Error::InvalidArgument("container config names no image".to_string()));
        }
        self.inner.images.resolve(image)?.ok_or_else(|| Error::NotFound { kind: "image", id: image.to_string() })
    }

    pub(super) fn program_for(&self, image: &ImageRecord) -> Result<Program> {
        let what = image.repo_tags.first().unwrap_or(&image.id);
        self.inner
            .engine
            .program(what, &image.wasm_digest, image.kind, || self.inner.images.read_blob(&image.wasm_digest))
    }

    /// Pulls `image` from its registry into the store and compiles it, so that the first
    /// container start does not. Concurrent pulls of one reference share one download; a pull
    /// that does not finish within `deadline` stores nothing and fails with DeadlineExceeded.
    pub async fn pull_image(&self, image: &str, auth: Auth, deadline: Option<Duration>) -> Result<ImageRecord> {
        let reference = Reference::parse(image)?;
        let key = reference.to_string();
        let (mut rx, leader) = {
            let mut pulls = self.inner.pulls.lock().unwrap_or_else(|e| e.into_inner());
            match pulls.get(&key) {
                Some(rx) => (rx.clone(), None),
                None => {
                    let (tx, rx) = watch::channel(None);
                    pulls.insert(key.clone(), rx.clone());
                    (rx, Some(tx))
                }
            }
        };
        if let Some(tx) = leader {
            // The pull runs on its own: a caller that goes away does not cancel it for others.
            let rt = self.clone();
            tokio::spawn(async move {
                let work = rt.pull_and_compile(reference, auth);
                let result = match deadline {
                    Some(d) => tokio::time::timeout(d, work)
                        .await
                        .unwrap_or_else(|_| Err(Error::DeadlineExceeded(format!("pull {key}: not done within {d:?}")))),
                    None => work.await,
                };
                rt.inner.pulls.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                let _ = tx.send(Some(result.map_err(Arc::new)));
            });
        }
        let done = rx.wait_for(Option::is_some).await.map_err(|_| Error::Internal("pull task ended".into()))?;
        match done.as_ref().expect("waited for Some") {
            Ok(record) => Ok(record.clone()),
            Err(e) => Err(Error::Shared(e.clone())),
        }
    }

    pub(super) async fn pull_and_compile(&self, reference: Reference, auth: Auth) -> Result<ImageRecord> {
        let endpoints = self.inner.options.registries.endpoints(&reference.registry);
        let known: std::collections::HashSet<String> = self.inner.images.list()?.into_iter().map(|i| i.id).collect();
        let image = reference.to_string();
        let progress: wasmlet_images::Observer = Arc::new(move |p| {
            if p.finished {
                let what = p.what;
                tracing::info!(image, what, blob = p.digest, bytes = p.done, skipped = p.skipped, "blob ready");
            } else {
                tracing::debug!(image, what = p.what, blob = p.digest, done = p.done, total = ?p.total, "downloading");
            }
        });
        let record =
            wasmlet_images::pull_from(&self.inner.images, &endpoints, &auth, &reference, Some(progress)).await?;
        let rt = self.clone();
        let image = record.clone();
        let compiled = tokio::task::spawn_blocking(move || rt.program_for(&image))
            .await
            .map_err(|e| Error::Internal(format!("compile task: {e}")))?;
        if let Err(e) = compiled {
            // Wasm that does not compile is not kept: the store is left as it was.
            if !known.contains(&record.id) {
                let _ = self.inner.images.remove(&record.id);
            }
            return Err(e);
        }
        Ok(record)
    }

    /// Drops compiled code for an image's wasm once no container uses it.
    pub fn forget_wasm(&self, wasm_digest: &str) {
        let in_use = self.state().containers.values().any(|e| e.record.wasm_digest == wasm_digest);
        if !in_use {
            self.inner.engine.forget(wasm_digest);
        }
    }
}
