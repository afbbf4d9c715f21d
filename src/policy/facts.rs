//! What attestation learned about a caller: the input to policy matching and templates.

/// Facts about one workload, each gathered outside the workload process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadFacts {
    pub unix: Option<UnixFacts>,
}

/// Facts the kernel reports about a local process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixFacts {
    pub uid: u32,
    pub gid: u32,
    pub supplementary_gids: Vec<u32>,
    pub user_name: Option<String>,
    /// Executable path as the kernel reports it (`/proc/<pid>/exe`).
    pub path: Option<String>,
    /// `sha256:<hex>` of the executable.
    pub sha256: Option<String>,
}

impl WorkloadFacts {
    /// The facts as SPIRE-style selector strings, for logs and audit records.
    pub fn selectors(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(u) = &self.unix {
            out.push(format!("unix:uid:{}", u.uid));
            out.push(format!("unix:gid:{}", u.gid));
            out.extend(
                u.supplementary_gids
                    .iter()
                    .map(|g| format!("unix:supplementary_gid:{g}")),
            );
            if let Some(n) = &u.user_name {
                out.push(format!("unix:user:{n}"));
            }
            if let Some(p) = &u.path {
                out.push(format!("unix:path:{p}"));
            }
            if let Some(h) = &u.sha256 {
                out.push(format!("unix:sha256:{h}"));
            }
        }
        out
    }
}
