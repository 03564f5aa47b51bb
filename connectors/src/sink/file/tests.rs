//! The file sink on its own: lines, the position beside them, rotation, and what open does
//! after a crash at each point (a torn tail, data without its position, a rotation cut in
//! half). The crash tests' canary turns the cut off and must see duplicates.

use super::*;
use crate::sink::Item;
use tideline_wal::{Gtid, Offset, Op, Transaction};

fn uuid() -> uuid::Uuid {
    uuid::Uuid::from_bytes([7; 16])
}

/// A batch of `n` one-put transactions from offset `first`, checkpoint `cp{last}`.
fn batch(first: u64, n: u64) -> Batch {
    let items = (first..first + n)
        .map(|i| {
            Item::Txn(Transaction {
                offset: Offset::new(i).unwrap(),
                gtid: Gtid::new(uuid(), i).unwrap(),
                timestamp_us: 1_700_000_000_000_000,
                ops: vec![Op::Put {
                    tree: "t".into(),
                    key: format!("k{i}").into_bytes(),
                    value: b"v".to_vec(),
                    before: None,
                }],
            })
        })
        .collect();
    Batch {
        source: uuid(),
        items,
        checkpoint: format!("cp{}", first + n - 1).into_bytes(),
    }
}

fn sink(path: &Path) -> FileSink {
    FileSink::new(FileConfig::new(path), "test").unwrap()
}

fn open(s: &mut FileSink) -> Result<Option<Vec<u8>>, SinkError> {
    s.open_sync()
}

/// The GTID numbers of every line of the rotated files then the live file, in order.
fn gtids_in(path: &Path) -> Vec<u64> {
    let mut files = vec![];
    for n in 1.. {
        let p = position::suffixed(path, &n.to_string());
        if !p.exists() {
            break;
        }
        files.push(p);
    }
    files.push(path.to_path_buf());
    let mut out = vec![];
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let g = v["source"]["gtid"].as_str().unwrap();
            out.push(g.rsplit(':').next().unwrap().parse().unwrap());
        }
    }
    out
}

/// Runs "pipeline restarts" by hand: resumes after the stored checkpoint `cpN` and writes
/// batches of 3 up to offset `to`.
fn resume_and_write(s: &mut FileSink, to: u64) {
    let cp = open(s).unwrap();
    let mut next = cp.map_or(1, |c| {
        String::from_utf8(c).unwrap()[2..].parse::<u64>().unwrap() + 1
    });
    while next <= to {
        let n = 3.min(to - next + 1);
        s.write_sync(&batch(next, n)).unwrap();
        next += n;
    }
}

#[test]
fn lines_and_the_position_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("changes.jsonl");
    let mut s = sink(&path);
    assert_eq!(open(&mut s).unwrap(), None);
    s.write_sync(&batch(1, 3)).unwrap();
    drop(s);
    let mut s = sink(&path);
    assert_eq!(open(&mut s).unwrap(), Some(b"cp3".to_vec()));
    resume_and_write(&mut s, 10);
    assert_eq!(gtids_in(&path), (1..=10).collect::<Vec<_>>());
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["op"], "put");
    assert_eq!(first["key"], "k1");
    assert_eq!(first["source"]["offset"], 1);
}

#[test]
fn a_torn_tail_is_cut_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("changes.jsonl");
    let mut s = sink(&path);
    resume_and_write(&mut s, 4);
    drop(s);
    let stored = std::fs::metadata(&path).unwrap().len();
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"{\"op\":\"put\",\"tr").unwrap();
    drop(f);
    let mut s = sink(&path);
    assert_eq!(open(&mut s).unwrap(), Some(b"cp4".to_vec()));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), stored);
    resume_and_write(&mut s, 8);
    assert_eq!(gtids_in(&path), (1..=8).collect::<Vec<_>>());
}

/// Data synced but its position never stored (a kill between the two): the reopened sink
/// cuts it, the pipeline sends it again, and each envelope is there once. With the cut off
/// (the canary) the same crash leaves duplicates.
#[test]
fn data_without_its_position_is_cut_and_the_canary_sees_duplicates() {
    for cut in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("changes.jsonl");
        let mut s = sink(&path);
        resume_and_write(&mut s, 3);
        s.crash_before_next_position();
        assert!(s.write_sync(&batch(4, 3)).is_err());
        drop(s);
        let mut s = sink(&path);
        if !cut {
            s = s.without_cut_on_open();
        }
        resume_and_write(&mut s, 9);
        let got = gtids_in(&path);
        if cut {
            assert_eq!(got, (1..=9).collect::<Vec<_>>());
        } else {
            assert_eq!(
                got,
                [1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9],
                "the canary: without the cut, the crash duplicates"
            );
        }
    }
}

