//! A SQLite VFS for the writer's connection that writes a commit's log frames with one
//! `pwrite` (or one per 128 KiB) instead of two a frame: SQLite writes each frame's 24-byte
//! header and its page separately, and at about 50 frames a commit those calls took a sixth
//! of the writer's time. In every other way it is the default VFS, whose file objects it
//! wraps: only the write-ahead log's file is wrapped, and only frame appends are held.
//!
//! When held frames are written:
//! - a commit frame (its header names the database's size after the commit, other frames'
//!   name 0) is written with everything held before it, inside the `xWrite` of its page: a
//!   failed write fails the commit, and SQLite publishes a commit in the WAL index only after
//!   its frames are in the file, as with the default VFS;
//! - anything else done to the log (a read, a write elsewhere, a sync, a truncation, its
//!   size, a file control) writes what is held first, so writes keep their order; so does
//!   holding 1 MiB, which bounds the memory;
//! - when a transaction ends, [`settle`] writes what a commit left (nothing) and drops what a
//!   rollback left: frames spilled from the page cache by a transaction that then rolled back
//!   must never reach the file, where another connection may have written since.

use std::ffi::{CStr, c_int, c_void};
use std::ptr;
use std::sync::OnceLock;

use rusqlite::ffi;

/// The VFS's registered name, for `Connection::open_with_flags_and_vfs`.
pub const NAME: &CStr = c"engram-batched-log";

/// A log frame's header, which SQLite writes with a call of its own.
const FRAME_HEADER: usize = 24;

/// The most bytes the default Unix VFS writes in one call: it masks a length with 0x1ffff,
/// and a longer write comes back short (SQLITE_FULL).
const LARGEST_WRITE: usize = 0x1ffff;

/// Held bytes past which they are written before the commit frame (the write lock is held
/// throughout a transaction, so any time before its commit is as good): bounds the memory.
const MOST_HELD: usize = 1 << 20;

/// Registers the VFS once (not as the default) and returns its name; `None` when there is
/// no default VFS to wrap.
pub fn register() -> Option<&'static CStr> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    // SAFETY: sqlite3_vfs_find and sqlite3_vfs_register are thread-safe, and the registered
    // struct is leaked, so it outlives every connection that uses it.
    let registered = *REGISTERED.get_or_init(|| unsafe {
        let default = ffi::sqlite3_vfs_find(ptr::null());
        if default.is_null() {
            return false;
        }
        let Some(size) = c_int::try_from(WRAPPED_AT)
            .ok()
            .and_then(|offset| offset.checked_add((*default).szOsFile))
        else {
            return false;
        };
        DEFAULT.get_or_init(|| DefaultVfs(default));
        let vfs = Box::leak(Box::new(ffi::sqlite3_vfs {
            szOsFile: size,
            pNext: ptr::null_mut(),
            zName: NAME.as_ptr(),
            xOpen: Some(open),
            ..*default
        }));
        ffi::sqlite3_vfs_register(vfs, 0) == ffi::SQLITE_OK
    });
    registered.then_some(NAME)
}

/// The default VFS, which this one wraps.
struct DefaultVfs(*mut ffi::sqlite3_vfs);

// SAFETY: a registered VFS object is never changed and may be used from any thread.
unsafe impl Send for DefaultVfs {}
unsafe impl Sync for DefaultVfs {}

static DEFAULT: OnceLock<DefaultVfs> = OnceLock::new();

/// What the log's writes that are not yet in the file need next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The write is held.
    Hold,
    /// The write completed a commit frame, or filled the hold: write everything held.
    WriteHeld,
    /// Write everything held, then this write as it came.
    WriteHeldThenThis,
}

/// The frame appends held for one log file: `bytes` from offset `start`.
#[derive(Debug, Default)]
pub struct Held {
    start: i64,
    bytes: Vec<u8>,
    /// Where the file's last write ended: only a frame header right after it is held.
    next: Option<i64>,
    /// The last write was a held frame header, and whether it was a commit frame's.
    header: Option<bool>,
}

impl Held {
    /// Takes a write of `bytes` at `offset` in: held, or to be written (see [`Step`]).
    pub fn take(&mut self, offset: i64, bytes: &[u8]) -> Step {
        let appends = self.next == Some(offset);
        self.next = offset.checked_add(bytes.len() as i64);
        let header = self.header.take();
        if appends && bytes.len() == FRAME_HEADER {
            // Bytes 4 to 7: the database's size in pages after a commit, 0 in other frames.
            self.hold(offset, bytes);
            self.header = Some(bytes[4..8] != [0; 4]);
            return Step::Hold;
        }
        match header {
            Some(commit) if appends => {
                self.hold(offset, bytes);
                if commit || self.bytes.len() >= MOST_HELD {
                    Step::WriteHeld
                } else {
                    Step::Hold
                }
            }
            _ => Step::WriteHeldThenThis,
        }
    }

