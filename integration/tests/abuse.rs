//! Abuse of a real `tideline serve` while a legitimate tail runs. At once (in full, as
//! `scripts/abuse` runs it; CI runs every kind scaled down, [`CI`]):
//!
//! - 1,000 slow connections: each finishes TLS and trickles a genuine `Hello` one byte every
//!   100 ms (too slow to finish within the 1 s hello timeout, let alone the 5 s handshake
//!   timeout);
//! - 10,000 stream opens on unauthenticated connections (100 connections × 100 attempts: one
//!   stream each is granted, the rest never are) and 10,000 on authenticated ones (10
//!   connections × 1,000 streams, each finished empty or carrying a garbage message);
//! - 200 `Hello`s with forged or random tokens (random, the real one with one character
//!   changed, empty, and 5,000 characters long);
//! - 100,000 garbage datagrams (random bytes; a quarter shaped like QUIC Initials);
//! - oversized frames: a 1 GiB message announced on an authenticated stream, a 1 MiB `Hello`
//!   on an unauthenticated one;
//! - 20 consumers that subscribe, take their first batch and never read again.
//!
//! Checks: every slow, unauthenticated and forged connection is refused or closed, with the
//! close code docs/PROTOCOL.md gives, within the handshake timeout (plus stated scheduling
//! slack); every garbage message and oversized frame gets `Error { InvalidRequest }` at once;
//! the node's RSS stays under a stated cap; a legitimate `tideline tail` run again and again
//! during the abuse delivers every transaction each time, and its throughput beside the
//! abuse is printed as a ratio of its throughput alone (the CI test does not assert the ratio:
//! two shared cores make it noisy; `scripts/abuse` runs the `#[ignore]`d variant, which
//! asserts ≥ 90% on a release build), with the node's own count of refusals by reason.
//!
//! Where things run, and why (`abuse_peers::cpus`): the goal is what the abuse costs *the
//! node*. A real attacker spends its own machines' CPU on its handshakes, trickles and
//! datagrams; here the attack generator is this test process, on the node's machine. The runs
//! that report the ratio (`scripts/abuse`, the two `#[ignore]`d tests) therefore pin the node
//! and the legitimate tail to one fixed set of CPUs in both phases (alone and under abuse) and
//! the attack generator (its runtime, datagram thread and RSS sampler) to a disjoint set; on a
//! two-CPU machine the node and the tail share CPU 0 and the attackers have CPU 1. With fewer
//! than two usable CPUs they say so loudly and share every CPU as before. The CI-scale test
//! does not pin: its ratio is not asserted, and a debug node on one CPU would stretch the
//! timings it checks. Each run also prints the node's own CPU time alone and under abuse, so
//! that the abuse's cost to the node can be read without the tail's rate.
//!
//! The ratio's rule: the tail's rate alone is taken on both sides of the abuse (at least three
//! rounds and two seconds before it, the same after it, each once the node has settled: no
//! more than a clock tick of CPU in half a second), pooled; its rate under abuse counts only
//! the rounds that ended before the abuse did (the one running when it ended was partly
//! alone). Its canary takes a quarter of a CPU from the node's side while the abuse lasts and
//! expects the ratio to fall below 90%.
//!
//! Guards against any of these peers holding the node's memory or time without bound, or
//! crowding out real clients. The canary of the admission side is
//! `stream/tests/handshake_flood.rs`; the canary of the consumer buffer is
//! `stalled_consumers.rs`.

mod abuse_peers;
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use abuse_peers::cpus::{Placement, cpu_time};
use abuse_peers::observe::{refused_by_reason, wait_until_settled};
use abuse_peers::tail::{alone_rounds, load_log, tail_rounds};
use abuse_peers::{
    Tally, authenticated_opens, forged_tokens, garbage_datagrams, raw_endpoint, slow_connections,
    unauthenticated_opens,
};
use common::{Node, rss_kib};
use rand::Rng;
use tideline_stream::{Client, ClientConfig, Event, Start, tls};

