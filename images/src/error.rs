use std::path::PathBuf;

/// Everything that can go wrong in the image store and the compiled-code cache.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No image matches the given id, tag or digest.
    #[error("image {0:?} not found")]
    NotFound(String),
    /// A reference string that cannot be parsed.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    /// Bytes that are not a wasm module or component.
    #[error("{what}: not a wasm module or component: {reason}")]
    NotWasm { what: String, reason: String },
    /// Wasm that fails to validate or compile.
    #[error("{what}: invalid wasm: {reason}")]
    InvalidWasm { what: String, reason: String },
    /// A stored blob whose bytes no longer match its digest.
    #[error("blob {digest}: digest mismatch: stored bytes hash to {actual}")]
    DigestMismatch { digest: String, actual: String },
    /// A registry refused or failed a request.
    #[error("{context}: {reason}")]
    Registry { context: String, reason: String },
    /// Something larger than wasmlet accepts.
    #[error("{what} is larger than the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    /// An image that holds no runnable wasm, or is malformed.
    #[error("{image}: {reason}")]
    BadImage { image: String, reason: String },
    /// The on-disk index cannot be parsed.
    #[error("image index {path}: {reason}")]
    CorruptIndex { path: PathBuf, reason: String },
    /// A filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// Result with the image [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
