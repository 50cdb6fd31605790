//! How many workers to run and which CPUs to pin them to (SPEC §1): the CPUs this process may
//! use are its affinity mask, capped by the CPU quota of its cgroup (v2 `cpu.max`, v1
//! `cpu.cfs_quota_us`/`cpu.cfs_period_us`), as Istio sizes Envoy's concurrency from the
//! container's CPU limit.
//!
//! Everything here is parsing and deciding over text and numbers, tested with fixture files,
//! except [`probe`], the one function that reads `/proc` and `/sys` and asks the kernel for the
//! affinity mask. `worker::start` calls it once, before any thread starts.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Pin;

/// A CPU bandwidth limit: `quota_us` of CPU time per `period_us` of wall time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// CPU time allowed per period, in microseconds.
    pub quota_us: u64,
    /// Length of the period, in microseconds.
    pub period_us: u64,
}

impl Quota {
    /// Whole CPUs this quota allows, rounded up (1.5 CPUs is 2 workers), at least 1.
    pub fn cpus(self) -> usize {
        let whole = self.quota_us.div_ceil(self.period_us.max(1)).max(1);
        usize::try_from(whole).unwrap_or(usize::MAX)
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}us per {}us", self.quota_us, self.period_us)
    }
}

/// Parses cgroup v2 `cpu.max` (`"max 100000"` or `"150000 100000"`): `None` when unlimited,
/// or when the text is not that shape (a limit we cannot read does not limit us).
pub fn parse_cpu_max(text: &str) -> Option<Quota> {
    let mut fields = text.split_whitespace();
    let quota = fields.next()?;
    // The period is optional in what the kernel accepts; it defaults to 100 ms.
    let period_us = match fields.next() {
        Some(p) => p.parse().ok()?,
        None => 100_000,
    };
    let quota_us = quota.parse().ok()?;
    (period_us > 0 && quota_us > 0).then_some(Quota { quota_us, period_us })
}

/// Parses cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us`: `None` when the quota is `-1`
/// (unlimited) or either file is not a number.
pub fn parse_cfs(quota_text: &str, period_text: &str) -> Option<Quota> {
    let quota: i64 = quota_text.trim().parse().ok()?;
    let period_us: u64 = period_text.trim().parse().ok()?;
    let quota_us = u64::try_from(quota).ok().filter(|q| *q > 0)?;
    (period_us > 0).then_some(Quota { quota_us, period_us })
}

/// Which cgroup hierarchy a path belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// The unified hierarchy (`0::/path`), limit in `cpu.max`.
    V2,
    /// The v1 hierarchy that holds the `cpu` controller, limit in `cpu.cfs_*`.
    V1Cpu,
}

/// The process's cgroup path in `hierarchy`, from the text of `/proc/self/cgroup`
/// (`0::/kubepods/pod1/abc` for v2, `4:cpu,cpuacct:/docker/abc` for v1).
pub fn cgroup_path(proc_self_cgroup: &str, hierarchy: Hierarchy) -> Option<&str> {
    proc_self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let wanted = match hierarchy {
            Hierarchy::V2 => id == "0" && controllers.is_empty(),
            Hierarchy::V1Cpu => controllers.split(',').any(|c| c == "cpu"),
        };
        wanted.then_some(path)
    })
}

/// Where `hierarchy` is mounted, from the text of `/proc/self/mountinfo`: the mount point and
/// the cgroup path that the mount's root is (not `/` when a container runtime bind-mounted
/// only its own cgroup).
pub fn cgroup_mount(mountinfo: &str, hierarchy: Hierarchy) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        // id parent major:minor root mount_point options [optional...] - fstype source super_options
        let (left, right) = line.split_once(" - ")?;
        let mut l = left.split(' ');
        let root = l.nth(3)?;
        let mount_point = l.next()?;
        let mut r = right.split(' ');
        let (fstype, _source, super_options) = (r.next()?, r.next()?, r.next().unwrap_or(""));
        let wanted = match hierarchy {
            Hierarchy::V2 => fstype == "cgroup2",
            Hierarchy::V1Cpu => fstype == "cgroup" && super_options.split(',').any(|o| o == "cpu"),
        };
        wanted.then(|| (PathBuf::from(unescape(mount_point)), unescape(root)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The directory of the process's cgroup under the mount point, and each ancestor up to the
/// mount point, innermost first: a parent's quota binds its children too. When the process's
/// path does not lie under the mount's root (a cgroup namespace shows `/`), the mount point
/// alone is the process's cgroup.
pub fn cgroup_dirs(mount_point: &Path, mount_root: &str, path: &str) -> Vec<PathBuf> {
    let root = mount_root.trim_end_matches('/');
    let relative = match path.strip_prefix(root) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') || root.is_empty() => rest,
        _ => "",
    };
    let mut dirs = Vec::new();
    let mut dir = mount_point.to_path_buf();
    dirs.push(dir.clone());
    for part in relative.split('/').filter(|p| !p.is_empty() && *p != "." && *p != "..") {
        dir.push(part);
        dirs.push(dir.clone());
    }
    dirs.reverse();
    dirs
}

/// What the process may use: its affinity mask and the tightest CPU quota found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Available {
    /// CPU numbers of the affinity mask, ascending.
    pub affinity: Vec<usize>,
    /// The tightest quota of the process's cgroups, and the file it was read from.
    pub quota: Option<(Quota, PathBuf)>,
}