/// Consumers that subscribe and never read.
const NEVER_READING: u64 = 20;
/// Cap on the node's RSS growth during the abuse, in KiB: the never-reading consumers'
/// buffers (20 × 4 MiB), the handshakes in progress (at most 256, each with a 64 KiB receive
/// window and its TLS and quinn state, ~256 KiB together: 64 MiB), and 64 MiB for the
/// authenticated connections' streams, the legitimate tail and the allocator.
const RSS_CAP_GROWTH_KIB: u64 = NEVER_READING
    * ((tideline_stream::CONSUMER_BUFFER_BYTES_DEFAULT as u64) >> 10)
    + (64 << 10)
    + (64 << 10);

struct Scale {
    slow: usize,
    unauth_conns: usize,
    unauth_opens: usize,
    auth_conns: usize,
    auth_opens: usize,
    forged: usize,
    datagrams: usize,
    /// Transactions (of 10 puts of 100 bytes) the legitimate tail reads each round.
    tail_txns: u64,
}

/// The abuse of the issue, in full: run by `scripts/abuse`.
const FULL: Scale = Scale {
    slow: 1000,
    unauth_conns: 100,
    unauth_opens: 100,
    auth_conns: 10,
    auth_opens: 1000,
    forged: 200,
    datagrams: 100_000,
    tail_txns: 2_000,
};

/// Every kind of abuse, scaled for CI (a debug node on two cores shared with other tests):
/// still more slow and silent peers (320) than the node's handshake budget (256), so that the
/// budget refuses and evicts while the legitimate tail connects again and again.
const CI: Scale = Scale {
    slow: 300,
    unauth_conns: 20,
    unauth_opens: 100,
    auth_conns: 2,
    auth_opens: 500,
    forged: 40,
    datagrams: 20_000,
    tail_txns: 500,
};

