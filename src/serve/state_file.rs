// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device state a restarted daemon must give back to the same guest: the write-cache
//! setting the guest chose. Frontends send it once (SET_CONFIG, when the guest changes it) and
//! never again, not even after reconnecting, so it is kept in a small file beside the disk.
//!
//! The file is TOML (`write-cache = false`), replaced atomically (temporary file, fsync,
//! rename, fsync of the directory), so a crash leaves the old or the new setting, never a
//! torn one.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("cannot read state file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "state file {path} is damaged ({reason}); it holds the guest's write-cache setting: \
         fix it (`write-cache = true` or `false`) or remove it to start with the write cache on"
    )]
    Damaged { path: PathBuf, reason: String },
    #[error("cannot write state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where the device state lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateFile {
    path: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct State {
    write_cache: bool,
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> StateFile {
        StateFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored write-cache setting; `None` when nothing was stored yet.
    pub fn write_cache(&self) -> Result<Option<bool>, StateFileError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateFileError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let state: State = toml::from_str(&text).map_err(|e| StateFileError::Damaged {
            path: self.path.clone(),
            reason: e.message().to_string(),
        })?;
        Ok(Some(state.write_cache))
    }

    /// Stores the write-cache setting durably before returning.
    pub fn store_write_cache(&self, write_cache: bool) -> Result<(), StateFileError> {
        let text = toml::to_string(&State { write_cache }).map_err(|e| StateFileError::Write {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        self.replace(text.as_bytes())
            .map_err(|source| StateFileError::Write {
                path: self.path.clone(),
                source,
            })
    }

    fn replace(&self, bytes: &[u8]) -> io::Result<()> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = self
            .path
            .file_name()
            .ok_or_else(|| io::Error::other("the state file path names no file"))?;
        let mut tmp_name = name.to_os_string();
        tmp_name.push(".tmp");
        let tmp = dir.join(tmp_name);
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, &self.path)?;
        File::open(dir)?.sync_all()
    }
}

/// The guest's write-cache choice: what the device uses whenever the frontend negotiated
/// FLUSH and CONFIG_WCE (the guest can change it), kept across connections and, with a state
/// file, across restarts.
#[derive(Debug)]
pub struct WriteCacheChoice {
    chosen: AtomicBool,
    file: Option<StateFile>,
}

impl WriteCacheChoice {
    /// The stored choice, or write-back (virtio's default) when none was stored.
    pub fn load(file: Option<StateFile>) -> Result<WriteCacheChoice, StateFileError> {
        let stored = match &file {
            Some(f) => f.write_cache()?,
            None => None,
        };
        Ok(WriteCacheChoice {
            chosen: AtomicBool::new(stored.unwrap_or(true)),
            file,
        })
    }

    pub fn chosen(&self) -> bool {
        self.chosen.load(Ordering::Acquire)
    }

    /// Records a new choice, durably first: a choice that could not be stored is refused, so
    /// the guest never believes in a setting a restart would lose.
    pub fn choose(&self, write_cache: bool) -> Result<(), StateFileError> {
        if let Some(file) = &self.file {
            file.store_write_cache(write_cache)?;
        }
        self.chosen.store(write_cache, Ordering::Release);
        Ok(())
    }

    pub fn file(&self) -> Option<&StateFile> {
        self.file.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_setting_reads_back_and_a_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::new(dir.path().join("disk.state"));
        assert_eq!(state.write_cache().unwrap(), None);
        state.store_write_cache(false).unwrap();
        assert_eq!(state.write_cache().unwrap(), Some(false));
        state.store_write_cache(true).unwrap();
        assert_eq!(state.write_cache().unwrap(), Some(true));
        assert!(!dir.path().join("disk.state.tmp").exists());
    }

    #[test]
    fn a_choice_survives_a_reload_and_defaults_to_write_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("disk.state"));
        let choice = WriteCacheChoice::load(Some(file.clone())).unwrap();
        assert!(choice.chosen());
        choice.choose(false).unwrap();
        assert!(!WriteCacheChoice::load(Some(file)).unwrap().chosen());
    }

    #[test]
    fn a_choice_that_cannot_be_stored_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("missing-dir").join("disk.state"));
        let choice = WriteCacheChoice::load(Some(file)).unwrap();
        assert!(choice.choose(false).is_err());
        assert!(choice.chosen(), "the refused choice was applied");
    }

    #[test]
    fn a_damaged_file_is_a_clear_error_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.state");
        for text in [
            "write-cache = 3\n",
            "garbage",
            "write-cache = true\nother = 1\n",
        ] {
            fs::write(&path, text).unwrap();
            let err = StateFile::new(&path).write_cache().unwrap_err();
            assert!(
                matches!(err, StateFileError::Damaged { .. }),
                "{text:?}: {err}"
            );
            assert!(err.to_string().contains("disk.state"));
            assert_eq!(fs::read_to_string(&path).unwrap(), text);
        }
    }
}
