//! A read-only open (what `tideline log info|dump|verify` do) of a log the process may only
//! read: a backup mounted read-only, where even root gets EROFS for any request of write
//! access, or files and a directory the operator can read but not write. Guards against the
//! read-only open asking for write access to the segments or the slots file, which failed
//! there ("Permission denied", "Read-only file system") although it writes nothing.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{check_log, opts, txn_for};
use tideline_wal::{FileStorage, MemStorage, Offset, SlotState, Storage, Wal, WalOptions};

/// Writes 200 records over several segments and a slot at offset 50, then closes the log.
fn write_log(storage: &Arc<dyn Storage>) {
    let wal = Wal::open(storage.clone(), opts(4096)).unwrap();
    for seq in 1..=200 {
        wal.append(txn_for(seq)).unwrap();
    }
    wal.create_slot("s", Offset::new(50).unwrap()).unwrap();
    assert!(wal.stats().segments.len() > 3);
    wal.close().unwrap();
}

fn read_only() -> WalOptions {
    WalOptions {
        read_only: true,
        verify_on_open: true,
        ..opts(4096)
    }
}

#[test]
fn a_read_only_open_reads_a_log_on_a_read_only_mount() {
    let mem = MemStorage::new();
    let storage: Arc<dyn Storage> = Arc::new(mem.clone());
    write_log(&storage);
    mem.mount_read_only();

    let wal = Wal::open(storage, read_only())
        .unwrap_or_else(|e| panic!("a read-only open of a log on a read-only mount failed: {e}"));
    assert_eq!(check_log(&wal, 200), Ok(200));
    assert_eq!(wal.verify().unwrap(), 200);
    let slots = wal.slots();
    assert_eq!(slots.len(), 1, "{slots:?}");
    assert_eq!(slots[0].name, "s");
    assert_eq!(slots[0].restart_offset, 50);
    assert_eq!(slots[0].state, SlotState::Active);
    wal.close().unwrap();
}

/// The files of `dir` this process holds open, with the access mode each was opened with
/// (`O_RDONLY`, `O_WRONLY` or `O_RDWR`), from `/proc/self/fd` and `/proc/self/fdinfo`.
fn open_files_under(dir: &Path) -> Vec<(PathBuf, i32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let fd = entry.unwrap().file_name();
        let link = Path::new("/proc/self/fd").join(&fd);
        let Ok(target) = std::fs::read_link(&link) else {
            continue; // closed since it was listed
        };
        if !target.starts_with(dir) {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(Path::new("/proc/self/fdinfo").join(&fd)) else {
            continue;
        };
        // Another thread may have closed the descriptor and reused its number meanwhile.
        if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
            continue;
        }
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| i32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap_or_else(|| panic!("no flags in fdinfo: {info}"));
        out.push((target, flags & libc::O_ACCMODE));
    }
    out
}

/// The same on real files, as root too (where permissions would not show it): the file a
/// reader of a read-only log holds is opened for reading only.
#[test]
fn a_reader_of_a_read_only_file_log_holds_its_segment_open_for_reading_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().canonicalize().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(&path).unwrap());
    write_log(&storage);

    let wal = Wal::open(storage, read_only()).unwrap();
    let mut reader = wal.read_from(Offset::FIRST).unwrap();
    assert!(reader.next_txn().unwrap().is_some());
    let files = open_files_under(&path);
    assert!(
        !files.is_empty(),
        "the reader holds no file of the log open"
    );
    for (file, mode) in files {
        assert_eq!(
            mode,
            libc::O_RDONLY,
            "{} is open with access mode {mode} in a read-only log: it asked for write access",
            file.display()
        );
    }
}