    fn hold(&mut self, offset: i64, bytes: &[u8]) {
        if self.bytes.is_empty() {
            self.start = offset;
        }
        self.bytes.extend_from_slice(bytes);
    }

    /// The held bytes, to be written at the offset.
    pub fn held(&self) -> (i64, &[u8]) {
        (self.start, &self.bytes)
    }

    /// After the held bytes were written, or failed to be: none are held. After a failure,
    /// where the file ends is no longer known.
    pub fn clear(&mut self, written: bool) {
        self.bytes.clear();
        self.header = None;
        if !written {
            self.next = None;
        }
    }
}

/// `bytes` to be written from `start` in writes of at most `largest` bytes, with their offsets.
pub fn writes(start: i64, bytes: &[u8], largest: usize) -> impl Iterator<Item = (i64, &[u8])> {
    bytes.chunks(largest).scan(start, |offset, chunk| {
        let at = *offset;
        *offset += chunk.len() as i64;
        Some((at, chunk))
    })
}

/// A log file: this VFS's object, then the default VFS's at `WRAPPED_AT`. Any other file
/// is the default VFS's object alone, at the start.
#[repr(C)]
struct LogFile {
    base: ffi::sqlite3_file,
    held: Held,
}

const WRAPPED_AT: usize = std::mem::size_of::<LogFile>().next_multiple_of(16);

/// The default VFS's object inside a log file.
fn wrapped(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    file.cast::<u8>().wrapping_add(WRAPPED_AT).cast()
}

/// The default VFS's methods of a log file.
///
/// # Safety
/// `file` is an open log file of this VFS.
unsafe fn methods(file: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: the default VFS opened the wrapped object and set its methods (see `open`).
    unsafe { &*(*wrapped(file)).pMethods }
}

/// The writes a log file holds.
///
/// # Safety
/// `file` is an open log file of this VFS, and nothing else borrows its `Held`: SQLite calls
/// a file's methods one at a time.
unsafe fn held<'a>(file: *mut ffi::sqlite3_file) -> &'a mut Held {
    // SAFETY: as documented.
    unsafe { &mut (*file.cast::<LogFile>()).held }
}

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let default = DEFAULT.get().expect("registered before use").0;
    // SAFETY: SQLite gives `file` this VFS's `szOsFile` bytes, room for the default's object
    // at the start or after a `LogFile`; the default's xOpen initialises that object.
    unsafe {
        let open_default = (*default).xOpen.expect("a VFS opens files");
        if flags & ffi::SQLITE_OPEN_WAL == 0 {
            return open_default(default, name, file, flags, out_flags);
        }
        (*file).pMethods = ptr::null();
        let opened = open_default(default, name, wrapped(file), flags, out_flags);
        if opened != ffi::SQLITE_OK || (*wrapped(file)).pMethods.is_null() {
            return opened;
        }
        ptr::write(&raw mut (*file.cast::<LogFile>()).held, Held::default());
        (*file).pMethods = &LOG_METHODS;
        opened
    }
}

/// Writes what `file` holds, if anything.
///
/// # Safety
/// As [`held`]; `held` is that file's.
unsafe fn write_held(file: *mut ffi::sqlite3_file, held: &mut Held) -> c_int {
    let (start, bytes) = held.held();
    let mut written = ffi::SQLITE_OK;
    for (offset, chunk) in writes(start, bytes, LARGEST_WRITE) {
        // SAFETY: the default's xWrite reads `chunk.len()` (<= 0x1ffff) bytes of `chunk`.
        written = unsafe {
            methods(file).xWrite.expect("xWrite")(
                wrapped(file),
                chunk.as_ptr().cast(),
                chunk.len() as c_int,
                offset,
            )
        };
        if written != ffi::SQLITE_OK {
            break;
        }
    }
    held.clear(written == ffi::SQLITE_OK);
    written
}

