//! The library's file handling: files that appear whole or not at all (written beside their
//! destination, synced, renamed, the directory synced, so a crash at any point leaves either the old
//! file or the new one); reading only regular files and never more than they should hold; and the
//! advisory lock that gives a checkpoint directory one writer at a time.

use crate::error::{try_zeroed, Error, Result, Status};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
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
    /// Writes `target` through a temporary file whose name is unique to this process and call.
    pub fn create(target: &Path) -> Result<Self> {
        let tag = format!("{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        Self::create_tagged(target, &tag)
    }

    /// Writes `target` through the temporary file `.<name>.tmp-<tag>` beside it, a name the caller
    /// can find again (checkpoints remove what a crashed save left by name, never by pattern).
    pub fn create_tagged(target: &Path, tag: &str) -> Result<Self> {
        let temp = temp_path(target, tag)?;
        charge_write(&temp)?;
        let file = File::create(&temp).map_err(|e| io_error("cannot create", &temp, e))?;
        Ok(AtomicFile { target: target.to_path_buf(), temp, out: Some(BufWriter::with_capacity(1 << 20, file)), renamed: false })
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        charge_write(&self.temp)?;
        let out = self.out.as_mut().expect("not committed");
        out.write_all(bytes).map_err(|e| io_error("cannot write", &self.temp, e))
    }

    /// The temporary file being written, for writers at offsets (`PositionalFile`).
    pub fn temp(&self) -> &Path {
        &self.temp
    }

    /// Flushes what was written and makes the file `len` bytes long (a hole to be filled at
    /// offsets).
    pub fn set_len(&mut self, len: u64) -> Result<()> {
        charge_write(&self.temp)?;
        let out = self.out.as_mut().expect("not committed");
        out.flush().map_err(|e| io_error("cannot write", &self.temp, e))?;
        out.get_ref().set_len(len).map_err(|e| io_error("cannot extend", &self.temp, e))
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

/// Another writer of an `AtomicFile`'s temporary file, at offsets: each process of a job writes its
/// rows into the one file that process 0 then publishes.
pub struct PositionalFile {
    file: File,
    path: PathBuf,
}

impl PositionalFile {
    pub fn open(path: &Path) -> Result<PositionalFile> {
        charge_write(path)?;
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| io_error("cannot open", path, e))?;
        Ok(PositionalFile { file, path: path.to_path_buf() })
    }

    pub fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        charge_write(&self.path)?;
        self.file.write_all_at(bytes, offset).map_err(|e| io_error("cannot write", &self.path, e))
    }

    /// Makes the writes durable.
    pub fn sync(self) -> Result<()> {
        charge_write(&self.path)?;
        self.file.sync_data().map_err(|e| io_error("cannot sync", &self.path, e))
    }
}

/// The temporary file `AtomicFile::create_tagged(target, tag)` writes.
pub fn temp_path(target: &Path, tag: &str) -> Result<PathBuf> {
    let name = target.file_name().ok_or_else(|| Error::invalid(format!("{} names no file", target.display())))?;
    Ok(target.with_file_name(format!(".{}.tmp-{tag}", name.to_string_lossy())))
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.renamed {
            // Abandoned on an error: the destination was never touched.
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// A regular file opened for reading. Opening never blocks (a FIFO is refused, not waited on) and
/// follows symbolic links only to regular files, so a link to `/dev/zero` or a directory is refused.
pub struct RegularFile {
    file: File,
    path: PathBuf,
    len: u64,
    /// Bytes handed out so far; never more than `len`.
    read: u64,
}

impl RegularFile {
    /// Opens `path` (`what` names it in messages): `Ok(None)` when nothing is there, `Corrupt` for
    /// anything but a regular file, `Io` when it cannot be opened.
    pub fn open(path: &Path, what: &str) -> Result<Option<RegularFile>> {
        let file = match OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&format!("cannot open {what}"), path, e)),
        };
        let meta = file.metadata().map_err(|e| io_error(&format!("cannot inspect {what}"), path, e))?;
        let kind = meta.file_type();
        if !kind.is_file() {
            let is = if kind.is_dir() {
                "a directory"
            } else if kind.is_fifo() {
                "a FIFO"
            } else if kind.is_char_device() || kind.is_block_device() {
                "a device"
            } else if kind.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            };
            return Err(Error::new(Status::Corrupt, format!("{what} {} is {is}; only regular files are read", path.display())));
        }
        Ok(Some(RegularFile { file, path: path.to_path_buf(), len: meta.len(), read: 0 }))
    }

    /// Bytes in the file when it was opened.
    pub fn size(&self) -> u64 {
        self.len
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fills `buf` from the current position; the file must hold that many more bytes.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        let end = self.read.checked_add(buf.len() as u64).filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(Error::new(Status::Corrupt, format!("{} ends early", self.path.display())));
        }
        self.file.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::new(Status::Corrupt, format!("{} shrank while being read", self.path.display()))
            } else {
                io_error("cannot read", &self.path, e)
            }
        })?;
        self.read += buf.len() as u64;
        Ok(())
    }

    /// `n` bytes from the current position into a new buffer (allocated fallibly).
    pub fn read_vec(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        if self.read.checked_add(n).is_none_or(|e| e > self.len) {
            return Err(Error::new(Status::Corrupt, format!("{} ends early", self.path.display())));
        }
        let mut buf = try_zeroed::<u8>(n as usize, what)?;
        self.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// The whole file, which must hold at most `max` bytes.
    pub fn read_all(mut self, max: u64, what: &str) -> Result<Vec<u8>> {
        if self.len > max {
            return Err(Error::new(Status::Corrupt, format!("{what} {} holds {} bytes, more than {max}", self.path.display(), self.len)));
        }
        let len = self.len;
        self.read_vec(len, what)
    }

    pub fn seek(&mut self, at: u64) -> Result<()> {
        if at > self.len {
            return Err(Error::new(Status::Corrupt, format!("{} ends early", self.path.display())));
        }
        self.file.seek(SeekFrom::Start(at)).map_err(|e| io_error("cannot seek in", &self.path, e))?;
        self.read = at;
        Ok(())
    }
}

