//! A real full disk under a running node: `tideline serve` with its data directory on a 16 MiB
//! tmpfs (mounted by the test; root only), the rest of the space taken by a filler file but
//! for 1 MiB, a client committing 8 KiB puts until one fails.
//!
//! What users rely on (OPERATIONS.md, "fsync failure (fail-stop)"): the node refuses the write,
//! stops by itself with exit code 2 and one stderr line that names the full disk; nothing
//! acknowledged is lost; after space is freed a restart serves every acknowledged put and takes
//! writes again. The protection itself (poison on a failed write) has its canary in
//! `wal/tests/disk_full.rs` and `wal/tests/write_failure.rs`; the node binary has no test-only
//! switches.
//!
//! Needs `mount -t tmpfs` (root, or CAP_SYS_ADMIN). Without it the test skips with a loud line,
//! except under CI (`CI` set), where it fails.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Node, scan, status};

struct Tmpfs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Tmpfs {
    fn mount_or_skip(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("create the mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return Some(Tmpfs { _dir: dir, mnt }),
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => format!("cannot run mount: {e}"),
        };
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the real full-disk test: mount -t tmpfs failed: {why} (run as root)"
        );
        eprintln!("SKIPPED: the node's full-disk test needs to mount a tmpfs ({why}); run as root");
        None
    }

    fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// Takes all the free space under `dir` but `leave` bytes, in one file.
fn fill_but(dir: &Path, leave: u64) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create the filler");
    let chunk = vec![0u8; 64 << 10];
    let mut len = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => len += n as u64,
            Err(e) if e.raw_os_error() == Some(libc_enospc()) => break,
            Err(e) => panic!("filling the tmpfs: {e}"),
        }
    }
    f.set_len(len.saturating_sub(leave))
        .expect("shrink the filler");
    f.sync_all().expect("sync the filler");
    path
}

/// ENOSPC, the same number on every Unix this runs on.
fn libc_enospc() -> i32 {
    28
}

#[test]
fn a_full_disk_stops_the_node_clearly_and_loses_no_acknowledged_write() {
    let Some(fs) = Tmpfs::mount_or_skip("16m") else {
        return;
    };
    let data = fs.path().join("n");
    let mut node = Node::start(&data, 0);
    let port = node.port();
    let filler = fill_but(fs.path(), 1 << 20);

    // Commit 8 KiB puts until the node refuses one.
    let (addr, secrets) = (node.addr.clone(), node.secrets());
    let value = vec![b'v'; 8 << 10];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let (acked, error) = rt.block_on(async {
        let tls = tideline_stream::tls::load_client_dir(&secrets).expect("client secrets");
        let client =
            tideline_stream::Client::connect(&addr, tideline_stream::ClientConfig::new(tls))
                .await
                .expect("connect");
        let mut acked = 0u64;
        loop {
            let put = tideline_stream::WriteOp::Put {
                tree: "default".into(),
                key: format!("k{acked:06}").into_bytes(),
                value: value.clone(),
            };
            match client.commit(vec![put]).await {
                Ok(_) => acked += 1,
                Err(e) => return (acked, e.to_string()),
            }
            assert!(acked < 100_000, "1 MiB of space took 100,000 puts of 8 KiB");
        }
    });
    eprintln!("{acked} puts acknowledged, then: {error}");
    assert!(acked > 0, "nothing was acknowledged before the disk filled");

    // The node stops by itself, exit code 2, naming the cause.
    let exit = node
        .wait_timeout(Duration::from_secs(30))
        .expect("the node kept running on a full disk (fail-stop: it must exit)");
    assert_eq!(exit.code(), Some(2), "fail-stop exits 2: {exit:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let lines = node.stderr_lines();
        if let Some(l) = lines.iter().find(|l| l.starts_with("error: fail-stop")) {
            break l.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no `error: fail-stop` line on stderr: {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        line.contains("No space left on device"),
        "the fail-stop line must name the full disk: {line}"
    );

    // Space is freed; the node restarts with every acknowledged put, and takes writes again.
    std::fs::remove_file(&filler).expect("remove the filler");
    let node = Node::start(&data, port);
    let keys: Vec<String> = scan(&node, "default")
        .lines()
        .map(|l| l.split('\t').next().unwrap_or_default().to_string())
        .collect();
    let n = keys.len() as u64;
    assert!(
        n >= acked && n <= acked + 1,
        "{acked} acknowledged, {n} kept (at most the refused one more)"
    );
    let want: Vec<String> = (0..n).map(|i| format!("k{i:06}")).collect();
    assert_eq!(keys, want, "the kept puts have a gap");
    assert!(node.run(&["put", "after", "1"]).status.success());
    assert_eq!(status(&node)["last_offset"], n + 1);
}
