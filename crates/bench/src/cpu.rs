//! The target daemon's CPU time, from /proc/PID/stat (utime + stime,
//! all threads, including those that already exited).

use std::time::Duration;

use super::error::BenchError;

/// CPU time used so far by process `pid`.
pub fn cpu_time(pid: u32) -> Result<Duration, BenchError> {
    let err = |message: String| BenchError::ProcStat { pid, message };
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| err(format!("{path}: {e}")))?;
    let ticks = parse_stat_ticks(&stat).ok_or_else(|| err(format!("{path}: unexpected format")))?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return Err(err("sysconf(_SC_CLK_TCK) failed".into()));
    }
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// utime + stime in clock ticks. The command name (field 2) may contain
/// spaces and parentheses, so fields are counted after its last ')'.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')': state is field 3, so utime (14) and stime (15) are 11 and 12 on.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_odd_command_names() {
        let stat = "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn reads_own_process() {
        assert!(cpu_time(std::process::id()).is_ok());
        assert!(cpu_time(u32::MAX).is_err());
    }
}