unsafe extern "C" fn log_write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite passes `amount` (> 0) readable bytes at `data`, and one of our log files.
    unsafe {
        let held = held(file);
        let bytes = std::slice::from_raw_parts(data.cast::<u8>(), amount as usize);
        match held.take(offset, bytes) {
            Step::Hold => ffi::SQLITE_OK,
            Step::WriteHeld => write_held(file, held),
            Step::WriteHeldThenThis => {
                let flushed = write_held(file, held);
                if flushed != ffi::SQLITE_OK {
                    return flushed;
                }
                let written =
                    methods(file).xWrite.expect("xWrite")(wrapped(file), data, amount, offset);
                if written != ffi::SQLITE_OK {
                    held.clear(false);
                }
                written
            }
        }
    }
}

/// A method of the log that writes what is held first, then forwards.
macro_rules! after_held {
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> c_int {
            // SAFETY: SQLite calls it with one of our log files, with valid arguments.
            unsafe {
                let flushed = write_held(file, held(file));
                if flushed != ffi::SQLITE_OK {
                    return flushed;
                }
                methods(file).$method.expect(stringify!($method))(wrapped(file), $($arg),*)
            }
        }
    };
}

after_held!(log_read, xRead, (data: *mut c_void, amount: c_int, offset: i64));
after_held!(log_truncate, xTruncate, (size: i64));
after_held!(log_sync, xSync, (flags: c_int));
after_held!(log_file_size, xFileSize, (size: *mut i64));
after_held!(log_file_control, xFileControl, (op: c_int, argument: *mut c_void));

/// A method of the log forwarded as it is.
macro_rules! forward {
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> c_int {
            // SAFETY: SQLite calls it with one of our log files, with valid arguments.
            unsafe { methods(file).$method.expect(stringify!($method))(wrapped(file), $($arg),*) }
        }
    };
}

forward!(log_lock, xLock, (level: c_int));
forward!(log_unlock, xUnlock, (level: c_int));
forward!(log_check_reserved_lock, xCheckReservedLock, (reserved: *mut c_int));
forward!(log_sector_size, xSectorSize, ());
forward!(log_device_characteristics, xDeviceCharacteristics, ());

/// Drops anything held: a connection closes its log after its last transaction ended, so
/// it can only be what a rollback left.
unsafe extern "C" fn log_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes a file once and uses it no more; `held` is dropped here.
    unsafe {
        let closed = methods(file).xClose.expect("xClose")(wrapped(file));
        ptr::drop_in_place(&raw mut (*file.cast::<LogFile>()).held);
        (*file).pMethods = ptr::null();
        closed
    }
}

/// Ends a transaction of `db`, opened with this VFS: after a commit writes what its log
/// holds (a commit leaves nothing held; this keeps it so), after a rollback drops it.
///
/// # Safety
/// `db` is an open connection, used by nobody else meanwhile.
pub unsafe fn settle(db: *mut ffi::sqlite3, committed: bool) -> c_int {
    // SAFETY: as documented; a log file of this VFS is used only through its connection.
    unsafe {
        let Some(file) = log_file(db) else {
            return ffi::SQLITE_OK;
        };
        let held = held(file);
        if committed {
            debug_assert!(held.held().1.is_empty(), "a commit left frames held");
            write_held(file, held)
        } else {
            held.clear(false);
            ffi::SQLITE_OK
        }
    }
}

/// The log file of `db` if it is open and one of this VFS's.
///
/// # Safety
/// `db` is an open connection, used by nobody else meanwhile.
unsafe fn log_file(db: *mut ffi::sqlite3) -> Option<*mut ffi::sqlite3_file> {
    let mut file: *mut ffi::sqlite3_file = ptr::null_mut();
    // SAFETY: JOURNAL_POINTER writes the connection's log (or journal) file object into
    // `file`; it is one of our log files only if its methods are ours.
    unsafe {
        let found = ffi::sqlite3_file_control(
            db,
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_JOURNAL_POINTER,
            (&raw mut file).cast(),
        );
        let ours =
            found == ffi::SQLITE_OK && !file.is_null() && ptr::eq((*file).pMethods, &LOG_METHODS);
        ours.then_some(file)
    }
}

