//! How a relay process keeps its memory small: glibc's allocator keeps what is freed, per arena
//! and per thread, so a burst of work leaves a relay holding far more than it uses, and the
//! kernel maps the executable in large pieces around the code that runs (see
//! docs/performance.md, "Targets", relay RSS). These are process-wide settings, so the
//! `tandem relay` command turns them on and an application embedding the relay decides for
//! itself. The allocator's settings do nothing elsewhere than Linux with glibc, and the code
//! mapping nothing elsewhere than Linux.

use std::sync::Arc;
use std::time::Duration;

/// How often [`trim_when_quiet`] looks for the end of a burst.
const TICK: Duration = Duration::from_millis(200);

/// Cap glibc's malloc arenas at one per four cores (at least one) instead of eight per core,
/// and map blocks of 256 KiB and more on their own whatever was freed before. The relay's
/// threads mostly wait for the network and the disk, so they contend little for an arena, and
/// each arena keeps its own freed memory; and glibc otherwise raises its mapping threshold
/// after the first large free, so that sled's 512 KiB I/O buffers then come from the heap and
/// stay there when freed. Call before any thread starts.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = i32::try_from(cores.div_ceil(4)).unwrap_or(i32::MAX);
        // SAFETY: mallopt only sets tunables of the allocator; called before other threads.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        }
    }
}

/// The glibc tunable that sizes each thread's cache of freed blocks.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TCACHE_TUNABLE: &str = "glibc.malloc.tcache_count";

/// Set for the second start, so that nothing can make the program start again twice.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const RESTARTED: &str = "TANDEM_RELAY_RESTARTED";

/// Start this program again, in place (same pid, arguments and inherited descriptors such as
/// stdin, stdout and stderr), with glibc's per-thread caches of freed blocks turned off
/// (`GLIBC_TUNABLES=glibc.malloc.tcache_count=0`, which only the environment at startup can
/// set). Each thread otherwise keeps up to seven freed blocks of every small size for itself,
/// where neither other threads nor `malloc_trim` reach them; a relay's blocking pool grows to
/// dozens of threads in a burst, and their caches held 2 MiB at 2,000 documents and 6 MiB at
/// 8,000 (docs/performance.md). Does nothing when the environment already sets that tunable
/// (an operator's choice) or `TANDEM_RELAY_RESTARTED` (the second start); in glibc's secure
/// mode (setuid or file capabilities: glibc would drop the tunable); when `/proc/self/exe` is
/// not the file this code runs from (a loader started it); off Linux with glibc; or when the
/// program cannot be started again (it then runs as it is). Under valgrind, set the tunable:
/// the second start would leave the tool. Call before anything with an effect outside the
/// process, reading a file included: it runs again from the start.
pub fn reexec_without_thread_caches() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        if std::env::var_os(RESTARTED).is_some() {
            return;
        }
        // SAFETY: getauxval only reads the auxiliary vector the kernel gave this process.
        if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 {
            return;
        }
        let current = std::env::var_os("GLIBC_TUNABLES").unwrap_or_default();
        let Some(current) = current.to_str() else {
            return;
        };
        if current.contains(TCACHE_TUNABLE) {
            return;
        }
        let tunables = match current {
            "" => format!("{TCACHE_TUNABLE}=0"),
            _ => format!("{current}:{TCACHE_TUNABLE}=0"),
        };
        let Some(program) = this_program() else {
            return;
        };
        let mut args = std::env::args_os();
        let Some(arg0) = args.next() else {
            return;
        };
        // Only returns if the program could not be started again.
        let _ = std::process::Command::new(program)
            .arg0(arg0)
            .args(args)
            .env("GLIBC_TUNABLES", tunables)
            .env(RESTARTED, "1")
            .exec();
    }
}

/// What to start again: the executable by its path (so that the process keeps its name), or
/// `/proc/self/exe` if that path no longer holds it; `None` unless `/proc/self/exe` is the
/// file this very code was mapped from.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn this_program() -> Option<std::path::PathBuf> {
    let exe = std::fs::read_link("/proc/self/exe").ok()?;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let here = this_program as fn() -> Option<std::path::PathBuf> as usize;
    let mine = mappings(&maps).find(|m| m.start <= here && here < m.end)?;
    if std::path::Path::new(mine.path) != exe {
        return None;
    }
    Some(if exe.exists() {
        exe
    } else {
        "/proc/self/exe".into()
    })
}

