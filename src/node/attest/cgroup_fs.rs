//! Putting a real process into a kubelet-style cgroup, so that the kernel itself reports a pod
//! container in `/proc/<pid>/cgroup`. Real I/O for tests (unit and integration alike, hence
//! `pub` rather than `#[cfg(test)]`): needs root and a writable cgroup hierarchy.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Hierarchies tried in order: cgroup v1 controllers, then v2 (hybrid mount, then unified).
const HIERARCHIES: &[&str] = &[
    "/sys/fs/cgroup/pids",
    "/sys/fs/cgroup/cpu",
    "/sys/fs/cgroup/memory",
    "/sys/fs/cgroup/unified",
    "/sys/fs/cgroup",
];

/// A process placed in a cgroup; dropping it moves the process back (if it is still there) and
/// removes the directories that were created, innermost first.
#[derive(Debug)]
pub struct CgroupGuard {
    pid: u32,
    hierarchy: PathBuf,
    leaf: PathBuf,
    /// Outermost first; directories that already existed are not ours to remove.
    created: Vec<PathBuf>,
    /// The process's cgroup before the move, to return it there.
    home: Option<PathBuf>,
}

impl CgroupGuard {
    /// The hierarchy's mount point, e.g. `/sys/fs/cgroup/pids`.
    pub fn hierarchy(&self) -> &Path {
        &self.hierarchy
    }

    /// The cgroup directory the process was placed in.
    pub fn path(&self) -> &Path {
        &self.leaf
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        // Move the process home only if it is still ours: its pid may have exited and been reused.
        if let Some(home) = &self.home
            && let Ok(procs) = fs::read_to_string(self.leaf.join("cgroup.procs"))
            && procs.lines().any(|l| l.trim() == self.pid.to_string())
        {
            let _ = fs::write(home.join("cgroup.procs"), self.pid.to_string());
        }
        for dir in self.created.iter().rev() {
            // A task that has just been reaped can keep a cgroup busy for a moment.
            for attempt in 0..50 {
                match fs::remove_dir(dir) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 49 => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    // ENOTEMPTY: a concurrent user shares this parent; it is left for them.
                    _ => break,
                }
            }
        }
    }
}

/// Moves `pid` into cgroup `rel_path` (e.g. `kubepods/burstable/pod<uid>/<id>`) of the first
/// writable hierarchy, creating the directories as needed.
pub fn place_in_cgroup(pid: u32, rel_path: &str) -> io::Result<CgroupGuard> {
    let rel = rel_path.trim_start_matches('/');
    if rel.is_empty()
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cgroup path {rel_path:?} must be a plain relative path"),
        ));
    }
    let before = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let mut failures = Vec::new();
    for h in HIERARCHIES {
        let hierarchy = Path::new(h);
        if !hierarchy.join("cgroup.procs").is_file() {
            failures.push(format!("{h}: not a cgroup hierarchy"));
            continue;
        }
        match try_place(pid, hierarchy, rel) {
            Ok(mut guard) => {
                guard.home = home_cgroup(&before, pid, rel).map(|p| hierarchy.join(p));
                return Ok(guard);
            }
            Err(e) => failures.push(format!("{h}: {e}")),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "needs root and a writable cgroup hierarchy (v1 at /sys/fs/cgroup/{{pids,cpu,memory}}, \
             or v2 at /sys/fs/cgroup/unified or /sys/fs/cgroup) to place pid {pid} in {rel}: {}",
            failures.join("; ")
        ),
    ))
}

fn try_place(pid: u32, hierarchy: &Path, rel: &str) -> io::Result<CgroupGuard> {
    let mut guard = CgroupGuard {
        pid,
        hierarchy: hierarchy.to_owned(),
        leaf: hierarchy.join(rel),
        created: Vec::new(),
        home: None,
    };
    let mut dir = hierarchy.to_owned();
    for comp in rel.split('/') {
        dir.push(comp);
        match fs::create_dir(&dir) {
            Ok(()) => guard.created.push(dir.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            // `guard` drops here and removes what was created so far.
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("mkdir {}: {e}", dir.display()),
                ));
            }
        }
    }
    let procs = guard.leaf.join("cgroup.procs");
    fs::write(&procs, pid.to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", procs.display())))?;
    Ok(guard)
}

/// The process's cgroup (relative to the hierarchy) before the move, found as the `before` line of
/// the hierarchy that now names `rel`.
fn home_cgroup(before: &str, pid: u32, rel: &str) -> Option<PathBuf> {
    let after = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let suffix = format!("/{rel}");
    let id = after.lines().find_map(|l| {
        let (id, path) = l.split_once(':').map(|(id, r)| (id, r.split_once(':')))?;
        path.filter(|(_, p)| p.ends_with(&suffix)).map(|_| id)
    })?;
    let path = before.lines().find_map(|l| {
        let (lid, rest) = l.split_once(':')?;
        (lid == id).then(|| rest.split_once(':').map(|(_, p)| p))?
    })?;
    // A path above our cgroup namespace root has no name we could write to.
    (!path.split('/').any(|c| c == "..")).then(|| PathBuf::from(path.trim_start_matches('/')))
}
