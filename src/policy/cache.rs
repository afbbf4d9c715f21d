//! Entitlements remembered per caller, so a workload that fetches again is not re-matched and
//! its SPIFFE IDs are not re-rendered on every call.
//!
//! [`PolicySet::entitlements`] is a pure function of the policy set, the trust domain and the
//! attested facts. The cache holds results for one policy set and trust domain at a time, keyed
//! on the complete facts (executable digest, groups, pod facts, user name and all), and starts
//! over as soon as it is asked about any other set: a policy reload empties it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Entitlement, PolicySet, TemplateError, WorkloadFacts};
use crate::spiffe::TrustDomain;

/// What a policy set grants one workload.
#[derive(Debug, Default)]
pub struct Evaluation {
    /// The identities it is entitled to, first = default identity.
    pub entitlements: Vec<Arc<Entitlement>>,
    /// Policies that matched but could not render a valid ID for it.
    pub errors: Vec<(String, TemplateError)>,
}

/// Evaluations of recently seen callers under the policy set last asked about.
#[derive(Debug)]
pub struct EntitlementCache {
    state: Mutex<State>,
    max: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Held, not just compared by address: an address is unique only while the set is alive.
    policies: Option<(Arc<PolicySet>, TrustDomain)>,
    /// Looked up on every call. foldhash, seeded per map, hashes the facts several times
    /// faster than SipHash; the map holds at most `max` entries whatever callers present.
    entries: HashMap<WorkloadFacts, Arc<Evaluation>, foldhash::fast::RandomState>,
}

impl EntitlementCache {
    /// A cache holding at most `max` evaluations (past that it starts over).
    pub fn new(max: usize) -> Self {
        Self {
            state: Mutex::default(),
            max: max.max(1),
        }
    }

    /// `policies.entitlements(td, facts)`, evaluated once per distinct `facts` while
    /// `policies` and `td` stay the ones asked about.
    pub fn evaluate(
        &self,
        policies: &Arc<PolicySet>,
        td: &TrustDomain,
        facts: &WorkloadFacts,
    ) -> Arc<Evaluation> {
        let mut state = self.state.lock().expect("entitlement cache");
        let current = state
            .policies
            .as_ref()
            .is_some_and(|(p, t)| Arc::ptr_eq(p, policies) && t == td);
        if !current {
            state.entries.clear();
            state.policies = Some((policies.clone(), td.clone()));
        }
        if let Some(e) = state.entries.get(facts) {
            return e.clone();
        }
        // Evaluated under the lock, so an entry is always the one of the set it is stored with.
        let (entitlements, errors) = policies.entitlements(td, facts);
        let evaluation = Arc::new(Evaluation {
            entitlements: entitlements.into_iter().map(Arc::new).collect(),
            errors,
        });
        if state.entries.len() >= self.max {
            state.entries.clear();
        }
        state.entries.insert(facts.clone(), evaluation.clone());
        evaluation
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{UnixFacts, parse_documents};

    fn set(td: &TrustDomain, path: &str) -> Arc<PolicySet> {
        let yaml = format!(
            "apiVersion: agentid.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{name: p}}\nspec:\n  spiffeID: \"spiffe://{{{{ .TrustDomain }}}}/{path}/{{{{ .UID }}}}\"\n  selector: {{unix: {{sha256: \"{}\"}}}}\n",
            "a".repeat(64)
        );
        Arc::new(PolicySet::new(
            parse_documents("p.yaml", &yaml, td).unwrap(),
        ))
    }

    fn facts(uid: u32, digest: char) -> WorkloadFacts {
        WorkloadFacts {
            unix: Some(UnixFacts {
                uid,
                sha256: Some(format!("sha256:{}", digest.to_string().repeat(64))),
                ..Default::default()
            }),
            k8s: None,
        }
    }

    fn ids(e: &Evaluation) -> Vec<String> {
        e.entitlements
            .iter()
            .map(|e| e.spiffe_id.to_string())
            .collect()
    }

    #[test]
    fn same_answer_as_evaluating_and_keyed_on_every_input() {
        let td = TrustDomain::new("td").unwrap();
        let cache = EntitlementCache::new(16);
        let a = set(&td, "a");
        let first = cache.evaluate(&a, &td, &facts(7, 'a'));
        assert_eq!(ids(&first), ["spiffe://td/a/7"]);
        assert!(Arc::ptr_eq(
            &first,
            &cache.evaluate(&a, &td, &facts(7, 'a'))
        ));
        // Other facts: other uid, other executable.
        assert_eq!(
            ids(&cache.evaluate(&a, &td, &facts(8, 'a'))),
            ["spiffe://td/a/8"]
        );
        assert!(ids(&cache.evaluate(&a, &td, &facts(7, 'b'))).is_empty());
        // A reloaded set, even with the same content, is evaluated afresh.
        let b = set(&td, "b");
        assert_eq!(
            ids(&cache.evaluate(&b, &td, &facts(7, 'a'))),
            ["spiffe://td/b/7"]
        );
        let again = cache.evaluate(&a, &td, &facts(7, 'a'));
        assert!(!Arc::ptr_eq(&first, &again));
        assert_eq!(ids(&again), ["spiffe://td/a/7"]);
        // Bounded: past `max` it starts over.
        let small = EntitlementCache::new(1);
        for uid in 0..3 {
            small.evaluate(&a, &td, &facts(uid, 'a'));
        }
        assert_eq!(small.state.lock().unwrap().entries.len(), 1);
    }
}
