//! What `abuse.rs` reads off the node besides its RSS: whether it has settled (its CPU time
//! has stopped growing), and its own count of the connections it refused, by reason.

use std::time::{Duration, Instant};

use super::cpus::cpu_time;
use crate::common::Node;

/// Waits until the node has settled (its CPU time grew by at most one clock tick in half a
/// second; at most 30 s): after the load its engine flushes and compacts in the background,
/// after the abuse it closes connections, and either would be counted against the tail.
pub fn wait_until_settled(pid: u32, what: &str) {
    let t0 = Instant::now();
    loop {
        let before = cpu_time(pid);
        std::thread::sleep(Duration::from_millis(500));
        let used = cpu_time(pid) - before;
        if used <= Duration::from_millis(10) {
            eprintln!(
                "abuse: node settled {what} in {:.1} s",
                t0.elapsed().as_secs_f64()
            );
            return;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "abuse: WARNING: the node is still busy {what} after 30 s ({} ms of CPU in the \
                 last 0.5 s)",
                used.as_millis()
            );
            return;
        }
    }
}

/// The node's `tideline_quic_refused_total` by reason, once the admin's sampler (every
/// second) has caught up: two reads a sampling period apart agree.
pub fn refused_by_reason(node: &Node) -> std::collections::BTreeMap<String, u64> {
    use std::io::{Read, Write};
    let admin = node.admin.as_deref().expect("the node runs its HTTP admin");
    let read = || {
        let mut s = std::net::TcpStream::connect(admin).expect("connect to the admin listener");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n").expect("request");
        let mut raw = String::new();
        s.read_to_string(&mut raw).expect("read /metrics");
        let mut by = std::collections::BTreeMap::new();
        for line in raw.lines() {
            let Some(rest) = line.strip_prefix("tideline_quic_refused_total{reason=\"") else {
                continue;
            };
            let (reason, value) = rest.split_once("\"} ").expect("a labelled sample");
            by.insert(reason.to_string(), value.trim().parse().expect("a count"));
        }
        by
    };
    let mut last = read();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(1100));
        let now = read();
        if now == last {
            break;
        }
        last = now;
    }
    last
}