/// The decision: how many workers, and the CPU each one is pinned to (if any), with the
/// reasons the start-up log and `/config_dump` give.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Worker threads.
    pub workers: usize,
    /// Why that many.
    pub workers_reason: String,
    /// The affinity mask the process started with.
    pub affinity: Vec<usize>,
    /// The cgroup quota in CPUs (rounded up), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_cpus: Option<usize>,
    /// `pin` as configured.
    pub pin_mode: Pin,
    /// CPU of worker i at index i; empty when workers are not pinned.
    pub pinned: Vec<usize>,
    /// Why they are or are not pinned.
    pub pin_reason: String,
}

/// Decide workers and pinning from what the process may use, the configured `workers` (if
/// any) and `pin`.
pub fn plan(available: &Available, workers: Option<usize>, pin: Pin) -> Plan {
    let mask = &available.affinity;
    let quota_cpus = available.quota.as_ref().map(|(q, _)| q.cpus());
    let mask_text = format!("affinity mask {} ({} CPUs)", cpu_list(mask), mask.len());
    let (workers, workers_reason) = match (workers, quota_cpus) {
        (Some(n), _) => (n, "set by workers".to_string()),
        (None, Some(q)) if mask.is_empty() || q < mask.len() => {
            let (quota, file) = available.quota.as_ref().map(|(q, f)| (*q, f.display())).unzip();
            let quota = quota.map(|q| q.to_string()).unwrap_or_default();
            let file = file.map(|f| f.to_string()).unwrap_or_default();
            (q, format!("cgroup CPU quota {quota} ({file}) allows {q}, fewer than the {mask_text}"))
        }
        (None, Some(q)) => (mask.len(), format!("{mask_text}; the cgroup CPU quota allows {q}, no fewer")),
        (None, None) if mask.is_empty() => (1, "affinity mask unreadable, no cgroup CPU quota".into()),
        (None, None) => (mask.len(), format!("{mask_text}, no cgroup CPU quota")),
    };
    let on_mask = || (0..workers).filter_map(|i| mask.get(i % mask.len().max(1)).copied()).collect();
    let (pinned, pin_reason): (Vec<usize>, String) = match pin {
        Pin::Never => (Vec::new(), "pin is never".into()),
        Pin::Always if mask.is_empty() => {
            (Vec::new(), "pin is always, but the affinity mask is unreadable".into())
        }
        Pin::Always => (on_mask(), format!("pin is always: worker i on the i-th CPU of the {mask_text}")),
        Pin::Auto if mask.len() == workers => {
            (on_mask(), format!("pin is auto and the {mask_text} holds one CPU per worker"))
        }
        Pin::Auto => (
            Vec::new(),
            format!("pin is auto and the {mask_text} is not one CPU per worker ({workers}): a shared mask"),
        ),
    };
    Plan { workers, workers_reason, affinity: mask.clone(), quota_cpus, pin_mode: pin, pinned, pin_reason }
}

/// `0-3,6` style list of CPU numbers, as `taskset` and `/sys` write them.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j { cpus[i].to_string() } else { format!("{}-{}", cpus[i], cpus[j]) });
        i = j + 1;
    }
    if out.is_empty() { "unreadable".into() } else { out.join(",") }
}

/// The tightest quota among `dirs` (innermost first) of `hierarchy`, read with `read`.
pub fn tightest_quota(
    dirs: &[PathBuf],
    hierarchy: Hierarchy,
    read: impl Fn(&Path) -> Option<String>,
) -> Option<(Quota, PathBuf)> {
    dirs.iter()
        .filter_map(|dir| match hierarchy {
            Hierarchy::V2 => {
                let file = dir.join("cpu.max");
                parse_cpu_max(&read(&file)?).map(|q| (q, file))
            }
            Hierarchy::V1Cpu => {
                let file = dir.join("cpu.cfs_quota_us");
                let period = read(&dir.join("cpu.cfs_period_us"))?;
                parse_cfs(&read(&file)?, &period).map(|q| (q, file))
            }
        })
        // Compare quota/period as fractions without floats: a/b < c/d <=> a*d < c*b.
        .min_by_key(|(q, _)| (u128::from(q.quota_us) * 1_000_000) / u128::from(q.period_us.max(1)))
}