/// Version 1: the log has no shared memory or memory map of its own (the database file does).
static LOG_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(log_close),
    xRead: Some(log_read),
    xWrite: Some(log_write),
    xTruncate: Some(log_truncate),
    xSync: Some(log_sync),
    xFileSize: Some(log_file_size),
    xLock: Some(log_lock),
    xUnlock: Some(log_unlock),
    xCheckReservedLock: Some(log_check_reserved_lock),
    xFileControl: Some(log_file_control),
    xSectorSize: Some(log_sector_size),
    xDeviceCharacteristics: Some(log_device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

#[cfg(test)]
mod tests {
    use rusqlite::{Connection, OpenFlags, params};

    use super::*;

    const PAGE: usize = 4096;

    fn frame_header(commit_size: u32) -> Vec<u8> {
        let mut header = vec![0; FRAME_HEADER];
        header[4..8].copy_from_slice(&commit_size.to_be_bytes());
        header
    }

    /// Offers a frame (header, then page) at `offset`; the steps taken.
    fn offer_frame(held: &mut Held, offset: i64, commit_size: u32) -> (Step, Step) {
        let header = held.take(offset, &frame_header(commit_size));
        let page = held.take(offset + FRAME_HEADER as i64, &[7; PAGE]);
        (header, page)
    }

    const FRAME: i64 = (FRAME_HEADER + PAGE) as i64;

    #[test]
    fn frames_are_held_until_a_commit_frame_completes() {
        let mut held = Held::default();
        assert_eq!(
            held.take(0, &[1; 32]),
            Step::WriteHeldThenThis,
            "the log's header"
        );
        assert_eq!(offer_frame(&mut held, 32, 0), (Step::Hold, Step::Hold));
        assert_eq!(
            offer_frame(&mut held, 32 + FRAME, 0),
            (Step::Hold, Step::Hold)
        );
        assert_eq!(
            offer_frame(&mut held, 32 + 2 * FRAME, 9),
            (Step::Hold, Step::WriteHeld)
        );
        let (start, bytes) = held.held();
        assert_eq!((start, bytes.len() as i64), (32, 3 * FRAME));
        held.clear(true);
        assert_eq!(
            offer_frame(&mut held, 32 + 3 * FRAME, 10),
            (Step::Hold, Step::WriteHeld),
            "the next commit appends"
        );
    }

    #[test]
    fn a_full_hold_is_written_before_the_commit_frame() {
        let mut held = Held::default();
        held.take(0, &[1; 32]);
        let frames = MOST_HELD as i64 / FRAME + 1;
        let steps: Vec<(Step, Step)> = (0..frames)
            .map(|frame| offer_frame(&mut held, 32 + frame * FRAME, 0))
            .collect();
        assert!(
            steps[..steps.len() - 1]
                .iter()
                .all(|step| *step == (Step::Hold, Step::Hold))
        );
        assert_eq!(steps.last(), Some(&(Step::Hold, Step::WriteHeld)));
    }

    #[test]
    fn a_write_elsewhere_goes_through_after_what_is_held() {
        let mut held = Held::default();
        held.take(0, &[1; 32]);
        offer_frame(&mut held, 32, 0);
        // A checksum rewrite of an earlier frame's header, or another connection's end.
        assert_eq!(held.take(32, &frame_header(0)), Step::WriteHeldThenThis);
        held.clear(true);
        assert_eq!(
            held.take(32 + FRAME_HEADER as i64, &[7; PAGE]),
            Step::WriteHeldThenThis,
            "a page whose header was not held"
        );
    }

    #[test]
    fn after_a_failed_write_nothing_is_held_until_a_write_goes_through() {
        let mut held = Held::default();
        held.take(0, &[1; 32]);
        offer_frame(&mut held, 32, 0);
        held.clear(false);
        assert!(held.held().1.is_empty());
        assert_eq!(
            held.take(32 + FRAME, &frame_header(0)),
            Step::WriteHeldThenThis
        );
        assert_eq!(
            held.take(32 + FRAME + FRAME_HEADER as i64, &[7; PAGE]),
            Step::WriteHeldThenThis
        );
        assert_eq!(
            offer_frame(&mut held, 32 + 2 * FRAME, 3),
            (Step::Hold, Step::WriteHeld)
        );
    }

    #[test]
    fn held_bytes_are_written_in_bounded_pieces_at_their_offsets() {
        let bytes = vec![5; 10];
        let pieces: Vec<(i64, usize)> = writes(100, &bytes, 4)
            .map(|(offset, piece)| (offset, piece.len()))
            .collect();
        assert_eq!(pieces, [(100, 4), (104, 4), (108, 2)]);
    }

    fn batched(path: &std::path::Path) -> Connection {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let connection =
            Connection::open_with_flags_and_vfs(path, flags, register().expect("registered"))
                .expect("open with the VFS");
        connection
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .expect("settings");
        connection
    }

    fn count(connection: &Connection) -> i64 {
        connection
            .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
            .expect("count")
    }

    fn commit(connection: &Connection) {
        connection.execute_batch("COMMIT").expect("commit");
        // SAFETY: the connection is open and used only here.
        assert_eq!(unsafe { settle(connection.handle(), true) }, ffi::SQLITE_OK);
    }

    #[test]
    fn other_connections_see_every_commit_as_it_returns() {
        let (_directory, path, writer) = new_database();
        let reader = Connection::open(&path).expect("a reader with the default VFS");
        // One row a commit, then commits of 64 rows of 3 KiB: well over 128 KiB of frames.
        for (commit_number, rows) in [1, 1, 64, 64, 1].into_iter().enumerate() {
            writer.execute_batch("BEGIN IMMEDIATE").expect("begin");
            for _ in 0..rows {
                writer
                    .execute("INSERT INTO t (body) VALUES (randomblob(3000))", params![])
                    .expect("insert");
            }
            writer.execute_batch("COMMIT").expect("commit");
            // Before `settle`: the commit's own write put its frames in the file.
            let expected = [1, 2, 66, 130, 131][commit_number];
            assert_eq!(count(&reader), expected, "after commit {commit_number}");
            // SAFETY: the connection is open and used only here.
            assert_eq!(unsafe { settle(writer.handle(), true) }, ffi::SQLITE_OK);
        }
        drop(writer);
        assert_eq!(count(&Connection::open(&path).expect("reopen")), 131);
        assert_eq!(integrity(&path), "ok");
    }

    /// Begins a transaction on `writer` larger than its page cache of 10 pages, so that
    /// SQLite spills pages into the log before any commit.
    fn spill(writer: &Connection) {
        writer
            .execute_batch("PRAGMA cache_size = 10")
            .expect("cache size");
        writer.execute_batch("BEGIN IMMEDIATE").expect("begin");
        writer
            .execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200) \
                 INSERT INTO t (body) SELECT randomblob(3000) FROM n",
                params![],
            )
            .expect("a transaction larger than the cache");
    }

    fn held_bytes(connection: &Connection) -> usize {
        // SAFETY: the connection is open and used only here.
        unsafe {
            let file = log_file(connection.handle()).expect("a log of this VFS");
            held(file).held().1.len()
        }
    }

    fn integrity(path: &std::path::Path) -> String {
        Connection::open(path)
            .expect("reopen")
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .expect("integrity check")
    }

    /// A new database with a table `t`, its directory, its path and a connection with the VFS.
    fn new_database() -> (tempfile::TempDir, std::path::PathBuf, Connection) {
        let directory = tempfile::tempdir().expect("temporary directory");
        let path = directory.path().join("log.db");
        let writer = batched(&path);
        writer
            .execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
            .expect("table");
        (directory, path, writer)
    }

    #[test]
    fn settling_a_transaction_that_did_not_commit_drops_its_held_frames() {
        let (_directory, path, writer) = new_database();
        spill(&writer);
        assert!(held_bytes(&writer) > 0, "the spilled frames are held");
        // SAFETY: the connection is open and used only here.
        assert_eq!(unsafe { settle(writer.handle(), false) }, ffi::SQLITE_OK);
        assert_eq!(held_bytes(&writer), 0);
        writer.execute_batch("ROLLBACK").expect("rollback");
        assert_eq!(count(&writer), 0);
        drop(writer);
        assert_eq!(integrity(&path), "ok");
    }

    #[test]
    fn another_connection_writes_safely_after_a_spilled_transaction_rolled_back() {
        let (_directory, path, writer) = new_database();
        spill(&writer);
        writer.execute_batch("ROLLBACK").expect("rollback");
        // SAFETY: the connection is open and used only here.
        assert_eq!(unsafe { settle(writer.handle(), false) }, ffi::SQLITE_OK);

        // Another connection commits where the rolled-back frames were, then the writer
        // reads and writes the log again.
        let other = Connection::open(&path).expect("the default VFS");
        other
            .execute("INSERT INTO t (body) VALUES (randomblob(100))", params![])
            .expect("another connection's commit");
        assert_eq!(count(&writer), 1);
        writer.execute_batch("BEGIN IMMEDIATE").expect("begin");
        writer
            .execute("INSERT INTO t (body) VALUES (randomblob(100))", params![])
            .expect("insert");
        commit(&writer);

        drop((writer, other));
        assert_eq!(count(&Connection::open(&path).expect("reopen")), 2);
        assert_eq!(integrity(&path), "ok");
    }
}
