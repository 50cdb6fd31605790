//! SPEC §1 driver choice when io_uring is forbidden (`kernel.io_uring_disabled=2`): `auto`
//! falls back to epoll and says so in one line; `uring` fails clearly. This file holds one
//! test on purpose: cargo runs test binaries one at a time, so flipping the (machine-wide)
//! sysctl here cannot disturb other tests. It needs root, as CI has.

mod common;

use std::process::Command;

use common::*;

const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";

/// Restores the sysctl even if an assertion fails.
struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(SYSCTL, &self.0);
    }
}

#[test]
fn auto_falls_back_to_epoll_when_io_uring_is_disabled_and_uring_fails_clearly() {
    let before = std::fs::read_to_string(SYSCTL).expect("kernel.io_uring_disabled exists on this kernel");
    std::fs::write(SYSCTL, "2").expect("root may set kernel.io_uring_disabled (run as root, as CI does)");
    let _restore = Restore(before);

    let mut rs = Ringside::spawn(echo_server(), "outbound", &["--peer-exchange", "off", "--driver", "auto"]);
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

    let out = Command::new(bin())
        .args(["run", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--direction", "outbound"])
        .args(["--driver", "uring", "--metrics", "off", "--admin", "off", "--health", "off"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ringside: driver uring: io_uring is unavailable"), "{err}");
}