#[test]
fn rotation_numbers_files_in_order_and_a_half_done_rotation_is_undone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("changes.jsonl");
    let cfg = FileConfig {
        path: path.clone(),
        rotate_bytes: 600,
    };
    let mut s = FileSink::new(cfg.clone(), "test").unwrap();
    resume_and_write(&mut s, 30);
    assert!(
        position::suffixed(&path, "2").exists(),
        "rotated at least twice"
    );
    assert_eq!(gtids_in(&path), (1..=30).collect::<Vec<_>>());
    let segment = s.segment;
    drop(s);
    // A crash after a rotation's rename, before its position: the live file is gone.
    std::fs::rename(&path, position::suffixed(&path, &(segment + 1).to_string())).unwrap();
    let mut s = FileSink::new(cfg, "test").unwrap();
    resume_and_write(&mut s, 40);
    assert_eq!(gtids_in(&path), (1..=40).collect::<Vec<_>>());
}

#[test]
fn files_it_did_not_write_are_refused_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mine.jsonl");
    std::fs::write(&path, b"precious\n").unwrap();
    let e = open(&mut sink(&path)).unwrap_err();
    assert!(matches!(e, SinkError::Fatal(_)), "{e}");
    assert!(e.to_string().contains("not written by this sink"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious\n");
    let e = open(&mut sink(&dir.path().join("nodir/x.jsonl"))).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    // A damaged position is named, and nothing is cut.
    let other = dir.path().join("other.jsonl");
    let mut s = sink(&other);
    resume_and_write(&mut s, 3);
    drop(s);
    std::fs::write(position::path_of(&other), b"{garbage").unwrap();
    let e = open(&mut sink(&other)).unwrap_err();
    assert!(e.to_string().contains("is damaged"), "{e}");
}

/// Two sinks on one file would interleave their lines and cut back each other's: the second
/// waits (`Retry` naming the first) until the first is gone, then resumes where it stopped.
#[test]
fn a_second_sink_on_the_same_file_waits_until_the_first_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("changes.jsonl");
    let mut first = sink(&path);
    assert_eq!(open(&mut first).unwrap(), None);
    first.write_sync(&batch(1, 3)).unwrap();
    let mut second = sink(&path);
    let e = open(&mut second).expect_err("the files are the first sink's");
    assert!(
        matches!(&e, SinkError::Retry(m) if m.contains("another connector")
            && m.contains(&format!("PID {}", std::process::id()))),
        "{e}"
    );
    first.write_sync(&batch(4, 2)).unwrap();
    drop(first);
    assert_eq!(open(&mut second).unwrap().as_deref(), Some(&b"cp5"[..]));
    second.write_sync(&batch(6, 1)).unwrap();
    assert_eq!(gtids_in(&path), (1..=6).collect::<Vec<_>>());
}

/// The position beside the files is one pipeline's checkpoint. A pipeline that found another
/// pipeline's position there took it for its own: it resumed after the other's last offset
/// (with the other's filter) and never wrote what came before. It must be refused, naming
/// both pipelines, with the files left exactly as they were (a torn tail included), and the
/// owner must still resume where it stopped.
#[test]
fn a_position_written_by_another_pipeline_is_refused_and_nothing_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.jsonl");
    let mut b = FileSink::new(FileConfig::new(&path), "b").unwrap();
    resume_and_write(&mut b, 4);
    drop(b);
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"{\"op\":\"put\",\"tr").unwrap();
    drop(f);
    let data = std::fs::read(&path).unwrap();
    let pos = std::fs::read(position::path_of(&path)).unwrap();

    let mut a = FileSink::new(FileConfig::new(&path), "a").unwrap();
    let e = open(&mut a).unwrap_err();
    let m = e.to_string();
    assert!(matches!(e, SinkError::Fatal(_)), "{e}");
    assert!(
        m.contains("pipeline `b`") && m.contains("pipeline `a`"),
        "names both: {m}"
    );
    assert!(
        m.contains("its own") && m.contains("move"),
        "says what to do: {m}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), data, "the data is untouched");
    assert_eq!(
        std::fs::read(position::path_of(&path)).unwrap(),
        pos,
        "the position is untouched"
    );
    // The refused sink let go of the files: their owner resumes where it stopped.
    let mut b = FileSink::new(FileConfig::new(&path), "b").unwrap();
    assert_eq!(open(&mut b).unwrap().as_deref(), Some(&b"cp4"[..]));
    resume_and_write(&mut b, 6);
    assert_eq!(gtids_in(&path), (1..=6).collect::<Vec<_>>());
}

