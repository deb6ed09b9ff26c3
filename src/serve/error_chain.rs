// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Logging an error with its causes: messages do not repeat their `#[source]`, so a log line
//! that showed only the outer message would lose the reason.

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its sources, `outer: cause: root cause`.
pub(crate) struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::StateFileError;

    #[test]
    fn every_cause_is_shown_once() {
        let e = StateFileError::Write {
            path: "disk.state".into(),
            source: std::io::Error::other("disk full"),
        };
        assert_eq!(
            Chain(&e).to_string(),
            "cannot write state file disk.state: disk full"
        );
    }
}
