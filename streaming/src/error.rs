use thiserror::Error;

/// What can go wrong while streaming.
#[derive(Debug, Error)]
pub enum Error {
    /// The peer broke the protocol (a bad frame, header block or message).
    #[error("{0}")]
    Protocol(String),
    /// The connection is gone.
    #[error("the streaming connection is closed")]
    Closed,
    /// Too many requests wait for their client (the kubelet's MaxInFlight).
    #[error("maximum number of in-flight streaming requests ({0}) exceeded")]
    TooManyRequests(usize),
    /// A request the server cannot take.
    #[error("{0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
