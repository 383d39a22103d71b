//! The host's mount of its cluster's shared primary storage, as far as HA needs it: the storage
//! heartbeat files.
//!
//! Every host of a cluster mounts the same directory (`--storage DIR`, or a symlink to it). Each host
//! writes `DIR/heartbeat/<guid>` (a decimal counter and a newline) every heartbeat interval, through
//! a temporary file and a rename, so a reader sees the old or the new value, never half of one.
//! Neighbours read each other's files to tell "the host is dead" from "the host is cut off from the
//! management network" (CloudStack's KVM heartbeat on NFS does the same).
//!
//! Nothing here creates `DIR` itself: a missing mount (a removed symlink, a renamed directory) must
//! stay missing, so writes fail and the host notices it lost its storage.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

/// Subdirectory of the storage that holds the heartbeat files.
pub const HEARTBEAT_DIR: &str = "heartbeat";

/// One host's view of the shared storage.
#[derive(Debug, Clone)]
pub(crate) struct Storage {
    root: PathBuf,
}

/// What reading another host's heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeartbeatRead {
    /// The counter, if the file exists and holds one.
    pub heartbeat: Option<u64>,
    /// Whether this host could read the storage at all.
    pub storage_ok: bool,
}

/// Whether `name` can be used as one file name inside the heartbeat directory (it comes from the
/// network in `CheckHost`, so no separators, no `..`).
pub(crate) fn safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && name.len() <= 255
}

impl Storage {
    pub(crate) fn new(root: PathBuf) -> Storage {
        Storage { root }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self) -> PathBuf {
        self.root.join(HEARTBEAT_DIR)
    }

    /// The storage's identity as hosts report it: its canonical path (symlinks resolved, so every
    /// host of the cluster reports the same), or the configured path when it cannot be resolved.
    pub(crate) fn identity(&self) -> String {
        std::fs::canonicalize(&self.root).unwrap_or_else(|_| self.root.clone()).display().to_string()
    }

    /// Write `counter` as host `guid`'s heartbeat (temp file + rename). Creates the heartbeat
    /// directory inside an existing mount, never the mount itself.
    pub(crate) fn write_heartbeat(&self, guid: &str, counter: u64) -> std::io::Result<()> {
        let dir = self.dir();
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let tmp = dir.join(format!(".{guid}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{counter}\n").as_bytes())?;
        drop(f);
        std::fs::rename(&tmp, dir.join(guid))
    }

    /// Read host `guid`'s heartbeat through this mount.
    pub(crate) fn read_heartbeat(&self, guid: &str) -> HeartbeatRead {
        let dir = self.dir();
        let readable = std::fs::metadata(&self.root).is_ok_and(|m| m.is_dir());
        if !readable {
            return HeartbeatRead { heartbeat: None, storage_ok: false };
        }
        if !safe_file_name(guid) {
            return HeartbeatRead { heartbeat: None, storage_ok: true };
        }
        match std::fs::read_to_string(dir.join(guid)) {
            Ok(text) => HeartbeatRead { heartbeat: text.trim().parse().ok(), storage_ok: true },
            Err(e) if e.kind() == ErrorKind::NotFound => HeartbeatRead { heartbeat: None, storage_ok: true },
            Err(_) => HeartbeatRead { heartbeat: None, storage_ok: false },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_and_cut() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("primary");
        std::fs::create_dir(&real).unwrap();
        let link = tmp.path().join("mount");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let s = Storage::new(link.clone());
        let other = Storage::new(real.clone());

        assert_eq!(s.read_heartbeat("h0"), HeartbeatRead { heartbeat: None, storage_ok: true });
        s.write_heartbeat("h0", 1).unwrap();
        s.write_heartbeat("h0", 2).unwrap();
        assert_eq!(other.read_heartbeat("h0"), HeartbeatRead { heartbeat: Some(2), storage_ok: true });
        assert_eq!(std::fs::read_to_string(real.join("heartbeat/h0")).unwrap(), "2\n");
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(real.join("heartbeat")).unwrap().count(), 1);
        assert_eq!(s.identity(), other.identity());

        // Garbage in the file: no counter, but the storage is readable.
        std::fs::write(real.join("heartbeat/h1"), "x").unwrap();
        assert_eq!(s.read_heartbeat("h1"), HeartbeatRead { heartbeat: None, storage_ok: true });
        // Names from the network never leave the directory.
        assert_eq!(s.read_heartbeat("../primary"), HeartbeatRead { heartbeat: None, storage_ok: true });

        // Cut the link: writes fail and nothing recreates the mount.
        std::fs::remove_file(&link).unwrap();
        assert!(s.write_heartbeat("h0", 3).is_err());
        assert!(!link.exists());
        assert_eq!(s.read_heartbeat("h0"), HeartbeatRead { heartbeat: None, storage_ok: false });
        assert_eq!(s.identity(), link.display().to_string());
        assert_eq!(other.read_heartbeat("h0").heartbeat, Some(2));
    }

    #[test]
    fn file_names() {
        for ok in ["ag-h0", "a.b-h1", "x"] {
            assert!(safe_file_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a\\b", "a\0b", &"x".repeat(256)] {
            assert!(!safe_file_name(bad), "{bad}");
        }
    }
}
