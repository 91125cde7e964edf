//! The one error type of depro, and the exit code each kind maps to.
//!
//! Every message names its subject (the file and line, the flag, the Consul
//! key, the node) and, where there is one, says what to do next. Messages are
//! printed once, as one line, by `main`. No message ever contains an ACL
//! token: the `consul` module never puts one in a URL or an error.

use std::fmt;

/// Exit codes besides 0 (success), documented in depro(1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExitCode {
    /// Bad usage or configuration.
    Usage = 1,
    /// A node failed, or the operation was refused.
    Refused = 2,
    Timeout = 3,
    /// Consul unreachable, or it denied the request (ACL).
    Consul = 4,
    /// Another operator changed `current` first.
    LostRace = 5,
}

#[derive(Debug)]
pub(crate) enum Error {
    /// Bad flags or arguments: exit 1.
    Usage(String),
    /// A bad config file, environment variable or setting: exit 1.
    Config(String),
    /// A local file or directory could not be read or written: exit 1.
    Io {
        path: String,
        doing: &'static str,
        source: std::io::Error,
    },
    /// Consul could not be reached, answered with an error, or denied: exit 4.
    Consul(Box<crate::consul::ConsulError>),
    /// A node failed, or the operation is refused: exit 2.
    Refused(String),
    /// Waited too long: exit 3.
    Timeout(String),
    /// Someone else moved `current` first: exit 5.
    LostRace(String),
}

impl Error {
    pub(crate) fn exit_code(&self) -> ExitCode {
        match self {
            Error::Usage(_) | Error::Config(_) | Error::Io { .. } => ExitCode::Usage,
            Error::Consul(_) => ExitCode::Consul,
            Error::Refused(_) => ExitCode::Refused,
            Error::Timeout(_) => ExitCode::Timeout,
            Error::LostRace(_) => ExitCode::LostRace,
        }
    }

    pub(crate) fn io(
        path: impl AsRef<std::path::Path>,
        doing: &'static str,
        source: std::io::Error,
    ) -> Error {
        Error::Io {
            path: path.as_ref().display().to_string(),
            doing,
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(msg) | Error::Config(msg) | Error::Refused(msg) => f.write_str(msg),
            Error::Timeout(msg) | Error::LostRace(msg) => f.write_str(msg),
            Error::Io {
                path,
                doing,
                source,
            } => write!(f, "{path}: {doing}: {source}"),
            Error::Consul(err) => err.fmt(f),
        }
    }
}

impl From<crate::consul::ConsulError> for Error {
    fn from(err: crate::consul::ConsulError) -> Error {
        Error::Consul(Box::new(err))
    }
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_type_stays_small() {
        assert!(
            std::mem::size_of::<Error>() <= 64,
            "{}",
            std::mem::size_of::<Error>()
        );
    }

    #[test]
    fn each_kind_has_its_documented_exit_code() {
        assert_eq!(Error::Usage("x".into()).exit_code() as i32, 1);
        assert_eq!(Error::Refused("x".into()).exit_code() as i32, 2);
        assert_eq!(Error::Timeout("x".into()).exit_code() as i32, 3);
        assert_eq!(Error::LostRace("x".into()).exit_code() as i32, 5);
    }
}