/// One line of `/proc/<pid>/maps`.
#[cfg(target_os = "linux")]
struct Mapping<'a> {
    start: usize,
    end: usize,
    /// The mapped file, or `""` (anonymous) or a `[name]`; may hold spaces.
    path: &'a str,
}

/// The lines of a `/proc/<pid>/maps` text: "start-end perms offset dev inode path".
#[cfg(target_os = "linux")]
fn mappings(maps: &str) -> impl Iterator<Item = Mapping<'_>> {
    maps.lines().filter_map(|line| {
        let mut rest = line;
        let mut field = || {
            let t = rest.trim_start();
            let end = t.find(' ').unwrap_or(t.len());
            let (f, r) = t.split_at(end);
            rest = r;
            f
        };
        let range = field();
        let _ = (field(), field(), field(), field());
        let (start, end) = range.split_once('-')?;
        Some(Mapping {
            start: usize::from_str_radix(start, 16).ok()?,
            end: usize::from_str_radix(end, 16).ok()?,
            path: rest.trim(),
        })
    })
}

/// Map the executable's pages one at a time as they are first used. The kernel otherwise maps
/// 64 KiB around each page a fault brings in ("fault-around"), so every function the relay
/// ever calls keeps its neighbours resident too. Asking for random access on the executable's
/// mappings turns that off on kernels that honour it for fault-around. Random access also
/// turns readahead off, so the executable is first asked into the page cache (`MADV_WILLNEED`,
/// which reads ahead without mapping anything): a relay started on a cold cache then takes
/// minor faults, not a disk read per page. A page held in a large page-cache folio is still
/// mapped with the whole folio (6.18 here does so), which is why release builds also link the
/// code a relay runs together (build.rs). Linux only.
pub fn map_code_sparsely() {
    #[cfg(target_os = "linux")]
    {
        let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
            return;
        };
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return;
        };
        for m in mappings(&maps).filter(|m| std::path::Path::new(m.path) == exe) {
            // SAFETY: an advice about a mapping of this process's own executable, as the
            // kernel listed it; it changes how pages are brought in, not what they hold.
            unsafe {
                let addr = m.start as *mut libc::c_void;
                libc::madvise(addr, m.end - m.start, libc::MADV_WILLNEED);
                libc::madvise(addr, m.end - m.start, libc::MADV_RANDOM);
            }
        }
    }
}

/// Every [`TICK`], if `activity` moved since the last trim but not during the last tick (a
/// burst of work just ended), return the allocator's free memory to the system
/// (`malloc_trim`), on the blocking pool. Ends when `stop` turns true.
pub async fn trim_when_quiet(
    activity: Arc<dyn Fn() -> u64 + Send + Sync>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last_tick = activity();
    let mut last_trim = last_tick;
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = activity();
        if now == last_tick && now != last_trim {
            last_trim = now;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
        last_tick = now;
    }
}

/// Return free heap memory to the system.
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_are_read_with_paths_that_hold_spaces() {
        let maps = "\
55c39f204000-55c39fa40000 r-xp 002c0000 fe:00 5309350                    /opt/my relay/tandem (deleted)
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 
7ffd1000-7ffd2000 rw-p 00000000 00:00 0                          [stack]
garbage";
        let got: Vec<(usize, usize, &str)> =
            mappings(maps).map(|m| (m.start, m.end, m.path)).collect();
        assert_eq!(
            got,
            [
                (
                    0x55c39f204000,
                    0x55c39fa40000,
                    "/opt/my relay/tandem (deleted)"
                ),
                (0x7f0000000000, 0x7f0000021000, ""),
                (0x7ffd1000, 0x7ffd2000, "[stack]"),
            ]
        );
    }

    #[test]
    #[cfg(target_env = "gnu")]
    fn this_program_is_the_test_binary() {
        let exe = std::env::current_exe().unwrap();
        assert_eq!(this_program(), Some(exe));
    }
}
