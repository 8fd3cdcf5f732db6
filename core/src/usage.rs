//! What this process has used so far, from `getrusage`: the basis of every
//! "events/s per core" figure (events divided by CPU seconds, not wall seconds). And
//! its open-files limit, raised to the most it may have. And the priority of threads
//! that do background work (queries, compaction) below ingest's.

/// CPU time and peak memory of this process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// User + system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Peak resident set size, bytes.
    pub max_rss_bytes: u64,
}

/// This process's usage so far; zeros if the OS refuses.
pub fn usage() -> Usage {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut raw: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut raw) } != 0 {
        return Usage::default();
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Usage {
        cpu_seconds: secs(raw.ru_utime) + secs(raw.ru_stime),
        // Linux reports ru_maxrss in KiB.
        max_rss_bytes: u64::try_from(raw.ru_maxrss).unwrap_or(0) * 1024,
    }
}

/// This process's resident memory now (`/proc/self/statm`); `None` where there is no
/// such file.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Raises this process's soft limit of open files to its hard limit (each device on
/// the embedded broker holds two sockets: the door's and rumqttd's). The limit now.
pub fn raise_open_files_limit() -> Option<u64> {
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Some(limit.rlim_cur)
}

/// How much lower than the process background threads run (nice levels; 10 is about a
/// tenth of the CPU weight): analysts' queries and compaction, so that a busy ingest
/// keeps most of the CPU when both want it.
pub const NICER_BY: i32 = 10;

/// Raises the calling thread's nice value by [`NICER_BY`]. On Linux the nice value is
/// per thread, and `setpriority(PRIO_PROCESS, 0, ..)` sets the calling thread's
/// (see setpriority(2), "BUGS"). Failing that, the thread runs at normal priority.
pub fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: getpriority and setpriority read and set the calling thread's nice
    // value; they touch no memory of ours.
    unsafe {
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        if libc::setpriority(libc::PRIO_PROCESS, 0, (current + NICER_BY).min(19)) != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "background thread keeps its priority"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn usage_grows_with_work() {
        let before = super::usage();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let after = super::usage();
        assert!(after.cpu_seconds >= before.cpu_seconds);
        assert!(after.max_rss_bytes > 0);
        #[cfg(target_os = "linux")]
        {
            let now = super::rss_bytes().expect("statm");
            assert!(now > 0 && now <= after.max_rss_bytes + (64 << 20), "{now}");
        }
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let now = super::raise_open_files_limit().expect("getrlimit");
        // SAFETY: as above.
        let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!((now, limit.rlim_cur), (limit.rlim_max, limit.rlim_max));
    }
}