/// The lock file of a checkpoint directory: held exclusively by its writer for a whole save (and
/// holding the save's journal, see `checkpoint`), shared by readers. `flock` locks belong to the open
/// file, so two heads in one process exclude each other as two processes do; the kernel drops the
/// lock of a process that dies.
pub struct DirLock {
    file: File,
    path: PathBuf,
}

pub const LOCK_FILE: &str = ".partialfc.lock";

fn would_block(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EWOULDBLOCK)
}

impl DirLock {
    fn flock(file: &File, op: i32) -> std::io::Result<()> {
        // SAFETY: a valid descriptor owned by `file`.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Takes `dir`'s lock for writing, creating the lock file; refuses at once if another writer
    /// or a reader holds it.
    pub fn exclusive(dir: &Path) -> Result<DirLock> {
        let path = dir.join(LOCK_FILE);
        charge_write(&path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| io_error("cannot open the lock file", &path, e))?;
        if !file.metadata().map_err(|e| io_error("cannot inspect", &path, e))?.is_file() {
            return Err(Error::new(Status::Io, format!("{} is not a regular file: cannot lock the checkpoint directory", path.display())));
        }
        Self::flock(&file, libc::LOCK_EX).map_err(|e| {
            if would_block(&e) {
                Error::new(
                    Status::Io,
                    format!("{} is in use: another head or process is saving or loading a checkpoint there (one writer per checkpoint directory)", dir.display()),
                )
            } else {
                io_error("cannot lock", &path, e)
            }
        })?;
        Ok(DirLock { file, path })
    }

    /// Takes `dir`'s lock for reading when it has a lock file (a checkpoint written by this library
    /// always has one); refuses at once while a writer holds it. Creates nothing.
    pub fn shared(dir: &Path) -> Result<Option<DirLock>> {
        let path = dir.join(LOCK_FILE);
        let Some(lock) = RegularFile::open(&path, "lock file")? else { return Ok(None) };
        Self::flock(&lock.file, libc::LOCK_SH).map_err(|e| {
            if would_block(&e) {
                Error::new(Status::Io, format!("{} is being written: a save is in progress there; load it when the save has finished", dir.display()))
            } else {
                io_error("cannot lock", &path, e)
            }
        })?;
        Ok(Some(DirLock { file: lock.file, path }))
    }

    /// The lock file's contents (the journal; at most `max` bytes are read).
    pub fn contents(&mut self, max: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.file.seek(SeekFrom::Start(0)).map_err(|e| io_error("cannot read", &self.path, e))?;
        (&self.file).take(max).read_to_end(&mut out).map_err(|e| io_error("cannot read", &self.path, e))?;
        Ok(out)
    }

    /// Appends `bytes` to the lock file and makes them durable.
    pub fn append(&mut self, bytes: &[u8]) -> Result<()> {
        charge_write(&self.path)?;
        self.file.seek(SeekFrom::End(0)).map_err(|e| io_error("cannot write", &self.path, e))?;
        self.file.write_all(bytes).map_err(|e| io_error("cannot write", &self.path, e))?;
        self.file.sync_data().map_err(|e| io_error("cannot sync", &self.path, e))
    }

    /// Empties the lock file (the journal), durably.
    pub fn clear(&mut self) -> Result<()> {
        charge_write(&self.path)?;
        self.file.set_len(0).map_err(|e| io_error("cannot truncate", &self.path, e))?;
        self.file.sync_data().map_err(|e| io_error("cannot sync", &self.path, e))
    }
}