/// The one I/O function: the calling thread's affinity mask (`sched_getaffinity`, through
/// `core_affinity`) and the tightest CPU quota of the process's cgroups, found through
/// `/proc/self/cgroup` and `/proc/self/mountinfo`. Call it before starting threads, so the
/// mask is the process's. Any file it cannot read counts as "no limit there".
pub fn probe() -> Available {
    let affinity = core_affinity::get_core_ids()
        .map(|ids| {
            let mut v: Vec<usize> = ids.into_iter().map(|c| c.id).collect();
            v.sort_unstable();
            v
        })
        .unwrap_or_default();
    let read = |p: &Path| std::fs::read_to_string(p).ok();
    let cgroup = read(Path::new("/proc/self/cgroup")).unwrap_or_default();
    let mountinfo = read(Path::new("/proc/self/mountinfo")).unwrap_or_default();
    let quota = [Hierarchy::V2, Hierarchy::V1Cpu]
        .into_iter()
        .filter_map(|h| {
            let path = cgroup_path(&cgroup, h)?;
            let (mount_point, root) = cgroup_mount(&mountinfo, h)?;
            tightest_quota(&cgroup_dirs(&mount_point, &root, path), h, read)
        })
        .min_by_key(|(q, _)| (u128::from(q.quota_us) * 1_000_000) / u128::from(q.period_us.max(1)));
    Available { affinity, quota }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn cpu_max_is_quota_and_period_or_unlimited() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(Quota { quota_us: 150_000, period_us: 100_000 }));
        assert_eq!(parse_cpu_max("50000"), Some(Quota { quota_us: 50_000, period_us: 100_000 }));
        assert_eq!(parse_cpu_max(""), None);
        assert_eq!(parse_cpu_max("lots 100000"), None);
        assert_eq!(parse_cpu_max("100000 0"), None);
    }

    #[test]
    fn cfs_quota_minus_one_is_unlimited() {
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("250000\n", "100000\n"), Some(Quota { quota_us: 250_000, period_us: 100_000 }));
        assert_eq!(parse_cfs("x", "100000"), None);
        assert_eq!(parse_cfs("1000", "0"), None);
    }

    #[test]
    fn a_quota_is_rounded_up_to_whole_cpus() {
        let q = |quota_us| Quota { quota_us, period_us: 100_000 }.cpus();
        assert_eq!(q(1), 1);
        assert_eq!(q(50_000), 1);
        assert_eq!(q(100_000), 1);
        assert_eq!(q(150_000), 2);
        assert_eq!(q(400_000), 4);
    }

    const V2_CGROUP: &str = include_str!("../tests/data/cpus/v2-kubepods.cgroup");
    const V2_MOUNTINFO: &str = include_str!("../tests/data/cpus/v2-kubepods.mountinfo");
    const V1_CGROUP: &str = include_str!("../tests/data/cpus/v1-docker.cgroup");
    const V1_MOUNTINFO: &str = include_str!("../tests/data/cpus/v1-docker.mountinfo");

    #[test]
    fn the_v2_path_and_mount_are_read_from_proc() {
        let path = cgroup_path(V2_CGROUP, Hierarchy::V2).unwrap();
        assert_eq!(path, "/kubepods.slice/kubepods-burstable.slice/cri-containerd-abc.scope");
        assert_eq!(cgroup_path(V2_CGROUP, Hierarchy::V1Cpu), None);
        let (mount, root) = cgroup_mount(V2_MOUNTINFO, Hierarchy::V2).unwrap();
        assert_eq!((mount.as_path(), root.as_str()), (Path::new("/sys/fs/cgroup"), "/"));
        let dirs = cgroup_dirs(&mount, &root, path);
        assert_eq!(dirs.first().unwrap(), Path::new("/sys/fs/cgroup").join(&path[1..]).as_path());
        assert_eq!(dirs.last().unwrap(), Path::new("/sys/fs/cgroup"));
        assert_eq!(dirs.len(), 4);
    }

    #[test]
    fn the_v1_cpu_path_is_the_line_naming_the_cpu_controller() {
        let path = cgroup_path(V1_CGROUP, Hierarchy::V1Cpu).unwrap();
        assert_eq!(path, "/docker/0123abcd");
        // A container runtime that bind-mounts only its own cgroup: the mount's root is that
        // cgroup, so the files are at the mount point itself.
        let (mount, root) = cgroup_mount(V1_MOUNTINFO, Hierarchy::V1Cpu).unwrap();
        assert_eq!(mount, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(root, "/docker/0123abcd");
        assert_eq!(cgroup_dirs(&mount, &root, path), vec![PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")]);
    }

    #[test]
    fn a_cgroup_namespace_path_outside_the_mount_root_means_the_mount_point() {
        assert_eq!(
            cgroup_dirs(Path::new("/sys/fs/cgroup"), "/a/b", "/"),
            vec![PathBuf::from("/sys/fs/cgroup")]
        );
        assert_eq!(cgroup_dirs(Path::new("/m"), "/", "/"), vec![PathBuf::from("/m")]);
        assert_eq!(cgroup_dirs(Path::new("/m"), "/a", "/ab/c"), vec![PathBuf::from("/m")]);
        assert_eq!(
            cgroup_dirs(Path::new("/m"), "/a", "/a/c/../d"),
            vec![PathBuf::from("/m/c/d"), PathBuf::from("/m/c"), PathBuf::from("/m")]
        );
    }

    #[test]
    fn mountinfo_octal_escapes_are_decoded() {
        let line = "40 31 0:37 / /sys/fs/my\\040cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup_mount(line, Hierarchy::V2).unwrap().0, Path::new("/sys/fs/my cgroup"));
    }

    #[test]
    fn the_tightest_quota_of_the_cgroup_and_its_ancestors_wins() {
        let files: BTreeMap<PathBuf, &str> = [
            ("/sys/fs/cgroup/pod/c/cpu.max", "max 100000"),
            ("/sys/fs/cgroup/pod/cpu.max", "150000 100000"),
            ("/sys/fs/cgroup/cpu.max", "400000 100000"),
        ]
        .into_iter()
        .map(|(p, t)| (PathBuf::from(p), t))
        .collect();
        let dirs = cgroup_dirs(Path::new("/sys/fs/cgroup"), "/", "/pod/c");
        let (q, file) =
            tightest_quota(&dirs, Hierarchy::V2, |p| files.get(p).map(|t| t.to_string())).unwrap();
        assert_eq!((q.cpus(), file), (2, PathBuf::from("/sys/fs/cgroup/pod/cpu.max")));
        assert_eq!(tightest_quota(&dirs, Hierarchy::V2, |_| None), None);
    }

    fn available(affinity: &[usize], quota_us: Option<u64>) -> Available {
        Available {
            affinity: affinity.to_vec(),
            quota: quota_us
                .map(|q| (Quota { quota_us: q, period_us: 100_000 }, PathBuf::from("/cg/cpu.max"))),
        }
    }

    #[test]
    fn workers_default_to_the_affinity_mask_capped_by_the_quota() {
        assert_eq!(plan(&available(&[0, 1, 2, 3], None), None, Pin::Auto).workers, 4);
        assert_eq!(plan(&available(&[0, 1, 2, 3], Some(150_000)), None, Pin::Auto).workers, 2);
        assert_eq!(plan(&available(&[2], Some(400_000)), None, Pin::Auto).workers, 1);
        assert_eq!(plan(&available(&[], None), None, Pin::Auto).workers, 1);
        assert_eq!(plan(&available(&[], Some(300_000)), None, Pin::Auto).workers, 3);
        let p = plan(&available(&[0, 1, 2, 3], Some(150_000)), Some(3), Pin::Auto);
        assert_eq!((p.workers, p.workers_reason.as_str()), (3, "set by workers"));
    }

    #[test]
    fn auto_pins_only_when_the_mask_holds_exactly_the_workers_cpus() {
        // Kubernetes' static CPU manager gave this container CPUs 2 and 5.
        let p = plan(&available(&[2, 5], None), None, Pin::Auto);
        assert_eq!(p.pinned, vec![2, 5]);
        assert!(p.pin_reason.contains("one CPU per worker"), "{}", p.pin_reason);
        // A CPU limit on a shared node: the mask is all 8 CPUs, the quota 2.
        let p = plan(&available(&[0, 1, 2, 3, 4, 5, 6, 7], Some(200_000)), None, Pin::Auto);
        assert_eq!((p.workers, p.pinned.clone()), (2, vec![]));
        assert!(p.pin_reason.contains("shared"), "{}", p.pin_reason);
        assert!(p.workers_reason.contains("quota"), "{}", p.workers_reason);
    }

    #[test]
    fn always_pins_worker_i_to_the_ith_cpu_of_the_mask_and_never_never_pins() {
        let p = plan(&available(&[4, 6, 7], None), Some(4), Pin::Always);
        assert_eq!(p.pinned, vec![4, 6, 7, 4]);
        assert_eq!(plan(&available(&[4, 6], None), None, Pin::Never).pinned, Vec::<usize>::new());
        assert_eq!(plan(&available(&[], None), None, Pin::Always).pinned, Vec::<usize>::new());
    }

    #[test]
    fn cpu_lists_are_written_as_ranges() {
        assert_eq!(cpu_list(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
        assert_eq!(cpu_list(&[5]), "5");
        assert_eq!(cpu_list(&[]), "unreadable");
    }
}
