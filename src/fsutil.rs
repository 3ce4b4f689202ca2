//! Files that appear whole or not at all: written beside their destination, synced, renamed, and the
//! directory synced, so a crash at any point leaves either the old file or the new one.

use crate::error::{Error, Result, Status};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::new(Status::Io, format!("{what} {}: {e}", path.display()))
}

/// Fault injection for tests: the number of writes that may still succeed (`u64::MAX`: no limit).
static WRITES_LEFT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Lets the next `writes` file writes through this module succeed and fails the ones after; `None`
/// removes the limit. For tests of crash safety; affects the whole process.
#[doc(hidden)]
pub fn inject_write_failures_after(writes: Option<u64>) {
    WRITES_LEFT.store(writes.unwrap_or(u64::MAX), Ordering::SeqCst);
}

fn charge_write(path: &Path) -> Result<()> {
    let left = WRITES_LEFT.load(Ordering::SeqCst);
    if left == u64::MAX {
        return Ok(());
    }
    if left == 0 {
        return Err(Error::new(Status::Io, format!("injected write failure at {}", path.display())));
    }
    WRITES_LEFT.store(left - 1, Ordering::SeqCst);
    Ok(())
}

/// Syncs a directory so that renames and creations inside it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    charge_write(dir)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error("cannot sync directory", dir, e))
}

/// A file written under a temporary name in its destination's directory.
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    out: Option<BufWriter<File>>,
    renamed: bool,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl AtomicFile {
    pub fn create(target: &Path) -> Result<Self> {
        let name = target.file_name().ok_or_else(|| Error::invalid(format!("{} names no file", target.display())))?;
        let temp = target.with_file_name(format!(
            ".{}.tmp-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        charge_write(&temp)?;
        let file = File::create(&temp).map_err(|e| io_error("cannot create", &temp, e))?;
        Ok(AtomicFile { target: target.to_path_buf(), temp, out: Some(BufWriter::with_capacity(1 << 20, file)), renamed: false })
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        charge_write(&self.temp)?;
        let out = self.out.as_mut().expect("not committed");
        out.write_all(bytes).map_err(|e| io_error("cannot write", &self.temp, e))
    }

    /// Flushes, syncs and renames into place, then syncs the directory.
    pub fn commit(mut self) -> Result<()> {
        let out = self.out.take().expect("not committed");
        charge_write(&self.temp)?;
        let file = out.into_inner().map_err(|e| io_error("cannot write", &self.temp, e.into_error()))?;
        file.sync_all().map_err(|e| io_error("cannot sync", &self.temp, e))?;
        drop(file);
        charge_write(&self.target)?;
        fs::rename(&self.temp, &self.target).map_err(|e| io_error("cannot rename into", &self.target, e))?;
        self.renamed = true;
        let dir = self.target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        sync_dir(dir)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.renamed {
            // Abandoned on an error: the destination was never touched.
            let _ = fs::remove_file(&self.temp);
        }
    }
}
