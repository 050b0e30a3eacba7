//! The one way Shoplens replaces a file: write a temporary file beside it, fsync it, rename
//! it over the target, fsync the directory. A reader (a searcher watching `serving/`, a
//! training run resuming) sees the old file or the new one, never half of one, and after a
//! power cut the rename has either happened with the whole content or not at all.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Replaces `path` with `bytes`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_with(path, |tmp| {
        let mut f = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// Replaces `path` with the file `write` creates at the temporary path it is given (for
/// writers that only write to a path, such as safetensors').
pub fn replace_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temporary_path(path);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    // The rename is durable only once the directory is synced.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// `name.tmp` beside `path`: on the same file system, so the rename is atomic.
fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_a_failed_write_leaves_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("CURRENT");
        write_atomically(&path, b"1\n").unwrap();
        write_atomically(&path, b"2\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"2\n");
        let failed = replace_with(&path, |tmp| {
            std::fs::write(tmp, b"half").unwrap();
            Err(Error::InvalidSetting { name: "test", reason: "writer failed".into() })
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"2\n", "the old content stays");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left behind");
    }
}
