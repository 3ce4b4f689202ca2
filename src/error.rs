//! Status codes and the crate's error type. The numeric codes are part of the C ABI and never change.

use std::fmt;

/// Why an operation failed; `code()` is the `pfc_status` the C ABI returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    NullArgument,
    InvalidArgument,
    OutOfMemory,
    Unavailable,
    Device,
    Communication,
    Io,
    Corrupt,
    Incompatible,
    Panic,
    /// The step's loss, gradients or updated centers are NaN or Inf; nothing changed.
    NonFinite,
}

/// Every status, for decoding codes that crossed a process boundary.
const ALL: [Status; 11] = [
    Status::NullArgument,
    Status::InvalidArgument,
    Status::OutOfMemory,
    Status::Unavailable,
    Status::Device,
    Status::Communication,
    Status::Io,
    Status::Corrupt,
    Status::Incompatible,
    Status::Panic,
    Status::NonFinite,
];

impl Status {
    pub fn code(self) -> i32 {
        match self {
            Status::NullArgument => 1,
            Status::InvalidArgument => 2,
            Status::OutOfMemory => 3,
            Status::Unavailable => 4,
            Status::Device => 5,
            Status::Communication => 6,
            Status::Io => 7,
            Status::Corrupt => 8,
            Status::Incompatible => 9,
            Status::Panic => 10,
            Status::NonFinite => 11,
        }
    }

    /// The status with this nonzero code, if any.
    pub fn from_code(code: i32) -> Option<Status> {
        ALL.iter().copied().find(|s| s.code() == code)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub status: Status,
    pub message: String,
}

impl Error {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Error { status, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(Status::InvalidArgument, message)
    }
    /// A step refused because `what` is NaN or Inf (SPEC §2b).
    pub fn non_finite(what: &str) -> Self {
        Error::new(
            Status::NonFinite,
            format!("{what} is NaN or Inf (divergence: lower the learning rate, skip the batch or reload a checkpoint); nothing changed"),
        )
    }
    /// The library broke its own contract (primitives called out of order): a bug, reported as
    /// `PFC_ERR_PANIC` rather than a panic.
    pub fn internal(what: &str) -> Self {
        Error::new(Status::Panic, format!("internal error: {what}"))
    }
    pub fn null(name: &str) -> Self {
        Error::new(Status::NullArgument, format!("{name} is NULL"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Allocates a zeroed vector, reporting exhaustion as `OutOfMemory` instead of aborting the host.
pub fn try_zeroed<T: Clone + Default>(len: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    try_refill(&mut v, len, what)?;
    Ok(v)
}

/// `v` as `len` zeroed values, keeping its allocation where it is large enough; exhaustion is
/// `OutOfMemory`, as with [`try_zeroed`].
pub fn try_refill<'a, T: Clone + Default>(v: &'a mut Vec<T>, len: usize, what: &str) -> Result<&'a mut [T]> {
    v.clear();
    try_reserve(v, len, what)?;
    v.resize(len, T::default());
    Ok(v)
}

/// Room in `v` for `additional` more values, exhaustion being `OutOfMemory` (as with
/// [`try_zeroed`]) rather than an abort.
pub fn try_reserve<T>(v: &mut Vec<T>, additional: usize, what: &str) -> Result<()> {
    v.try_reserve_exact(additional).map_err(|_| {
        Error::new(
            Status::OutOfMemory,
            format!("cannot allocate {what}: {additional} elements of {} bytes", std::mem::size_of::<T>()),
        )
    })
}