/// Sets its flags when dropped (also while unwinding).
struct StopOnDrop<'a>([&'a AtomicBool; 2]);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        for flag in self.0 {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// Everything the run measured.
struct Report {
    tail_alone_txn_s: f64,
    tail_abused_txn_s: f64,
    rss_growth_kib: u64,
}

/// Runs the abuse at `scale` with the processes placed by `placement`; `burn`: the canary's
/// share of a CPU taken from the node's side while the abuse lasts.
fn run(scale: &Scale, placement: Placement, burn: Option<f64>) -> Report {
    let seed: u64 = std::env::var("TIDELINE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("abuse: seed {seed} (replay with TIDELINE_TEST_SEED={seed})");
    eprintln!("abuse: {}", placement.describe());
    // The node, the log's loader and the tail rounds alone are started from this thread, and
    // inherit its CPUs: the node's side.
    let _restore = placement.node_side_for_now();
    let dir = tempfile::tempdir().expect("tempdir");
    // Async durability: the log loads fast; nothing here depends on it.
    // The HTTP admin: the node's own count of the connections it refused, by reason.
    let node = Node::start_with(
        &dir.path().join("n"),
        0,
        &["--durability", "async", "--http", "127.0.0.1:0"],
    );
    load_log(&node, scale.tail_txns);
    let addr: SocketAddr = node.addr.parse().expect("the node's address");
    let token = tls::load_client_dir(&node.secrets())
        .expect("secrets")
        .token;

    // The legitimate tail alone, before the abuse (and again after it, below).
    let pid = node.pid();
    wait_until_settled(pid, "after the load");
    let node_cpu_before_alone = cpu_time(pid);
    let (rounds_before, alone_before) = alone_rounds(&node, scale.tail_txns);
    let node_cpu_alone_before = cpu_time(pid) - node_cpu_before_alone;

    let rss_before = rss_kib(pid);
    let node_cpu_before_abuse = cpu_time(pid);
    let abuse_start = Instant::now();
    let peak = Arc::new(AtomicU64::new(rss_before));
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start({
            let placement = placement.clone();
            move || placement.attack_side()
        })
        .enable_all()
        .build()
        .expect("runtime");
    let abuse_done = AtomicBool::new(false);
    let (tail, outcome) = std::thread::scope(|s| {
        // A failed check below unwinds through here: stop the tail and the sampler, or the
        // scope would wait for them for ever.
        let _stop = StopOnDrop([&abuse_done, &*stop]);
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            let placement = &placement;
            s.spawn(move || {
                // Measuring, not serving: off the node's CPUs.
                placement.attack_side();
                while !stop.load(Ordering::SeqCst) {
                    peak.fetch_max(rss_kib(pid), Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        let tail = s.spawn(|| {
            placement.node_side();
            tail_rounds(&node, scale.tail_txns, &abuse_done)
        });
        // The canary's load: the node's side loses `share` of a CPU while the abuse lasts.
        let burner = burn.map(|share| {
            let (placement, abuse_done) = (&placement, &abuse_done);
            s.spawn(move || {
                placement.node_side();
                abuse_peers::cpus::burn(share, abuse_done);
            })
        });
        let datagrams = s.spawn(|| {
            placement.attack_side();
            garbage_datagrams(addr, scale.datagrams, seed)
        });
        // This thread drives the attack (`block_on`): the attack generator's side.
        placement.attack_side();
        let outcome = rt.block_on(async {
            let ep = raw_endpoint(&node);
            // Never-reading consumers: subscribed, first batch taken, then left alone.
            let mut cfg =
                ClientConfig::new(tls::load_client_dir(&node.secrets()).expect("secrets"));
            cfg.connect_timeout = Duration::from_secs(30);
            let mut never_reading = Vec::new();
            for i in 0..NEVER_READING {
                let client = Client::connect(&node.addr, cfg.clone())
                    .await
                    .unwrap_or_else(|e| panic!("never-reading consumer {i}: {e}"));
                let mut sub = client
                    .subscribe(Start::Earliest, None, None, None)
                    .await
                    .expect("subscribe");
                loop {
                    match sub.next().await {
                        Ok(Some(Event::Batch(_))) => break,
                        Ok(Some(_)) => {}
                        other => panic!("never-reading consumer {i}: no first batch: {other:?}"),
                    }
                }
                never_reading.push((client, sub));
            }
            // The floods of unauthenticated peers first, together; then, once their handshakes
            // no longer crowd the budget (where a forged hello or an authenticating peer could
            // be evicted before its answer, which would prove nothing), forged tokens and
            // authenticated stream opens, together.
            let slow = tokio::spawn(slow_connections(
                ep.clone(),
                addr,
                scale.slow,
                token.clone(),
            ));
            let unauth = tokio::spawn(unauthenticated_opens(
                ep.clone(),
                addr,
                scale.unauth_conns,
                scale.unauth_opens,
            ));
            let slow = slow.await.expect("slow connections");
            let (unauth, granted) = unauth.await.expect("unauthenticated opens");
            let forged = tokio::spawn(forged_tokens(
                ep.clone(),
                addr,
                scale.forged,
                token.clone(),
                seed,
            ));
            let auth = tokio::spawn(authenticated_opens(
                ep.clone(),
                addr,
                scale.auth_conns,
                scale.auth_opens,
                token.clone(),
                seed,
            ));
            let forged = forged.await.expect("forged tokens");
            let auth = auth.await.expect("authenticated opens");
            // A real client still gets in and is served after all that.
            let client = Client::connect(&node.addr, cfg.clone())
                .await
                .expect("a real client connects after the abuse");
            client.status().await.expect("status after the abuse");
            drop(never_reading);
            (slow, unauth, granted, forged, auth)
        });
        let sent = datagrams.join().expect("datagrams");
        abuse_done.store(true, Ordering::SeqCst);
        let abuse_end = Instant::now();
        if let Some(burner) = burner {
            burner.join().expect("the canary's load");
        }
        let tail = tail.join().expect("legitimate tail");
        stop.store(true, Ordering::SeqCst);
        sampler
            .join()
            .expect("RSS sampler (it fails when /proc cannot be read)");
        (tail, (outcome, sent, abuse_end))
    });
    let node_cpu_abused = cpu_time(pid) - node_cpu_before_abuse;
    let abuse_wall = abuse_start.elapsed();
    // The legitimate tail alone again, once every abusive peer is gone: the alone rate is
    // taken on both sides of the abuse, so that a machine whose load changes during the run
    // does not favour either phase.
    wait_until_settled(pid, "after the abuse");
    let node_cpu_before_after = cpu_time(pid);
    let (rounds_after, alone_after) = alone_rounds(&node, scale.tail_txns);
    let node_cpu_alone_after = cpu_time(pid) - node_cpu_before_after;
    let node_cpu_alone = node_cpu_alone_before + node_cpu_alone_after;
    let rounds = rounds_before + rounds_after;
    let tail_alone = (scale.tail_txns * rounds) as f64 / (alone_before + alone_after).as_secs_f64();
    let txns_alone = scale.tail_txns * rounds;
    let rate = |rounds: u64, took: Duration| (scale.tail_txns * rounds) as f64 / took.as_secs_f64();
    let ((slow, unauth, granted, forged, auth_opened), datagrams, abuse_end) = outcome;
    let rss_peak = peak.load(Ordering::SeqCst).max(rss_kib(pid));
    let growth = rss_peak.saturating_sub(rss_before);
    eprintln!("abuse: slow connections {slow:?}");
    eprintln!(
        "abuse: unauthenticated stream opens: {} attempts on {unauth:?}; most granted on one connection: {granted}",
        scale.unauth_conns * scale.unauth_opens
    );
    eprintln!("abuse: forged tokens {forged:?}");
    eprintln!(
        "abuse: authenticated streams opened {auth_opened}; garbage datagrams sent {datagrams}"
    );
    eprintln!(
        "abuse: node RSS {rss_before} KiB -> peak {rss_peak} KiB (+{growth} KiB; cap +{RSS_CAP_GROWTH_KIB} KiB)"
    );
    // Under abuse: the rounds that ended before the abuse did (the one running when it ended
    // was partly alone, so it is left out).
    let abused: Vec<Duration> = tail
        .rounds
        .iter()
        .filter(|(ended, _)| *ended <= abuse_end)
        .map(|(_, took)| *took)
        .collect();
    assert!(
        !abused.is_empty(),
        "no legitimate tail round ran to its end within the abuse: nothing to compare"
    );
    // Each round of the tail while the abuse ran: when it ended and how long it took, so
    // that a low ratio shows whether every round was slower or one was held up.
    let each: Vec<String> = tail
        .rounds
        .iter()
        .map(|(ended, took)| {
            format!(
                "+{:.2}s {} ms",
                ended.saturating_duration_since(abuse_start).as_secs_f64(),
                took.as_millis()
            )
        })
        .collect();
    eprintln!("abuse: the tail's rounds under abuse (ended, took): {each:?}");
    let abused_rounds = abused.len() as u64;
    let tail_abused = rate(abused_rounds, abused.iter().sum());
    eprintln!(
        "abuse: legitimate tail alone {tail_alone:.0} txn/s ({rounds} rounds: {:.0} txn/s in \
         {rounds_before} before the abuse, {:.0} in {rounds_after} after), during the abuse \
         {tail_abused:.0} txn/s ({abused_rounds} rounds within it, {} in all, {} failed): {:.2}x",
        rate(rounds_before, alone_before),
        rate(rounds_after, alone_after),
        tail.rounds.len(),
        tail.failed.len(),
        tail_abused / tail_alone
    );
    for e in &tail.failed {
        eprintln!("abuse: a legitimate tail round failed {e}");
    }
    eprintln!(
        "abuse: node CPU per transaction alone: {:.1} µs before the abuse, {:.1} µs after",
        node_cpu_alone_before.as_secs_f64() * 1e6 / (scale.tail_txns * rounds_before) as f64,
        node_cpu_alone_after.as_secs_f64() * 1e6 / (scale.tail_txns * rounds_after) as f64
    );
    // What the abuse cost the node: its CPU time during the abuse beyond what serving the
    // tail's transactions cost it alone (per transaction).
    let txns_abused = scale.tail_txns * tail.rounds.len() as u64;
    let tail_share = node_cpu_alone.mul_f64(txns_abused as f64 / txns_alone as f64);
    eprintln!(
        "abuse: node CPU alone {} ms for {txns_alone} txns ({:.1} µs/txn); during the abuse {} \
         ms in {:.1} s for {txns_abused} txns: {} ms beyond the tail's share",
        node_cpu_alone.as_millis(),
        node_cpu_alone.as_secs_f64() * 1e6 / txns_alone as f64,
        node_cpu_abused.as_millis(),
        abuse_wall.as_secs_f64(),
        node_cpu_abused.saturating_sub(tail_share).as_millis()
    );
    let refused = refused_by_reason(&node);
    eprintln!("abuse: the node refused, by reason: {refused:?}");
    assert!(
        tail.failed.is_empty(),
        "{} legitimate tail rounds failed during the abuse (above)",
        tail.failed.len()
    );
    assert_eq!(slow.attempts as usize, scale.slow);
    assert_eq!(unauth.attempts as usize, scale.unauth_conns);
    let (unauth_attempts, unauth_refused_at_door) = (unauth.attempts, unauth.refused_in_handshake);
    assert_eq!(forged.attempts as usize, scale.forged);
    // At most one stream before `Hello`. When every stream-opening peer was refused at the
    // door (they arrive with the slow peers' burst, while the budget is full of handshakes
    // younger than the grace period: seen once, at 23:41 on 2026-11-30) none got a stream and
    // there was nothing to check: said loudly (stream/tests/handshake_flood.rs checks it
    // in-process every time).
    assert!(
        granted <= 1,
        "an unauthenticated connection was granted {granted} streams"
    );
    if granted == 0 {
        assert_eq!(
            unauth_refused_at_door, unauth_attempts,
            "no unauthenticated peer was granted its one stream, yet not all were refused"
        );
        eprintln!(
            "abuse: WARNING: all {unauth_attempts} stream-opening peers were refused during the \
             handshake: the one-stream check did not run in this run"
        );
    }
    // Slow and silent unauthenticated peers end by the handshake timeout (close code 2) or by
    // eviction (3, at whatever stage of TLS the node's side was), each within the bound
    // `ended_by_node` checks, or are refused during the handshake.
    let mut all = Tally::default();
    all.merge(slow);
    all.merge(unauth);
    // Every slow and silent peer never authenticates: the node must have ended each one
    // (refused at the door, evicted, or timed out), whether or not the peer heard of it. The
    // node's counts also hold the legitimate tail's refused attempts, hence `>=`.
    let at_budget: u64 = ["handshakes_full", "handshake_evicted", "handshake_timeout"]
        .iter()
        .map(|r| refused.get(*r).copied().unwrap_or(0))
        .sum();
    assert!(
        at_budget >= all.attempts,
        "the node ended {at_budget} unauthenticated connections, fewer than the {} slow and \
         silent peers ({} of them never heard back): {refused:?}",
        all.attempts,
        all.unanswered
    );
    for code in all.closed.keys() {
        assert!(
            [2, 3].contains(code),
            "an unauthenticated peer was closed with code {code}: {:?}",
            all.closed
        );
    }
    assert!(
        all.closed.get(&2).copied().unwrap_or(0) + all.closed.get(&3).copied().unwrap_or(0) > 0,
        "no unauthenticated peer was closed by the timeout or by eviction: {:?}",
        all.closed
    );
    assert_eq!(
        auth_opened as usize,
        scale.auth_conns * (scale.auth_opens + 1)
    );
    assert!(
        growth <= RSS_CAP_GROWTH_KIB,
        "node RSS grew by {growth} KiB under abuse, over the {RSS_CAP_GROWTH_KIB} KiB cap"
    );
    Report {
        tail_alone_txn_s: tail_alone,
        tail_abused_txn_s: tail_abused,
        rss_growth_kib: growth,
    }
}

/// Every kind of abuse at CI scale; everything but the throughput ratio is asserted.
#[test]
fn abusive_peers_are_refused_in_time_and_a_legitimate_tail_keeps_going() {
    // Not pinned: a debug node on one CPU would stretch the handshake timings this test checks,
    // and its ratio is not asserted.
    run(&CI, Placement::everywhere(), None);
}

/// `scripts/abuse`: the full abuse of the issue, everything but the ratio asserted.
#[test]
#[ignore = "1,100 handshakes and 100,000 datagrams: run by scripts/abuse on a release build"]
fn abusive_peers_in_full_are_refused_in_time_and_a_legitimate_tail_keeps_going() {
    run(&FULL, Placement::split(), None);
}

/// `scripts/abuse`: the same run on a release build, asserting that the legitimate tail keeps
/// at least 90% of its throughput during the abuse.
#[test]
#[ignore = "a throughput ratio: run by scripts/abuse on a release build"]
fn a_legitimate_tail_keeps_90_percent_of_its_throughput_under_abuse() {
    let scale = Scale {
        tail_txns: 20_000,
        ..FULL
    };
    let r = run(&scale, Placement::split(), None);
    let ratio = r.tail_abused_txn_s / r.tail_alone_txn_s;
    eprintln!(
        "abuse ratio {ratio:.3} (alone {:.0} txn/s, abused {:.0} txn/s, RSS +{} KiB)",
        r.tail_alone_txn_s, r.tail_abused_txn_s, r.rss_growth_kib
    );
    assert!(
        ratio >= 0.9,
        "the legitimate tail kept {:.0}% of its throughput under abuse (goal ≥ 90%)",
        ratio * 100.0
    );
}

/// Canary of the ratio (`scripts/abuse`): the same run, with a quarter of the node's CPU taken
/// by a load on the node's side while the abuse lasts, as a node that spent that much more on
/// the abuse would lose it. The ratio must fall below 90%; if it does not, the measurement
/// cannot see the node slowed and the 90% test proves nothing.
#[test]
#[ignore = "a throughput ratio: run by scripts/abuse on a release build"]
fn canary_the_ratio_falls_below_90_percent_when_the_node_loses_a_quarter_of_its_cpu() {
    let scale = Scale {
        tail_txns: 20_000,
        ..FULL
    };
    let r = run(&scale, Placement::split(), Some(0.25));
    let ratio = r.tail_abused_txn_s / r.tail_alone_txn_s;
    eprintln!(
        "abuse canary ratio {ratio:.3} (alone {:.0} txn/s, abused {:.0} txn/s)",
        r.tail_alone_txn_s, r.tail_abused_txn_s
    );
    assert!(
        ratio < 0.9,
        "with a quarter of the node's CPU taken during the abuse the tail still kept {:.0}% of \
         its throughput: the ratio cannot see a slowed node",
        ratio * 100.0
    );
}

/// Diagnostic (`scripts/abuse`, printed, nothing asserted beyond the attackers' own checks):
/// the node's CPU time for each kind of abuse at full scale, run one at a time with nothing
/// else going on, so that what each kind costs the node can be compared (docs/reliability.md).
/// The node is pinned as in the ratio runs.
#[test]
#[ignore = "diagnostic: run by scripts/abuse on a release build"]
fn the_node_cpu_each_kind_of_abuse_costs() {
    let placement = Placement::split();
    eprintln!("abuse cost: {}", placement.describe());
    let _restore = placement.node_side_for_now();
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start_with(&dir.path().join("n"), 0, &["--durability", "async"]);
    load_log(&node, 20_000);
    let addr: SocketAddr = node.addr.parse().expect("the node's address");
    let token = tls::load_client_dir(&node.secrets())
        .expect("secrets")
        .token;
    let pid = node.pid();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start({
            let placement = placement.clone();
            move || placement.attack_side()
        })
        .enable_all()
        .build()
        .expect("runtime");
    let seed: u64 = rand::rng().random();
    // `TIDELINE_ABUSE_COST_ONLY=WORD`: only the kinds whose name holds WORD (e.g. `forged`),
    // each `TIDELINE_ABUSE_COST_TIMES` times (default 1): a clean profile of one kind.
    let only = std::env::var("TIDELINE_ABUSE_COST_ONLY").unwrap_or_default();
    let times: usize = std::env::var("TIDELINE_ABUSE_COST_TIMES")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let measure = |what: &str, attack: &dyn Fn()| {
        if !what.contains(only.as_str()) {
            return;
        }
        let (cpu0, t0) = (cpu_time(pid), Instant::now());
        for _ in 1..times {
            attack();
        }
        attack();
        // Let the node finish its closes and timers (its idle connections tick on).
        std::thread::sleep(Duration::from_millis(500));
        eprintln!(
            "abuse cost: {what}: node CPU {} ms in {:.1} s",
            (cpu_time(pid) - cpu0).as_millis(),
            t0.elapsed().as_secs_f64()
        );
    };
    measure("nothing (0.5 s idle)", &|| {});
    let ep = rt.block_on(async { raw_endpoint(&node) });
    measure("1,000 slow connections", &|| {
        let t = rt.block_on(slow_connections(ep.clone(), addr, FULL.slow, token.clone()));
        eprintln!("abuse cost:   {t:?}");
    });
    measure("100 x 100 unauthenticated stream opens", &|| {
        let (t, _) = rt.block_on(unauthenticated_opens(
            ep.clone(),
            addr,
            FULL.unauth_conns,
            FULL.unauth_opens,
        ));
        eprintln!("abuse cost:   {t:?}");
    });
    measure("200 forged tokens", &|| {
        let t = rt.block_on(forged_tokens(
            ep.clone(),
            addr,
            FULL.forged,
            token.clone(),
            seed,
        ));
        eprintln!("abuse cost:   {t:?}");
    });
    measure("10 x 1,000 authenticated stream opens", &|| {
        rt.block_on(authenticated_opens(
            ep.clone(),
            addr,
            FULL.auth_conns,
            FULL.auth_opens,
            token.clone(),
            seed,
        ));
    });
    measure("100,000 garbage datagrams", &|| {
        let _ = std::thread::scope(|s| {
            s.spawn(|| {
                placement.attack_side();
                garbage_datagrams(addr, FULL.datagrams, seed)
            })
            .join()
        });
    });
    measure("20 never-reading consumers, held 5 s", &|| {
        rt.block_on(async {
            let cfg = ClientConfig::new(tls::load_client_dir(&node.secrets()).expect("secrets"));
            let mut held = Vec::new();
            for _ in 0..NEVER_READING {
                let client = Client::connect(&node.addr, cfg.clone())
                    .await
                    .expect("connect");
                let mut sub = client
                    .subscribe(Start::Earliest, None, None, None)
                    .await
                    .expect("subscribe");
                loop {
                    match sub.next().await {
                        Ok(Some(Event::Batch(_))) => break,
                        Ok(Some(_)) => {}
                        other => panic!("never-reading consumer: no first batch: {other:?}"),
                    }
                }
                held.push((client, sub));
            }
            let held_from = cpu_time(pid);
            tokio::time::sleep(Duration::from_secs(5)).await;
            eprintln!(
                "abuse cost:   of which holding them 5 s: {} ms",
                (cpu_time(pid) - held_from).as_millis()
            );
        });
    });
}
