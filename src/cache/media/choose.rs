// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! How a media is mapped and made durable: pmem or msync, and what is refused and why. A pure
//! function of what is known about the media, so every case is tested without DAX hardware.

use super::Persistence;

/// What is known when the choice is made.
#[derive(Clone, Copy, Debug)]
pub(super) struct Facts {
    /// `--persistence`, if given.
    pub forced: Option<Persistence>,
    /// The media is a device DAX character device (no page cache, always pmem-capable).
    pub devdax: bool,
    /// This CPU can write cache lines back from userspace.
    pub cpu_flush: bool,
    /// The pmem code path may run without `MAP_SYNC`, for tests (`EMULATE_PMEM_ENV`).
    pub emulate_pmem: bool,
}

/// What the kernel said to a `MAP_SYNC` mapping of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MapSync {
    NotTried,
    /// Mapped: the file is on a DAX file system.
    Accepted,
    /// Refused (EOPNOTSUPP or EINVAL): not a DAX file system.
    Refused,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Choice {
    /// Map with plain `MAP_SHARED` and use this persistence.
    Map(Persistence),
    /// Try a `MAP_SYNC` mapping and choose again with the kernel's answer.
    TryMapSync,
    /// Keep the `MAP_SYNC` mapping: pmem.
    KeepMapSync,
    /// Refuse the media, for this reason.
    Refuse(&'static str),
}

pub(super) const NO_CPU_FLUSH: &str = "pmem mode is not supported on this CPU";
pub(super) const DEVDAX_MSYNC: &str = "device DAX has no page cache to msync; use pmem";
pub(super) const PMEM_NOT_DAX: &str =
    "pmem persistence requested, but the file is not on a DAX filesystem (MAP_SYNC refused); \
     use msync";

/// Chooses how to map a media. Called with [`MapSync::NotTried`] first; after
/// [`Choice::TryMapSync`], again with the kernel's answer (it then never asks to try again).
pub(super) fn choose(facts: Facts, map_sync: MapSync) -> Choice {
    match (facts.forced, facts.devdax) {
        (Some(Persistence::Msync), true) => Choice::Refuse(DEVDAX_MSYNC),
        (Some(Persistence::Volatile), _) => Choice::Map(Persistence::Volatile),
        (Some(Persistence::Msync), false) => Choice::Map(Persistence::Msync),
        (_, true) if !facts.cpu_flush => Choice::Refuse(NO_CPU_FLUSH),
        (_, true) => Choice::Map(Persistence::Pmem),
        (forced, false) => match map_sync {
            MapSync::NotTried => Choice::TryMapSync,
            MapSync::Accepted if facts.cpu_flush => Choice::KeepMapSync,
            MapSync::Accepted => Choice::Refuse(NO_CPU_FLUSH),
            MapSync::Refused => match forced {
                Some(Persistence::Pmem) if facts.emulate_pmem => Choice::Map(Persistence::Pmem),
                Some(Persistence::Pmem) => Choice::Refuse(PMEM_NOT_DAX),
                _ => Choice::Map(Persistence::Msync),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Persistence::{Msync, Pmem, Volatile};

    fn facts(forced: Option<Persistence>, devdax: bool) -> Facts {
        Facts {
            forced,
            devdax,
            cpu_flush: true,
            emulate_pmem: false,
        }
    }

    /// The choice for a file, after trying `MAP_SYNC` when asked to.
    fn for_file(f: Facts, answer: MapSync) -> Choice {
        match choose(f, MapSync::NotTried) {
            Choice::TryMapSync => {
                let second = choose(f, answer);
                assert_ne!(second, Choice::TryMapSync, "{f:?} asks to try again");
                second
            }
            other => other,
        }
    }

    #[test]
    fn device_dax_is_pmem_and_never_msync() {
        for forced in [None, Some(Pmem)] {
            assert_eq!(
                choose(facts(forced, true), MapSync::NotTried),
                Choice::Map(Pmem)
            );
        }
        assert_eq!(
            choose(facts(Some(Msync), true), MapSync::NotTried),
            Choice::Refuse(DEVDAX_MSYNC)
        );
        let no_flush = Facts {
            cpu_flush: false,
            ..facts(None, true)
        };
        assert_eq!(
            choose(no_flush, MapSync::NotTried),
            Choice::Refuse(NO_CPU_FLUSH)
        );
    }

    #[test]
    fn a_file_is_pmem_only_where_map_sync_is_accepted() {
        let detected = facts(None, false);
        assert_eq!(for_file(detected, MapSync::Accepted), Choice::KeepMapSync);
        assert_eq!(for_file(detected, MapSync::Refused), Choice::Map(Msync));
        let pmem = facts(Some(Pmem), false);
        assert_eq!(for_file(pmem, MapSync::Accepted), Choice::KeepMapSync);
        assert_eq!(
            for_file(pmem, MapSync::Refused),
            Choice::Refuse(PMEM_NOT_DAX)
        );
        let emulated = Facts {
            emulate_pmem: true,
            ..pmem
        };
        assert_eq!(for_file(emulated, MapSync::Refused), Choice::Map(Pmem));
        // Emulation is for a forced pmem only: detection still picks msync.
        let detected_emulated = Facts {
            emulate_pmem: true,
            ..detected
        };
        assert_eq!(
            for_file(detected_emulated, MapSync::Refused),
            Choice::Map(Msync)
        );
    }

    #[test]
    fn a_dax_file_on_a_cpu_without_flush_is_refused() {
        let no_flush = Facts {
            cpu_flush: false,
            ..facts(None, false)
        };
        assert_eq!(
            for_file(no_flush, MapSync::Accepted),
            Choice::Refuse(NO_CPU_FLUSH)
        );
        assert_eq!(for_file(no_flush, MapSync::Refused), Choice::Map(Msync));
    }

    #[test]
    fn msync_and_volatile_are_taken_as_asked_without_map_sync() {
        for devdax in [false, true] {
            assert_eq!(
                choose(facts(Some(Volatile), devdax), MapSync::NotTried),
                Choice::Map(Volatile)
            );
        }
        assert_eq!(
            choose(facts(Some(Msync), false), MapSync::NotTried),
            Choice::Map(Msync)
        );
    }
}
