/// Everything the runtime can refuse or fail at. The CRI server maps each variant to one gRPC
/// code (see `cri::status`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A sandbox, container or image that does not exist.
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// What was looked for: "pod sandbox", "container", "image".
        kind: &'static str,
        /// The id or name asked for.
        id: String,
    },
    /// A request that cannot be carried out as given.
    #[error("{0}")]
    InvalidArgument(String),
    /// A name that is already taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// A request that is valid but not in the object's current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Something wasmlet does not do (yet); the message says why.
    #[error("{0}")]
    Unimplemented(String),
    /// A deadline (exec timeout) passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The image store refused or failed.
    #[error(transparent)]
    Image(#[from] wasmlet_images::Error),
    /// The same error, handed to every caller of a shared operation (a pull).
    #[error(transparent)]
    Shared(std::sync::Arc<Error>),
    /// A failure of wasmlet itself (I/O on its own state, a broken invariant).
    #[error("{0}")]
    Internal(String),
}

/// Result with the runtime [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn sandbox_not_found(id: &str) -> Error {
        Error::NotFound { kind: "pod sandbox", id: id.to_string() }
    }
    pub(crate) fn container_not_found(id: &str) -> Error {
        Error::NotFound { kind: "container", id: id.to_string() }
    }
}
