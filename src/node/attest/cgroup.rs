//! Which Kubernetes pod and container a process runs in, from the text of `/proc/<pid>/cgroup`.
//!
//! The kubelet names a pod's cgroup after its QoS class and UID, and the container runtime names
//! the container's cgroup after the container ID, beneath it. Understood: cgroup v1, v2 and
//! hybrid files; the cgroupfs driver (`/kubepods/burstable/pod<uid>/<id>`) and the systemd driver
//! (`/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/
//! cri-containerd-<id>.scope`); containerd, CRI-O and Docker names; paths under a prefix
//! (kind nodes, container-in-container) and `/..`-relative paths seen from inside a cgroup
//! namespace.
//!
//! Fail closed: a path anywhere inside the kubepods hierarchy that does not name a container is an
//! error, never `Ok(None)`, so the caller can't mistake a pod's process for a host process.
//!
//! Nesting: the *outermost* pod match wins. The kernel puts every descendant of a container's
//! cgroup inside that container (crun's `container` sub-group, Docker-in-Docker, a kind node
//! running as a pod), and a privileged container able to create cgroups below its own could
//! otherwise name a `kubepods/…/pod<victim>/<victim-id>` chain and be taken for the victim.
//! A prefix before the kubepods part is accepted (kind, `/docker/<id>/kubepods/…`), so a process
//! outside any pod that can create cgroups (root on the node, already beyond attestation) could
//! name a pod; a process inside a pod cannot without first escaping its cgroup namespace.

use std::collections::HashSet;
use std::fmt;

/// The pod's QoS class, which decides where the kubelet puts its cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// The container runtime, when the cgroup name tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
}

/// The kubelet's cgroup driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Driver {
    Cgroupfs,
    Systemd,
}

/// The container a process runs in, as its cgroup path names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    /// Canonical pod UID: a dashed lowercase UUID (or the 32-hex UID a static pod gets).
    pub pod_uid: String,
    /// The runtime's container ID: 64 lowercase hex digits.
    pub container_id: String,
    /// `None` for cgroupfs-driver containerd and Docker, which leave no mark in the name.
    pub runtime: Option<Runtime>,
    pub qos: Qos,
}

impl fmt::Display for ContainerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pod {} ({:?}) container {}",
            self.pod_uid, self.qos, self.container_id
        )?;
        match self.runtime {
            Some(r) => write!(f, " ({r:?})"),
            None => Ok(()),
        }
    }
}

/// Why a cgroup file could not be read as "in container X" or "not in a pod".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupError {
    #[error("empty cgroup file: no line to tell where the process runs")]
    Empty,
    #[error("cgroup line {line_no} {line:?}: {reason}")]
    Malformed {
        line_no: usize,
        line: String,
        reason: String,
    },
    #[error("cgroup line {line_no} {line:?} is pod-like but names no container: {reason}")]
    NotAContainer {
        line_no: usize,
        line: String,
        reason: String,
    },
    #[error("cgroup lines disagree: line {first_no} says {first}, line {second_no} says {second}")]
    Disagree {
        first_no: usize,
        first: String,
        second_no: usize,
        second: String,
    },
}

