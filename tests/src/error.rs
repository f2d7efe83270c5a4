//! Why a wait or an action on QEMU failed.

use std::fmt;
use std::io;
use std::time::Duration;

/// Why a wait or an action on QEMU failed.
pub enum Error {
    /// QEMU could not be started.
    Spawn(io::Error),
    /// Writing to QEMU's stdin (the guest console) failed.
    Send(io::Error),
    /// The awaited thing did not happen in time.
    Timeout {
        /// What was awaited.
        what: String,
        /// How long it was awaited.
        waited: Duration,
    },
    /// The run's wall-clock limit passed: QEMU was killed.
    WallClock {
        /// What was awaited when it happened.
        what: String,
        /// The limit.
        limit: Duration,
    },
    /// QEMU exited (and its output ended) before the awaited thing happened.
    Exited {
        /// What was awaited.
        what: String,
        /// QEMU's exit status.
        status: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Spawn(e) => write!(f, "could not start qemu/board-virt.sh: {e}"),
            Error::Send(e) => write!(f, "could not type into the guest console: {e}"),
            Error::Timeout { what, waited } => {
                write!(
                    f,
                    "timed out after {:.1} s waiting for {what}",
                    waited.as_secs_f64()
                )
            }
            Error::WallClock { what, limit } => write!(
                f,
                "wall-clock limit of {} s reached (QEMU killed) while waiting for {what}",
                limit.as_secs()
            ),
            Error::Exited { what, status } => {
                write!(f, "QEMU exited ({status}) while waiting for {what}")
            }
        }
    }
}

// `Debug` as `Display`: a test returning `Err` shows a readable message.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Error {}
