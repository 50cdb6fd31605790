//! SPEC §1 driver choice when io_uring is forbidden: `auto` falls back to epoll and says so
//! in one line; `uring` fails clearly. io_uring is forbidden for the ringside process alone,
//! by a seccomp filter installed in the child before exec (as a container runtime's default
//! profile does): io_uring_setup(2) fails with EPERM. Nothing on the host changes.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;

use common::*;

/// io_uring_setup's number: 425 on every architecture (new syscalls share one table).
const NR_IO_URING_SETUP: u32 = 425;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64

/// Install, in this (child) process, a seccomp filter under which io_uring_setup fails with
/// EPERM and every other syscall is allowed.
fn forbid_io_uring() -> std::io::Result<()> {
    // Classic BPF over `struct seccomp_data` (nr at offset 0, arch at 4).
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    let stmt = |code, k| libc::sock_filter { code, jt: 0, jf: 0, k };
    let jeq = |k, jt, jf| libc::sock_filter { code: JEQ_K, jt, jf, k };
    let filter = [
        stmt(LD_W_ABS, 4),
        jeq(AUDIT_ARCH, 0, 3), // another architecture's calls: allow
        stmt(LD_W_ABS, 0),
        jeq(NR_IO_URING_SETUP, 0, 1),
        stmt(RET_K, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut _ };
    // SAFETY: prctl with valid arguments; `prog` and `filter` outlive the calls, and the
    // kernel copies the program. Only async-signal-safe calls, as pre_exec requires.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const libc::sock_fprog)
                != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `ringside` (with `args`) under the filter.
fn without_io_uring(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    // SAFETY: the closure runs between fork and exec and only calls prctl (async-signal-safe).
    unsafe { cmd.pre_exec(forbid_io_uring) };
    cmd
}

#[test]
fn auto_falls_back_to_epoll_when_io_uring_is_forbidden_and_uring_fails_clearly() {
    let mut rs = Ringside::spawn_command(
        without_io_uring(&[]),
        echo_server(),
        "outbound",
        &["--peer-exchange", "off", "--driver", "auto"],
    );
    let mut c = connect(rs.listen);
    std::io::Write::write_all(&mut c, b"still relays").unwrap();
    assert_eq!(read_exact(&mut c, 12), b"still relays");
    assert_eq!(sum(&rs.scrape(), "ringside_driver_info", &[("driver", "epoll")]), 1.0);
    drop(c);
    rs.signal("TERM");
    assert!(rs.wait_exit().success());
    let lines = rs.stderr_lines();
    assert_eq!(lines.iter().filter(|l| l.contains("falling back to epoll")).count(), 1, "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l.contains("driver epoll")).count(), 1, "{lines:?}");

    let out = without_io_uring(&["run", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"])
        .args(["--direction", "outbound"])
        .args(["--driver", "uring", "--metrics", "off", "--admin", "off", "--health", "off"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ringside: driver uring: io_uring is unavailable"), "{err}");
}
