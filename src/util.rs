//! Small helpers shared by the CLI and the library.

use std::path::Path;

use crate::error::{Error, Result};

/// Write a file atomically: to a temporary file beside it (same directory, so the rename cannot
/// cross file systems), flushed to disk, then renamed over the target. A crash, a SIGINT or a full
/// disk never leaves a half-written PNG or cache behind and never truncates an existing file.
///
/// A target that exists and is not a regular file (`/dev/stdout`, `/dev/full`, a FIFO) cannot be
/// replaced by a rename, so it is written in place; its errors (e.g. "No space left on device")
/// are reported like any other.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};

    if let Ok(meta) = std::fs::metadata(path) {
        if !meta.is_file() && !meta.is_dir() {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| Error::io(path, e))?;
            return file
                .write_all(bytes)
                .and_then(|_| file.flush())
                .map_err(|e| Error::io(path, e));
        }
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    // Unique per process and per call, so two threads writing the same name never share a file.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let serial = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}-{serial}.tmp", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })?;
    // Make the rename itself durable (the directory entry), where the platform allows it.
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ldm-util-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_behind() {
        let dir = scratch("replace");
        let path = dir.join("out.png");
        std::fs::write(&path, b"old contents").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.png")]);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_failed_rename_leaves_no_temporary_behind() {
        let dir = scratch("fail");
        // A directory where the file should go: the rename fails after the data was written.
        std::fs::create_dir_all(dir.join("x.png")).unwrap();
        assert!(write_atomic(&dir.join("x.png"), b"new").is_err());
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "temporary file left behind"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn dev_full_is_a_clear_error_and_stays_a_device() {
        let full = Path::new("/dev/full");
        if !full.exists() {
            return;
        }
        let err = write_atomic(full, &[0u8; 4096]).unwrap_err().to_string();
        assert!(err.contains("/dev/full"), "{err}");
        // Written in place, not replaced by a regular file through a rename.
        assert!(!full.metadata().unwrap().is_file());
    }
}