/// Finds the container a process runs in; `Ok(None)` when it is not in a pod.
pub fn parse(cgroup_file_contents: &str) -> Result<Option<ContainerRef>, CgroupError> {
    let body = cgroup_file_contents
        .strip_suffix('\n')
        .unwrap_or(cgroup_file_contents);
    if body.is_empty() {
        return Err(CgroupError::Empty);
    }
    let mut hierarchies = HashSet::new();
    let mut found: Option<(usize, ContainerRef)> = None;
    for (idx, line) in body.split('\n').enumerate() {
        let line_no = idx + 1;
        let malformed = |reason: &str| CgroupError::Malformed {
            line_no,
            line: excerpt(line),
            reason: reason.to_owned(),
        };
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(malformed("expected `hierarchy-id:controllers:path`"));
        };
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed("hierarchy id is not a number"));
        }
        let id: u32 = id
            .parse()
            .map_err(|_| malformed("hierarchy id is out of range"))?;
        // v2 is hierarchy 0 with no controllers; every v1 hierarchy has a controller or a name.
        if (id == 0) != controllers.is_empty() {
            return Err(malformed(
                "only the cgroup v2 line (hierarchy 0) has an empty controller list",
            ));
        }
        if !hierarchies.insert(id) {
            return Err(malformed("hierarchy id appears twice"));
        }
        if !path.starts_with('/') {
            return Err(malformed("path does not start with '/'"));
        }
        let here = classify(path).map_err(|reason| CgroupError::NotAContainer {
            line_no,
            line: excerpt(line),
            reason,
        })?;
        let Some(here) = here else { continue };
        match &found {
            None => found = Some((line_no, here)),
            Some((first_no, first)) if *first != here => {
                return Err(CgroupError::Disagree {
                    first_no: *first_no,
                    first: first.to_string(),
                    second_no: line_no,
                    second: here.to_string(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(found.map(|(_, r)| r))
}

/// The cgroup path (from the hierarchy root) the kubelet and runtime would give a container.
pub fn kubelet_cgroup_path(
    qos: Qos,
    pod_uid: &str,
    container_id: &str,
    driver: Driver,
    runtime: Runtime,
) -> String {
    match driver {
        Driver::Cgroupfs => {
            let qos_dir = match qos {
                Qos::Guaranteed => "",
                Qos::Burstable => "/burstable",
                Qos::BestEffort => "/besteffort",
            };
            // CRI-O prefixes its cgroupfs names; containerd and Docker use the bare ID.
            let leaf = match runtime {
                Runtime::CriO => format!("crio-{container_id}"),
                Runtime::Containerd | Runtime::Docker => container_id.to_owned(),
            };
            format!("/kubepods{qos_dir}/pod{pod_uid}/{leaf}")
        }
        Driver::Systemd => {
            // systemd reads '-' in a unit name as nesting, so the kubelet writes '_' instead.
            let uid = pod_uid.replace('-', "_");
            let pod = match qos {
                Qos::Guaranteed => format!("kubepods-pod{uid}.slice"),
                Qos::Burstable => {
                    format!("kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice")
                }
                Qos::BestEffort => {
                    format!("kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice")
                }
            };
            format!(
                "/kubepods.slice/{pod}/{}-{container_id}.scope",
                runtime_prefix(runtime)
            )
        }
    }
}

fn runtime_prefix(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Containerd => "cri-containerd",
        Runtime::CriO => "crio",
        Runtime::Docker => "docker",
    }
}

/// Bounds the line quoted in an error: a cgroup path can be up to a page long.
fn excerpt(line: &str) -> String {
    const MAX: usize = 200;
    if line.chars().count() <= MAX {
        line.to_owned()
    } else {
        let mut s: String = line.chars().take(MAX).collect();
        s.push('…');
        s
    }
}

/// One cgroup path: `Ok(Some)` in a container, `Ok(None)` outside kubepods, `Err(reason)` when
/// inside kubepods but not in a container.
fn classify(path: &str) -> Result<Option<ContainerRef>, String> {
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    for (i, comp) in comps.iter().enumerate() {
        // A systemd-driver kubelet with a cgroupfs-configured runtime: runc takes the
        // `slice:prefix:id` triple literally as one directory name.
        if let Some((slice, rest)) = comp.split_once(':')
            && let Some((pod_uid, qos)) = systemd_pod(slice)
        {
            let (prefix, id) = rest
                .split_once(':')
                .ok_or_else(|| format!("unrecognised systemd cgroup triple {comp:?}"))?;
            let runtime = match prefix {
                "cri-containerd" => Runtime::Containerd,
                "crio" => Runtime::CriO,
                "docker" => Runtime::Docker,
                _ => return Err(format!("unknown runtime prefix {prefix:?} in {comp:?}")),
            };
            if !is_container_id(id) {
                return Err(format!("{id:?} is not a 64-hex container ID"));
            }
            return Ok(Some(ContainerRef {
                pod_uid,
                container_id: id.to_owned(),
                runtime: Some(runtime),
                qos,
            }));
        }
        let pod = match systemd_pod(comp) {
            Some(found) => Some(found),
            None => cgroupfs_pod(&comps, i)?,
        };
        let Some((pod_uid, qos)) = pod else { continue };
        let Some(leaf) = comps.get(i + 1) else {
            return Err(format!("the pod's own cgroup ({comp}), not a container's"));
        };
        let (container_id, runtime) = container_leaf(leaf)?;
        return Ok(Some(ContainerRef {
            pod_uid,
            container_id,
            runtime,
            qos,
        }));
    }
    if comps.iter().any(|c| c.contains("kubepods")) {
        return Err("no pod cgroup recognised below kubepods".to_owned());
    }
    Ok(None)
}

/// `<prefix>kubepods[-burstable|-besteffort]-pod<uid_>.slice` → (uid, qos).
fn systemd_pod(comp: &str) -> Option<(String, Qos)> {
    let stem = comp.strip_suffix(".slice")?;
    let (head, uid) = stem.rsplit_once("-pod")?;
    let (outer, qos) = if let Some(o) = head.strip_suffix("kubepods-burstable") {
        (o, Qos::Burstable)
    } else if let Some(o) = head.strip_suffix("kubepods-besteffort") {
        (o, Qos::BestEffort)
    } else if let Some(o) = head.strip_suffix("kubepods") {
        (o, Qos::Guaranteed)
    } else {
        return None;
    };
    // Anything before `kubepods` must be a whole parent slice name (kind: `kubelet-`).
    if !(outer.is_empty() || outer.ends_with('-')) {
        return None;
    }
    Some((pod_uid(uid, '_')?, qos))
}

/// `pod<uid>` under `kubepods`, `kubepods/burstable` or `kubepods/besteffort` → (uid, qos).
fn cgroupfs_pod(comps: &[&str], i: usize) -> Result<Option<(String, Qos)>, String> {
    let Some(uid) = comps[i].strip_prefix("pod").and_then(|u| pod_uid(u, '-')) else {
        return Ok(None);
    };
    let parent = i.checked_sub(1).map(|p| comps[p]);
    let grandparent = i.checked_sub(2).map(|g| comps[g]);
    let qos = match (parent, grandparent) {
        (Some("kubepods"), _) => Qos::Guaranteed,
        (Some("burstable"), Some("kubepods" | "..")) => Qos::Burstable,
        (Some("besteffort"), Some("kubepods" | "..")) => Qos::BestEffort,
        // Seen from inside a cgroup namespace, the QoS directory may lie above the reader's root.
        (Some(".."), _) => {
            return Err(format!(
                "pod{uid}'s QoS class is outside this cgroup namespace; \
                 read /proc from the host cgroup namespace"
            ));
        }
        _ => return Err(format!("pod{uid} is not under a kubepods QoS cgroup")),
    };
    Ok(Some((uid, qos)))
}

/// A pod UID as a cgroup name spells it (`sep` between groups), in canonical dashed form.
fn pod_uid(s: &str, sep: char) -> Option<String> {
    let lower_hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
    // Static pods get a 32-hex UID (a hash of the manifest) rather than a UUID.
    if s.len() == 32 && s.chars().all(lower_hex) {
        return Some(s.to_owned());
    }
    let groups: Vec<&str> = s.split(sep).collect();
    let lens_ok = groups.len() == 5
        && groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| g.chars().all(lower_hex));
    lens_ok.then(|| groups.join("-"))
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The container's cgroup name → (id, runtime), or why it is not a container.
fn container_leaf(leaf: &str) -> Result<(String, Option<Runtime>), String> {
    let (name, scope) = match leaf.strip_suffix(".scope") {
        Some(n) => (n, true),
        None => (leaf, false),
    };
    if let Some(id) = name.strip_prefix("crio-conmon-") {
        return Err(format!(
            "CRI-O's conmon monitor for container {}, not the container",
            excerpt(id)
        ));
    }
    let (id, runtime) = if let Some(id) = name.strip_prefix("cri-containerd-") {
        (id, Some(Runtime::Containerd))
    } else if let Some(id) = name.strip_prefix("crio-") {
        (id, Some(Runtime::CriO))
    } else if let Some(id) = name.strip_prefix("docker-") {
        (id, Some(Runtime::Docker))
    } else if !scope {
        // cgroupfs driver, containerd or Docker: the bare ID.
        (name, None)
    } else {
        return Err(format!("unrecognised container scope {:?}", excerpt(leaf)));
    };
    if !is_container_id(id) {
        return Err(format!(
            "{:?} does not end in a 64-hex container ID",
            excerpt(leaf)
        ));
    }
    Ok((id.to_owned(), runtime))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
    const UID_: &str = "2c48913c_b29f_11e7_9350_020968147796";
    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
    const STATIC_UID: &str = "8f4e1c1d0b6e2f6a9e5c3b7a1d2e4f60";

    fn cref(uid: &str, qos: Qos, runtime: Option<Runtime>) -> Option<ContainerRef> {
        Some(ContainerRef {
            pod_uid: uid.to_owned(),
            container_id: CID.to_owned(),
            runtime,
            qos,
        })
    }

    /// A full cgroup v1 file with every controller at `path` (as runc places containers).
    fn v1_file(path: &str) -> String {
        [
            "12:hugetlb",
            "11:pids",
            "10:net_cls,net_prio",
            "9:perf_event",
            "8:cpuset",
            "7:memory",
            "6:freezer",
            "5:blkio",
            "4:cpu,cpuacct",
            "3:devices",
            "1:name=systemd",
        ]
        .iter()
        .map(|h| format!("{h}:{path}\n"))
        .chain(std::iter::once("2:rdma:/\n".to_owned()))
        .collect()
    }

    #[test]
    fn real_world_forms() {
        use Qos::*;
        use Runtime::*;
        let cases: Vec<(&str, String, Option<ContainerRef>)> = vec![
            // cgroupfs driver, cgroup v1 (containerd / Docker: bare ID).
            ("v1 cgroupfs burstable", v1_file(&format!("/kubepods/burstable/pod{UID}/{CID}")), cref(UID, Burstable, None)),
            ("v1 cgroupfs besteffort", v1_file(&format!("/kubepods/besteffort/pod{UID}/{CID}")), cref(UID, BestEffort, None)),
            ("v1 cgroupfs guaranteed", v1_file(&format!("/kubepods/pod{UID}/{CID}")), cref(UID, Guaranteed, None)),
            ("v1 cgroupfs cri-o", v1_file(&format!("/kubepods/burstable/pod{UID}/crio-{CID}")), cref(UID, Burstable, Some(CriO))),
            // cgroupfs driver, cgroup v2.
            ("v2 cgroupfs", format!("0::/kubepods/besteffort/pod{UID}/{CID}\n"), cref(UID, BestEffort, None)),
            ("v2 cgroupfs guaranteed static pod", format!("0::/kubepods/pod{STATIC_UID}/{CID}\n"), cref(STATIC_UID, Guaranteed, None)),
            // systemd driver, cgroup v2.
            ("v2 systemd containerd burstable",
             format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n"),
             cref(UID, Burstable, Some(Containerd))),
            ("v2 systemd containerd guaranteed",
             format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n"),
             cref(UID, Guaranteed, Some(Containerd))),
            ("v2 systemd cri-o besteffort",
             format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope\n"),
             cref(UID, BestEffort, Some(CriO))),
            ("v2 systemd cri-o with crun's container sub-group",
             format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope/container\n"),
             cref(UID, Burstable, Some(CriO))),
            ("v2 systemd docker (cri-dockerd)",
             format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-{CID}.scope\n"),
             cref(UID, Burstable, Some(Docker))),
            // systemd driver, cgroup v1 + hybrid: the v2 line sits elsewhere.
            ("v1 systemd cri-o, hybrid v2 line in crio.service",
             v1_file(&format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope"))
                 + "0::/system.slice/crio.service\n",
             cref(UID, BestEffort, Some(CriO))),
            ("hybrid, v2 line at the root",
             format!("1:name=systemd:/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n0::/\n"),
             cref(UID, Guaranteed, Some(Containerd))),
            // kind node (Docker container, host cgroup namespace, cgroup v1).
            ("kind on cgroup v1",
             v1_file(&format!("/docker/93529524695bb00d91c1f6dba692ea8d3550c3b94fb2463af7bc9ec82f992d26/kubepods/besteffort/pod{UID}/{CID}"))
                 + "0::/docker/93529524695bb00d91c1f6dba692ea8d3550c3b94fb2463af7bc9ec82f992d26/system.slice/containerd.service\n",
             cref(UID, BestEffort, None)),
            // kind node on cgroup v2, systemd driver, kubelet cgroup root `/kubelet`.
            ("kind on cgroup v2",
             format!("0::/system.slice/docker-93529524695bb00d91c1f6dba692ea8d3550c3b94fb2463af7bc9ec82f992d26.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n"),
             cref(UID, BestEffort, Some(Containerd))),
            ("kind on cgroup v2, private cgroupns",
             format!("0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n"),
             cref(UID, Guaranteed, Some(Containerd))),
            // Read from inside a cgroup namespace: the path is relative to the reader's root.
            ("cgroupns-relative systemd",
             format!("0::/../../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n"),
             cref(UID, BestEffort, Some(Containerd))),
            ("cgroupns-relative cgroupfs with QoS dir visible",
             format!("0::/../../../burstable/pod{UID}/{CID}\n"),
             cref(UID, Burstable, None)),
            // Kubelet with systemd driver, containerd misconfigured with SystemdCgroup=false.
            ("systemd triple taken literally by runc",
             format!("0::/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}\n"),
             cref(UID, BestEffort, Some(Containerd))),
            // Nested: the outermost pod wins (Docker-in-Docker in a pod; kind node as a pod).
            ("docker-in-docker inside a pod",
             format!("0::/kubepods/burstable/pod{UID}/{CID}/docker/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n"),
             cref(UID, Burstable, None)),
            ("kind node running as a pod",
             format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod00000000_1111_2222_3333_444444444444.slice/cri-containerd-{}.scope\n", "f".repeat(64)),
             cref(UID, Guaranteed, Some(Containerd))),
            // Not in a pod.
            ("v2 user session", "0::/user.slice/user-1000.slice/session-3.scope\n".to_owned(), None),
            ("v2 init", "0::/init.scope\n".to_owned(), None),
            ("v2 containerd itself", "0::/system.slice/containerd.service\n".to_owned(), None),
            ("v2 kubelet itself", "0::/system.slice/kubelet.service\n".to_owned(), None),
            ("v1 host process", v1_file("/"), None),
            ("plain docker container",
             "0::/system.slice/docker-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n".to_owned(),
             None),
            ("no trailing newline", "0::/init.scope".to_owned(), None),
        ];
        for (name, input, want) in cases {
            assert_eq!(parse(&input), Ok(want), "{name}: {input}");
        }
    }

    #[test]
    fn rejected_forms() {
        let cases: Vec<(&str, String, &str)> = vec![
            ("empty", String::new(), "empty cgroup file"),
            (
                "conmon (systemd)",
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope\n"
                ),
                "conmon monitor",
            ),
            (
                "conmon (cgroupfs)",
                format!("0::/kubepods/burstable/pod{UID}/crio-conmon-{CID}\n"),
                "conmon monitor",
            ),
            (
                "pod cgroup itself",
                format!("0::/kubepods/burstable/pod{UID}\n"),
                "pod's own cgroup",
            ),
            (
                "QoS slice",
                "0::/kubepods.slice/kubepods-burstable.slice\n".to_owned(),
                "no pod cgroup recognised",
            ),
            (
                "bad pod uid",
                format!("0::/kubepods/burstable/podnot-a-uid/{CID}\n"),
                "no pod cgroup recognised",
            ),
            (
                "uppercase pod uid",
                format!("0::/kubepods/pod{}/{CID}\n", UID.to_uppercase()),
                "no pod cgroup recognised",
            ),
            (
                "short container id",
                format!("0::/kubepods/pod{UID}/{}\n", &CID[..12]),
                "64-hex container ID",
            ),
            (
                "unknown scope",
                format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/runc-{CID}.scope\n"),
                "unrecognised container scope",
            ),
            (
                "pod outside kubepods",
                format!("0::/foo/pod{UID}/{CID}\n"),
                "not under a kubepods QoS cgroup",
            ),
            (
                "QoS hidden by cgroupns",
                format!("0::/../../pod{UID}/{CID}\n"),
                "outside this cgroup namespace",
            ),
            (
                "controllers disagree",
                format!(
                    "1:name=systemd:/kubepods/pod{UID}/{CID}\n0::/kubepods/pod00000000-1111-2222-3333-444444444444/{CID}\n"
                ),
                "lines disagree: line 1",
            ),
            (
                "no colons",
                "garbage\n".to_owned(),
                "line 1 \"garbage\": expected",
            ),
            (
                "non-numeric id",
                "x:cpu:/\n".to_owned(),
                "hierarchy id is not a number",
            ),
            (
                "huge id",
                "99999999999999999999:cpu:/\n".to_owned(),
                "out of range",
            ),
            (
                "v1 line without controllers",
                "3::/\n".to_owned(),
                "empty controller list",
            ),
            (
                "v2 line with controllers",
                "0:cpu:/\n".to_owned(),
                "empty controller list",
            ),
            (
                "duplicate hierarchy",
                "0::/\n0::/\n".to_owned(),
                "line 2 \"0::/\": hierarchy id appears twice",
            ),
            (
                "relative path",
                "0::init.scope\n".to_owned(),
                "does not start with '/'",
            ),
            (
                "blank line in the middle",
                "0::/\n\n1:name=systemd:/\n".to_owned(),
                "line 2",
            ),
        ];
        for (name, input, want) in cases {
            match parse(&input) {
                Err(e) => assert!(e.to_string().contains(want), "{name}: {e} lacks {want:?}"),
                Ok(r) => panic!("{name}: accepted as {r:?}"),
            }
        }
    }

    #[test]
    fn build_then_parse_round_trips() {
        let uids = [UID, STATIC_UID];
        for uid in uids {
            for qos in [Qos::Guaranteed, Qos::Burstable, Qos::BestEffort] {
                for driver in [Driver::Cgroupfs, Driver::Systemd] {
                    for runtime in [Runtime::Containerd, Runtime::CriO, Runtime::Docker] {
                        let path = kubelet_cgroup_path(qos, uid, CID, driver, runtime);
                        // Only CRI-O marks its cgroupfs names; the systemd driver always does.
                        let seen = match (driver, runtime) {
                            (Driver::Cgroupfs, Runtime::Containerd | Runtime::Docker) => None,
                            _ => Some(runtime),
                        };
                        let want = ContainerRef {
                            pod_uid: uid.to_owned(),
                            container_id: CID.to_owned(),
                            runtime: seen,
                            qos,
                        };
                        for file in [format!("0::{path}\n"), v1_file(&path)] {
                            assert_eq!(parse(&file), Ok(Some(want.clone())), "{file}");
                        }
                    }
                }
            }
        }
        assert_eq!(
            kubelet_cgroup_path(
                Qos::Burstable,
                UID,
                CID,
                Driver::Systemd,
                Runtime::Containerd
            ),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
            )
        );
        assert_eq!(
            kubelet_cgroup_path(Qos::Guaranteed, UID, CID, Driver::Cgroupfs, Runtime::Docker),
            format!("/kubepods/pod{UID}/{CID}")
        );
    }

    /// xorshift64*: deterministic, no extra dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_input_never_panics() {
        const TOKENS: &[&str] = &[
            "0",
            "1",
            "12",
            ":",
            "::",
            "/",
            "\n",
            "..",
            ".",
            "kubepods",
            "kubepods.slice",
            "kubepods-",
            "burstable",
            "besteffort",
            "-pod",
            "pod",
            ".slice",
            ".scope",
            "crio-",
            "crio-conmon-",
            "cri-containerd-",
            "docker-",
            "_",
            "-",
            UID,
            UID_,
            CID,
            STATIC_UID,
            "é",
            "\u{0}",
            "\r",
            " ",
            "name=systemd",
            "cpu,cpuacct",
            "ffff",
            "kubelet-",
        ];
        let seeds = [
            format!("0::/kubepods/burstable/pod{UID}/{CID}\n"),
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
            ),
            format!("0::/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}\n"),
            v1_file(&format!("/kubepods/pod{UID}/crio-{CID}")),
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..20_000 {
            let input: String = if round % 2 == 0 {
                // Token soup.
                (0..rng.below(40))
                    .map(|_| TOKENS[rng.below(TOKENS.len())])
                    .collect()
            } else {
                // A valid file with a few characters replaced, inserted or deleted.
                let mut chars: Vec<char> = seeds[rng.below(seeds.len())].chars().collect();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(chars.len() + 1);
                    let c = ['/', ':', '-', '_', '.', '\n', 'a', 'g', '0', 'é'][rng.below(10)];
                    match rng.below(3) {
                        0 if at < chars.len() => chars[at] = c,
                        1 if at < chars.len() => {
                            chars.remove(at);
                        }
                        _ => chars.insert(at, c),
                    }
                }
                chars.into_iter().collect()
            };
            // Whatever is accepted must be well formed.
            if let Ok(Some(r)) = parse(&input) {
                assert!(
                    r.pod_uid.len() == 36 || r.pod_uid.len() == 32,
                    "{input:?} → {r:?}"
                );
                assert!(is_container_id(&r.container_id), "{input:?} → {r:?}");
            }
        }
    }

    /// A real process in a real cgroup: what the kernel writes in `/proc/<pid>/cgroup` parses.
    #[test]
    fn real_process_in_a_kubelet_style_cgroup() {
        use crate::node::attest::cgroup_fs::place_in_cgroup;
        use std::process::{Child, Command};

        struct Kill(Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }

        let combos = [
            (Qos::Burstable, Driver::Cgroupfs, Runtime::Containerd, None),
            (
                Qos::Guaranteed,
                Driver::Systemd,
                Runtime::CriO,
                Some(Runtime::CriO),
            ),
        ];
        for (qos, driver, runtime, seen) in combos {
            // Unique per run, so concurrent runs and leftovers never collide.
            let pod_uid = uuid::Uuid::new_v4().to_string();
            let container_id = format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            );
            let rel = kubelet_cgroup_path(qos, &pod_uid, &container_id, driver, runtime);
            let mut child = Kill(
                Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .expect("spawn sleep"),
            );
            let guard = place_in_cgroup(child.0.id(), &rel)
                .unwrap_or_else(|e| panic!("placing a process in cgroup {rel}: {e}"));
            eprintln!("placed pid {} in {}", child.0.id(), guard.path().display());
            let text = std::fs::read_to_string(format!("/proc/{}/cgroup", child.0.id()))
                .expect("read /proc/<child>/cgroup");
            let want = ContainerRef {
                pod_uid,
                container_id,
                runtime: seen,
                qos,
            };
            assert_eq!(parse(&text), Ok(Some(want)), "{text}");

            let _ = child.0.kill();
            let _ = child.0.wait();
            let dir = guard.path().to_owned();
            drop(guard);
            assert!(!dir.exists(), "{} was not removed", dir.display());
        }
    }
}
