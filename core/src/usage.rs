//! What this process has used so far, from `getrusage`: the basis of every
//! "events/s per core" figure (events divided by CPU seconds, not wall seconds).

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
    }
}
