//! Reading files as untrusted input (a catalog's images; the searcher's read of a store's
//! `CURRENT` pointer uses it too, without a root): a catalog folder may hold links to
//! anywhere (`/etc/passwd`), devices (`/dev/zero`) or FIFOs (which block an open or a read
//! forever). Every read goes through [`read_catalog_file`]: the last component is opened
//! without following a link and without blocking, the opened file must be a regular file
//! no larger than the limit, and the read itself is bounded; with a root, the file's real
//! path must lie inside the root's real path (a linked directory on the way is caught too).

use std::fs::File;
use std::io::Read;
use std::path::Path;

/// Reads `path` if it is a regular file (not a link, device or FIFO) of at most `max_bytes`
/// and, with `root`, really lies inside `root`. The error says why, for a row report or a log.
pub fn read_catalog_file(path: &Path, root: Option<&Path>, max_bytes: u64) -> Result<Vec<u8>, String> {
    let shown = path.display();
    if let Some(root) = root {
        let real_root = root.canonicalize().map_err(|e| format!("cannot resolve the catalog folder {}: {e}", root.display()))?;
        let real = path.canonicalize().map_err(|e| format!("cannot read {shown}: {e}"))?;
        if !real.starts_with(&real_root) {
            return Err(format!("{shown} leads outside its catalog folder (to {})", real.display()));
        }
    }
    let file = open_no_follow(path).map_err(|e| match e.raw_os_error() {
        Some(code) if code == libc::ELOOP => format!("{shown} is a symbolic link; only regular files are read"),
        _ => format!("cannot read {shown}: {e}"),
    })?;
    let meta = file.metadata().map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("{shown} is not a regular file (a device, FIFO or directory); only regular files are read"));
    }
    if meta.len() > max_bytes {
        return Err(format!("{shown} is a file of {} bytes, over the {max_bytes}-byte limit", meta.len()));
    }
    // The file may grow between the check and the read: never read past the limit.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if bytes.len() as u64 > max_bytes {
        return Err(format!("{shown} grew over the {max_bytes}-byte limit while being read"));
    }
    Ok(bytes)
}

#[cfg(unix)]
fn open_no_follow(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever; a regular file
    // reads the same either way.
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)
}

#[cfg(not(unix))]
fn open_no_follow(path: &Path) -> std::io::Result<File> {
    if std::fs::symlink_metadata(path)?.file_type().is_symlink() {
        return Err(std::io::Error::other("a symbolic link"));
    }
    File::open(path)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn regular_files_inside_the_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("catalog");
        std::fs::create_dir_all(root.join("images")).unwrap();
        std::fs::write(root.join("images/a.jpg"), b"abc").unwrap();
        std::fs::write(dir.path().join("secret"), b"secret").unwrap();
        assert_eq!(read_catalog_file(&root.join("images/a.jpg"), Some(&root), 10).unwrap(), b"abc");
        // Too large.
        assert!(read_catalog_file(&root.join("images/a.jpg"), Some(&root), 2).unwrap_err().contains("limit"));
        // A link to a file outside, as the file or as a directory on the way.
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("images/link.jpg")).unwrap();
        assert!(read_catalog_file(&root.join("images/link.jpg"), Some(&root), 100).unwrap_err().contains("outside"));
        assert!(read_catalog_file(&root.join("images/link.jpg"), None, 100).unwrap_err().contains("symbolic link"));
        std::os::unix::fs::symlink(dir.path(), root.join("up")).unwrap();
        assert!(read_catalog_file(&root.join("up/secret"), Some(&root), 100).unwrap_err().contains("outside"));
        // A device and a FIFO are refused at once, never read.
        assert!(read_catalog_file(Path::new("/dev/zero"), None, 100).unwrap_err().contains("not a regular file"));
        let fifo = root.join("images/fifo.jpg");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(read_catalog_file(&fifo, Some(&root), 100).unwrap_err().contains("not a regular file"));
    }
}
