//! Where the abuse run's threads and processes run, for an honest throughput ratio.
//!
//! The goal is about what the abuse costs **the node**: a real attacker spends the CPU of its
//! own machines on its handshakes, trickles and datagrams, not the node's. The test generates
//! the abuse itself, on the node's machine, so unless it is kept apart the ratio mostly
//! measures the attack generator eating the cores the node and the tail need (on two cores the
//! ratio was 0.82x, and at nice 19 the starved attackers could no longer keep their own
//! timing). [`Placement::split`] gives the node and the legitimate tail one fixed set of CPUs
//! (the same alone and under abuse, so both phases run on the same hardware) and the attack
//! generator (its tokio runtime, its datagram thread, the RSS sampler) a disjoint one.
//!
//! Children inherit the CPU set of the thread that starts them (and keep it across `exec`),
//! so the node and every `tideline tail` round are placed by pinning the thread that spawns
//! them; the attackers' threads pin themselves. No `taskset`, no package: `sched_setaffinity`.
//! With fewer than two usable CPUs there is nothing to split: it says so loudly and runs as
//! before (everything everywhere).
#![expect(
    unsafe_code,
    reason = "sched_getaffinity / sched_setaffinity and the cpu_set_t macros are libc calls"
)]

/// A set of CPU numbers.
type CpuList = Vec<usize>;

/// The CPUs the calling thread may run on.
fn current() -> std::io::Result<CpuList> {
    // SAFETY: `cpu_set_t` is a plain bit array, all zeroes is a valid (empty) set; the kernel
    // writes at most `size_of::<cpu_set_t>()` bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the set's size.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Restricts the calling thread (and what it starts from now on) to `cpus`.
fn try_pin_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: as in `current`; every `cpu` came from the kernel's own set, below CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// [`try_pin_current_thread`], failing the test when the kernel refuses: a run that asked
/// for a split and did not get it would report the wrong ratio.
fn pin_current_thread(cpus: &[usize]) {
    if let Err(e) = try_pin_current_thread(cpus) {
        panic!("sched_setaffinity({cpus:?}) failed: {e}");
    }
}

/// Where the node with the legitimate tail, and the attack generator, run.
#[derive(Clone, Debug)]
pub struct Placement {
    /// `None`: everything everywhere (one CPU, or not asked to split).
    split: Option<(CpuList, CpuList)>,
}

impl Placement {
    /// No pinning: the node, the tail and the attackers share every CPU (the CI-scale run).
    pub fn everywhere() -> Placement {
        Placement { split: None }
    }

    /// The usable CPUs cut in two: the first half (at least one) for the node and the
    /// legitimate tail, the rest for the attack generator. Fewer than two usable CPUs: a loud
    /// line, and [`Placement::everywhere`].
    pub fn split() -> Placement {
        let cpus = match current() {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "abuse: WARNING: cannot read this process's CPUs ({e}): the attackers share \
                     the node's CPUs and the ratio measures the attack generator too"
                );
                return Placement::everywhere();
            }
        };
        if cpus.len() < 2 {
            eprintln!(
                "abuse: WARNING: only {} usable CPU(s) ({cpus:?}): the attackers cannot get CPUs \
                 of their own, they share the node's and the ratio measures the attack \
                 generator's CPU too, not only what the abuse costs the node",
                cpus.len()
            );
            return Placement::everywhere();
        }
        let (node, attack) = cpus.split_at(cpus.len() / 2);
        Placement {
            split: Some((node.to_vec(), attack.to_vec())),
        }
    }

    /// Pins the calling thread to the node's side; processes it starts later (the node, the
    /// tail rounds) run there.
    pub fn node_side(&self) {
        if let Some((node, _)) = &self.split {
            pin_current_thread(node);
        }
    }

    /// Pins the calling thread to the attack generator's side.
    pub fn attack_side(&self) {
        if let Some((_, attack)) = &self.split {
            pin_current_thread(attack);
        }
    }

    /// Pins the calling thread to its side for the guard's life, then gives it back every CPU
    /// it had (the test thread goes on to other tests).
    pub fn node_side_for_now(&self) -> Restore {
        let before = current().expect("the calling thread's CPUs");
        self.node_side();
        Restore(before)
    }

    /// One line saying where things run, for the run's output.
    pub fn describe(&self) -> String {
        match &self.split {
            Some((node, attack)) => format!(
                "node and legitimate tail on CPUs {node:?}, attack generator on CPUs {attack:?}"
            ),
            None => "node, legitimate tail and attack generator share every CPU".to_string(),
        }
    }
}

/// Gives the thread that made it its former CPUs back when dropped (also while unwinding).
pub struct Restore(CpuList);

impl Drop for Restore {
    fn drop(&mut self) {
        // No panic here: this may run while unwinding.
        if let Err(e) = try_pin_current_thread(&self.0) {
            eprintln!(
                "abuse: could not give the test thread its CPUs {:?} back: {e}",
                self.0
            );
        }
    }
}

/// CPU time (user and system, every thread) process `pid` has used so far: what the node
/// spends, whichever CPUs it runs on.
pub fn cpu_time(pid: u32) -> std::time::Duration {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {path} for the node's CPU time: {e}"));
    // Fields after the command (which may hold spaces, within parentheses): state is field 3,
    // utime 14 and stime 15 (proc(5)).
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("{path} has no command field: {stat}"));
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> u64 {
        fields
            .get(i - 3)
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("{path}: no field {i}: {stat}"))
    };
    // SAFETY: sysconf reads a constant of the system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(per_second > 0, "sysconf(_SC_CLK_TCK) = {per_second}");
    let total = ticks(14) + ticks(15);
    std::time::Duration::from_millis(total * 1000 / per_second as u64)
}

/// CPU time the calling thread has used so far.
fn thread_cpu_time() -> std::time::Duration {
    // SAFETY: `timespec` is plain data, all zeroes is valid; the kernel fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The canary's load: on the calling thread (pin it to the node's side first), spends
/// `share` of each 10 ms on the CPU (by its own CPU time, so the share holds however the
/// scheduler interleaves it) and sleeps the rest, until `stop`. To the legitimate tail this
/// is a node that spends that much more CPU under the abuse: what the ratio must catch.
pub fn burn(share: f64, stop: &std::sync::atomic::AtomicBool) {
    assert!((0.0..1.0).contains(&share), "a share of one CPU: {share}");
    let period = std::time::Duration::from_millis(10);
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let until = thread_cpu_time() + period.mul_f64(share);
        while thread_cpu_time() < until {
            std::hint::spin_loop();
        }
        std::thread::sleep(period.mul_f64(1.0 - share));
    }
}
