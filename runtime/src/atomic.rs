//! Files written atomically: to a temporary name beside the destination,
//! synced, then renamed into place.
//!
//! Input: a destination path and the bytes (or lines) to write. Output: the
//! file at the destination. Invariant: a reader of the destination sees
//! its old contents or all of the new ones, never a part; a write that
//! fails or is abandoned (an [`AtomicFile`] dropped before
//! [`AtomicFile::commit`]) removes its temporary file and leaves the
//! destination untouched.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A temporary name beside `path`, unique within this process and across
/// processes.
fn temporary(path: &Path) -> std::io::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let Some(name) = path.file_name() else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("`{}` names no file", path.display())));
    };
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Ok(path.with_file_name(format!(".{}.{}.{n}.tmp", name.to_string_lossy(), std::process::id())))
}

/// Makes the rename into `path` durable where directories can be synced.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d }) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes)?;
    f.commit()
}

/// A file being written; it appears at its destination on [`commit`](AtomicFile::commit).
pub struct AtomicFile {
    tmp: PathBuf,
    path: PathBuf,
    out: Option<std::io::BufWriter<std::fs::File>>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> std::io::Result<AtomicFile> {
        let tmp = temporary(path)?;
        let out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        Ok(AtomicFile { tmp, path: path.to_path_buf(), out: Some(out) })
    }

    /// Writes one line.
    pub fn line(&mut self, s: &str) -> std::io::Result<()> {
        writeln!(self, "{s}")
    }

    /// Flushes, syncs and renames the file into place.
    pub fn commit(mut self) -> std::io::Result<()> {
        let Some(mut out) = self.out.take() else { return Ok(()) };
        out.flush()?;
        out.get_ref().sync_all()?;
        drop(out);
        std::fs::rename(&self.tmp, &self.path)?;
        sync_dir(&self.path);
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.out.as_mut() {
            Some(o) => o.write(buf),
            None => Err(std::io::Error::other("the file was already committed")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.out.as_mut() {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // After a commit the temporary name no longer exists; otherwise the
        // partial file is removed and the destination is left untouched.
        drop(self.out.take());
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("shardplan-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn an_abandoned_file_leaves_the_destination_as_it_was() {
        let p = dir().join("kept.txt");
        write(&p, b"old").unwrap();
        let mut f = AtomicFile::create(&p).unwrap();
        f.line("new").unwrap();
        drop(f);
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        // Only this file's temporaries: the other test writes beside it at the same time.
        let mine = |e: &std::fs::DirEntry| e.file_name().to_string_lossy().starts_with(".kept.txt.") && e.file_name().to_string_lossy().ends_with(".tmp");
        let left: Vec<_> = std::fs::read_dir(dir()).unwrap().filter_map(|e| e.ok()).filter(mine).collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
    }

    #[test]
    fn a_committed_file_replaces_the_destination() {
        let p = dir().join("replaced.txt");
        write(&p, b"old").unwrap();
        let mut f = AtomicFile::create(&p).unwrap();
        f.line("new").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new\n");
    }
}