/// A rotation whose position cannot be stored (a full disk holds the sink exactly there) must
/// not leave `.N+1` behind: the docs tell operators that rotated files are theirs to
/// compress, ship or delete, and one freeing space would delete it, after which the next
/// write found the live file "cut or replaced" and stopped for good (or, if it was only
/// copied away, its lines came out again in the next `.N+1`). Once the position can be
/// stored again, the sink goes on with every change once, in order.
#[test]
fn a_rotation_whose_position_fails_is_undone_before_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("changes.jsonl");
    let cfg = FileConfig {
        path: path.clone(),
        rotate_bytes: 600,
    };
    let mut s = FileSink::new(cfg, "test").unwrap();
    assert_eq!(open(&mut s).unwrap(), None);
    let mut next = 1;
    while s.stored_bytes < 600 {
        s.write_sync(&batch(next, 3)).unwrap();
        next += 3;
    }
    let rotated = position::suffixed(&path, &(s.segment + 1).to_string());
    // The position's temporary file cannot be created: the next write's rotation fails.
    let blocker = position::suffixed(&position::path_of(&path), "tmp");
    std::fs::create_dir(&blocker).unwrap();
    let e = s
        .write_sync(&batch(next, 3))
        .expect_err("the position cannot be stored");
    assert!(
        !rotated.exists(),
        "{} is visible as a rotated file although the rotation failed ({e}); an operator \
         freeing space may delete it",
        rotated.display()
    );
    // What an operator freeing space would do: delete the rotated file, if any, then retry.
    let _ = std::fs::remove_file(&rotated);
    std::fs::remove_dir(&blocker).unwrap();
    s.write_sync(&batch(next, 3))
        .expect("the sink goes on once the position can be stored");
    next += 3;
    resume_and_write(&mut s, next + 5);
    assert_eq!(gtids_in(&path), (1..=next + 5).collect::<Vec<_>>());
}

/// Every `*.lock` file in `dir` and in its subdirectories (one level down).
fn locks_in(dir: &Path) -> Vec<PathBuf> {
    let entries = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    };
    let top = entries(dir);
    let below = top.iter().filter(|p| p.is_dir()).flat_map(|d| entries(d));
    top.iter()
        .cloned()
        .chain(below)
        .filter(|p| p.to_string_lossy().ends_with(".lock"))
        .collect()
}

/// `sink file --out DIR` (an existing directory, or a path ending in `/`) took `DIR.lock`
/// (or `DIR/.lock`, a hidden file in the user's directory) and then refused with the words
/// for a foreign file ("was not written by this sink"). A directory is refused as one,
/// before any lock, both when the sink is made and when it opens (the directory may appear
/// in between).
#[test]
fn a_directory_path_is_refused_as_one_before_any_lock() {
    let dir = tempfile::tempdir().unwrap();
    let later = dir.path().join("later");
    let mut s = sink(&later);
    std::fs::create_dir(&later).unwrap();
    let e = open(&mut s).expect_err("a directory is no file to append to");
    assert!(
        matches!(&e, SinkError::Fatal(m) if m.contains("is a directory")
            && m.contains(&format!("{}/changes.jsonl", later.display()))),
        "{e}"
    );
    assert_eq!(locks_in(dir.path()), Vec::<PathBuf>::new(), "{e}");

    let existing = dir.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    let slash = format!("{}/", dir.path().join("nosuch").display());
    let dot = format!("{}/.", existing.display());
    for path in [existing.display().to_string(), slash, dot] {
        let e = FileSink::new(FileConfig::new(&path), "test").expect_err(&path);
        assert!(
            matches!(&e, SinkError::Fatal(m) if m.contains("is a directory")),
            "{path}: {e}"
        );
    }
    assert_eq!(locks_in(dir.path()), Vec::<PathBuf>::new());
}
