//! Process hardening: the proxy holds client secrets and bearer tokens in memory, so a
//! core dump or a same-user debugger must not be able to read them (SEI CERT MEM06-C).
//!
//! Sets `RLIMIT_CORE` to 0 and, on Linux, marks the process not dumpable (which also
//! refuses `ptrace` attach and `/proc/<pid>/mem` to other processes of the same user).

use std::io;

/// Applies the hardening; the caller decides whether a failure is fatal.
pub fn harden_process() -> io::Result<()> {
    use rustix::process::{Resource, Rlimit, setrlimit};
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    Ok(())
}
