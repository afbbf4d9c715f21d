//! Conformance, SPIFFE-CONFORMANCE.md section 4 (Workload Endpoint and Workload API): the proto
//! as served (reflection, health), the endpoint and its security header, the socket address,
//! caller identification by the kernel, stream semantics, WIT-SVID, bundle map keys and the DER
//! encodings. The per-RPC rows of 4.5 for X.509 and JWT live in conformance_x509.rs and
//! conformance_jwt.rs.

mod common;
mod conformance;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use agentid::api::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, WitBundlesRequest, WitsvidRequest,
    X509BundlesRequest, X509svidRequest, X509svidResponse,
};
use common::{Daemon, cli_as, my_uid};
use conformance::*;
use prost::Message;
use tokio::time::timeout;
use tonic::Code;

/// One request to every method of `SpiffeWorkloadAPI`, with `header`; the status of each.
async fn call_every_method(
    d: &Daemon,
    header: Header,
) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    let mut c = raw_client(d, header).await;
    vec![
        (
            "FetchX509SVID",
            c.fetch_x509svid(X509svidRequest {}).await.map(|_| ()),
        ),
        (
            "FetchX509Bundles",
            c.fetch_x509_bundles(X509BundlesRequest {})
                .await
                .map(|_| ()),
        ),
        (
            "FetchJWTSVID",
            c.fetch_jwtsvid(JwtsvidRequest {
                audience: vec!["a".into()],
                spiffe_id: String::new(),
            })
            .await
            .map(|_| ()),
        ),
        (
            "FetchJWTBundles",
            c.fetch_jwt_bundles(JwtBundlesRequest {}).await.map(|_| ()),
        ),
        (
            "ValidateJWTSVID",
            c.validate_jwtsvid(ValidateJwtsvidRequest {
                audience: "a".into(),
                svid: "a.b.c".into(),
            })
            .await
            .map(|_| ()),
        ),
        (
            "FetchWITSVID",
            c.fetch_witsvid(WitsvidRequest {
                spiffe_id: String::new(),
            })
            .await
            .map(|_| ()),
        ),
        (
            "FetchWITBundles",
            c.fetch_wit_bundles(WitBundlesRequest {}).await.map(|_| ()),
        ),
    ]
}

/// (name, number, repeated) of a proto field.
type Field = (&'static str, i32, bool);

/// Section 4.1, EP-01, EP-11, EP-12, G-5: the service is served over gRPC under the bare name
/// `SpiffeWorkloadAPI` (no proto package) with exactly the spec's RPCs and field numbers;
/// server reflection lists it; gRPC health answers SERVING.
#[tokio::test]
async fn proto_reflection_and_health_4_1_ep_01_ep_11_ep_12() {
    use prost_types::field_descriptor_proto::Label;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(tmp.path(), &[]);
    let reflect = |req: MessageRequest| {
        let socket = d.socket.clone();
        async move {
            let mut c = ServerReflectionClient::new(channel(&socket).await);
            let mut s = c
                .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(req),
                }]))
                .await
                .expect("reflection call")
                .into_inner();
            s.message()
                .await
                .unwrap()
                .unwrap()
                .message_response
                .expect("reflection answer")
        }
    };

    // EP-12: reflection lists the Workload API under its bare name, plus health and reflection.
    let MessageResponse::ListServicesResponse(list) =
        reflect(MessageRequest::ListServices(String::new())).await
    else {
        panic!("list services")
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"SpiffeWorkloadAPI"), "EP-12/G-5: {names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    assert!(
        !names.iter().any(|n| n.ends_with(".SpiffeWorkloadAPI")),
        "G-5: no package: {names:?}"
    );

    // 4.1 / EP-11: the descriptor has no package, exactly the spec's seven RPCs, and the
    // spec's field numbers.
    let MessageResponse::FileDescriptorResponse(files) = reflect(
        MessageRequest::FileContainingSymbol("SpiffeWorkloadAPI".into()),
    )
    .await
    else {
        panic!("file containing SpiffeWorkloadAPI")
    };
    let protos: Vec<prost_types::FileDescriptorProto> = files
        .file_descriptor_proto
        .iter()
        .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap())
        .collect();
    let file = protos
        .iter()
        .find(|f| f.service.iter().any(|s| s.name() == "SpiffeWorkloadAPI"))
        .expect("the Workload API file");
    assert_eq!(file.package(), "", "4.1: no package line");
    assert_eq!(file.syntax(), "proto3");
    assert_eq!(
        file.service.len(),
        1,
        "EP-11: no other service in the Workload API file"
    );
    let svc = &file.service[0];
    let methods: Vec<(&str, &str, &str, bool, bool)> = svc
        .method
        .iter()
        .map(|m| {
            (
                m.name(),
                m.input_type(),
                m.output_type(),
                m.client_streaming(),
                m.server_streaming(),
            )
        })
        .collect();
    assert_eq!(
        methods,
        [
            (
                "FetchX509SVID",
                ".X509SVIDRequest",
                ".X509SVIDResponse",
                false,
                true
            ),
            (
                "FetchX509Bundles",
                ".X509BundlesRequest",
                ".X509BundlesResponse",
                false,
                true
            ),
            (
                "FetchJWTSVID",
                ".JWTSVIDRequest",
                ".JWTSVIDResponse",
                false,
                false
            ),
            (
                "FetchJWTBundles",
                ".JWTBundlesRequest",
                ".JWTBundlesResponse",
                false,
                true
            ),
            (
                "ValidateJWTSVID",
                ".ValidateJWTSVIDRequest",
                ".ValidateJWTSVIDResponse",
                false,
                false
            ),
            (
                "FetchWITSVID",
                ".WITSVIDRequest",
                ".WITSVIDResponse",
                false,
                true
            ),
            (
                "FetchWITBundles",
                ".WITBundlesRequest",
                ".WITBundlesResponse",
                false,
                true
            ),
        ],
        "EP-11: exactly the spec's RPCs"
    );
    let fields = |msg: &str| -> Vec<(String, i32, bool)> {
        let m = file
            .message_type
            .iter()
            .find(|m| m.name() == msg)
            .unwrap_or_else(|| panic!("message {msg}"));
        m.field
            .iter()
            .map(|f| {
                (
                    f.name().to_owned(),
                    f.number(),
                    f.label() == Label::Repeated,
                )
            })
            .collect()
    };
    let expect: &[(&str, &[Field])] = &[
        ("X509SVIDRequest", &[]),
        (
            "X509SVIDResponse",
            &[
                ("svids", 1, true),
                ("crl", 2, true),
                ("federated_bundles", 3, true),
            ],
        ),
        (
            "X509SVID",
            &[
                ("spiffe_id", 1, false),
                ("x509_svid", 2, false),
                ("x509_svid_key", 3, false),
                ("bundle", 4, false),
                ("hint", 5, false),
            ],
        ),
        ("X509BundlesRequest", &[]),
        (
            "X509BundlesResponse",
            &[("crl", 1, true), ("bundles", 2, true)],
        ),
        (
            "JWTSVIDRequest",
            &[("audience", 1, true), ("spiffe_id", 2, false)],
        ),
        ("JWTSVIDResponse", &[("svids", 1, true)]),
        (
            "JWTSVID",
            &[
                ("spiffe_id", 1, false),
                ("svid", 2, false),
                ("hint", 3, false),
            ],
        ),
        ("JWTBundlesRequest", &[]),
        ("JWTBundlesResponse", &[("bundles", 1, true)]),
        (
            "ValidateJWTSVIDRequest",
            &[("audience", 1, false), ("svid", 2, false)],
        ),
        (
            "ValidateJWTSVIDResponse",
            &[("spiffe_id", 1, false), ("claims", 2, false)],
        ),
        ("WITSVIDRequest", &[("spiffe_id", 1, false)]),
        ("WITSVIDResponse", &[("svids", 1, true)]),
        (
            "WITSVID",
            &[
                ("spiffe_id", 1, false),
                ("wit_svid", 2, false),
                ("wit_svid_key", 3, false),
                ("hint", 4, false),
            ],
        ),
        ("WITBundlesRequest", &[]),
        ("WITBundlesResponse", &[("bundles", 1, true)]),
    ];
    for (msg, want) in expect {
        let want: Vec<(String, i32, bool)> = want
            .iter()
            .map(|(n, i, r)| (n.to_string(), *i, *r))
            .collect();
        assert_eq!(fields(msg), want, "4.1: fields of {msg}");
    }
    let claims = file
        .message_type
        .iter()
        .find(|m| m.name() == "ValidateJWTSVIDResponse")
        .unwrap();
    assert_eq!(
        claims.field[1].type_name(),
        ".google.protobuf.Struct",
        "claims is a Struct"
    );

    // EP-01: gRPC health over the same socket: the server and the Workload API are SERVING.
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut h = HealthClient::new(channel(&d.socket).await);
    for service in ["", "SpiffeWorkloadAPI"] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "health of {service:?}");
    }
}

/// EP-05..EP-07, G-7: plaintext HTTP/2 works; on every method, a missing header, a header
/// that is not exactly `true`, or two values are InvalidArgument "security header missing
/// from request", checked before attestation (also for callers with no identity) and before
/// request validation.
#[tokio::test]
async fn security_header_ep_05_to_ep_07() {
    let tmp = tempfile::tempdir().unwrap();
    let d = start_with(
        &tmp.path().join("a"),
        &[policy("me", "/agent/me", my_uid(), "")],
        &[],
    );
    let nobody = start_with(
        &tmp.path().join("b"),
        &[policy("others", "/agent/x", my_uid() + 4242, "")],
        &[],
    );
    const MSG: &str = "security header missing from request";

    // EP-05: with the right header, a plaintext (h2c) client is served.
    let ok = call_every_method(&d, Header::Value("true")).await;
    for (method, r) in &ok[..4] {
        assert!(r.is_ok(), "EP-05: {method} with the header: {r:?}");
    }

    for header in [
        Header::Absent,
        Header::Value("True"),
        Header::Value("TRUE"),
        Header::Value("1"),
        Header::Value(""),
        Header::Value("yes"),
        Header::Twice,
    ] {
        for daemon in [&d, &nobody] {
            for (method, r) in call_every_method(daemon, header).await {
                let what = format!("{method} with header {header:?}");
                let s = expect_err(r, &what);
                assert_status(&s, Code::InvalidArgument, Some(MSG), &what);
            }
        }
    }

    // G-7: for a caller with no identity, the header check comes first; with the header the
    // same caller is PermissionDenied.
    let r = call_every_method(&nobody, Header::Value("true")).await;
    assert_status(
        r[0].1.as_ref().unwrap_err(),
        Code::PermissionDenied,
        Some("no identity issued"),
        "G-7 control",
    );
    // The header check precedes request validation too.
    let mut c = raw_client(&d, Header::Absent).await;
    let s = expect_err(
        c.validate_jwtsvid(ValidateJwtsvidRequest {
            audience: String::new(),
            svid: String::new(),
        })
        .await,
        "ValidateJWTSVID without header and fields",
    );
    assert_status(
        &s,
        Code::InvalidArgument,
        Some(MSG),
        "header before field validation",
    );

    // The rust client sends the header and is served.
    spiffe_client(&d)
        .await
        .fetch_x509_svid()
        .await
        .expect("spiffe crate client");
}

/// EP-02, EV-01..EV-04: the endpoint is a Unix socket any local process can reach; the
/// address is printed as `SPIFFE_ENDPOINT_SOCKET=unix:///abs/path`, which the rust client
/// and the CLI take, in both `unix:///` and `unix:/` form; the CLI falls back to the
/// environment and refuses non-unix addresses with a clear message.
#[tokio::test]
async fn endpoint_address_ep_02_ev_01_to_ev_04() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(tmp.path(), &[]);

    // EP-02: a Unix socket, connectable by everyone (callers are told apart by the kernel).
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert!(meta.file_type().is_socket(), "EP-02: a Unix domain socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o777);
    assert!(
        agentid::cli::default_socket().is_absolute(),
        "EP-02: the default endpoint is a UDS path"
    );

    // EV-02, EV-03: the printed address is unix:///absolute/path, nothing else.
    let line = d
        .banner
        .lines()
        .find_map(|l| l.strip_prefix("SPIFFE_ENDPOINT_SOCKET="))
        .expect("address line");
    assert_eq!(line, format!("unix://{}", d.socket.display()));
    let path = line.strip_prefix("unix://").unwrap();
    assert!(path.starts_with('/'), "EV-03: no authority, absolute path");

    // Real clients take both accepted forms.
    let short = format!("unix:{}", d.socket.display());
    for ep in [line.to_owned(), short.clone()] {
        let c = spiffe::WorkloadApiClient::connect_to(&ep)
            .await
            .unwrap_or_else(|e| panic!("{ep}: {e}"));
        c.fetch_x509_svid()
            .await
            .unwrap_or_else(|e| panic!("{ep}: {e}"));
    }

    // EV-01: the CLI uses SPIFFE_ENDPOINT_SOCKET when no --socket is given, in both forms.
    let run = |env: Option<&str>| {
        let mut cmd = Command::new(common::bin());
        cmd.args(["x509", "fetch"])
            .env_remove("SPIFFE_ENDPOINT_SOCKET");
        if let Some(v) = env {
            cmd.env("SPIFFE_ENDPOINT_SOCKET", v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    for ep in [line, short.as_str()] {
        let (ok, out) = run(Some(ep));
        assert!(
            ok && out.contains("SPIFFE ID  spiffe://agentid.local/"),
            "EV-01 {ep}: {out}"
        );
    }
    // Unset: an error naming the variable (clients have no default).
    let (ok, out) = run(None);
    assert!(
        !ok && out.contains("SPIFFE_ENDPOINT_SOCKET"),
        "no address: {out}"
    );
    // EV-04: tcp is not served by this client; the refusal says so.
    let (ok, out) = run(Some("tcp://127.0.0.1:8000"));
    assert!(
        !ok && out.contains("not a unix socket address"),
        "tcp address: {out}"
    );
}

/// Fails (never skips) when not root.
fn require_root() {
    assert_eq!(
        my_uid(),
        0,
        "this test needs root to run a process as another uid"
    );
}

/// EP-08, EP-09, X-05, XB-02, J-04, JB-04: callers are identified by the kernel's account of
/// the connecting process (its uid), never by anything they send: uid 65534 gets its own
/// identity, and a uid no policy matches is PermissionDenied "no identity issued" on every
/// fetch, including the bundles.
#[tokio::test]
async fn caller_identified_by_kernel_ep_08_ep_09() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    // Let other uids reach the socket inside the private directory.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = start_with(
        tmp.path(),
        &[
            policy("me", "/agent/me", my_uid(), ""),
            policy("nobody", "/agent/nobody", 65534, ""),
        ],
        &[],
    );

    let (ok, out, err) = cli_as(my_uid(), &d, &["x509", "fetch"]);
    assert!(
        ok && out.contains(&format!("SPIFFE ID  spiffe://{TD}/agent/me")),
        "{out}{err}"
    );
    // EP-09: the same request from uid 65534 yields that uid's identity.
    let (ok, out, err) = cli_as(65534, &d, &["x509", "fetch"]);
    assert!(
        ok && out.contains(&format!("SPIFFE ID  spiffe://{TD}/agent/nobody")),
        "EP-09: {out}{err}"
    );
    assert!(
        !out.contains("/agent/me"),
        "uid 65534 must not get root's identity: {out}"
    );
    let (ok, out, err) = cli_as(65534, &d, &["jwt", "fetch", "--audience", "a", "--json"]);
    assert!(
        ok && out.contains(&format!("spiffe://{TD}/agent/nobody")) && !out.contains("/agent/me"),
        "{out}{err}"
    );

    // A uid with no policy: every fetch is PermissionDenied "no identity issued".
    for args in [
        &["x509", "fetch"][..],
        &["bundle", "show"][..],                  // XB-02, JB-04
        &["jwt", "fetch", "--audience", "a"][..], // J-04
    ] {
        let (ok, out, err) = cli_as(65533, &d, args);
        assert!(!ok, "{args:?} as an unknown uid must fail: {out}");
        assert!(
            err.contains("permission denied") && err.contains("no identity issued"),
            "{args:?}: stderr must say permission denied / no identity issued: {err}"
        );
    }
}

/// EP-13: a caller that cannot be attested is answered Unavailable "workload attestation
/// failed" (clients retry), never PermissionDenied and never someone else's identity. The
/// socket is connected by a short-lived child process, so the kernel names that child as the
/// peer; it has exited (and been reaped) before the request is sent.
#[tokio::test]
async fn unattestable_caller_is_unavailable_ep_13() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::{Arc, Mutex};

    let tmp = tempfile::tempdir().unwrap();
    let d = start_with(tmp.path(), &[policy("me", "/agent/me", my_uid(), "")], &[]);

    // SAFETY: plain socket(2); the descriptor is owned right away.
    let sock = unsafe {
        OwnedFd::from_raw_fd(libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))
    };
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = d.socket.to_str().unwrap().as_bytes();
    assert!(path.len() < addr.sun_path.len());
    for (dst, src) in addr.sun_path.iter_mut().zip(path) {
        *dst = *src as libc::c_char;
    }
    let fd = sock.as_raw_fd();
    let mut child = Command::new("true");
    // SAFETY: connect(2) is async-signal-safe; `addr` is a copy owned by the closure.
    unsafe {
        child.pre_exec(move || {
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    assert!(child.status().expect("child connects and exits").success());

    let stream = std::os::unix::net::UnixStream::from(sock);
    stream.set_nonblocking(true).unwrap();
    let slot = Arc::new(Mutex::new(Some(
        tokio::net::UnixStream::from_std(stream).unwrap(),
    )));
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let s = slot.lock().unwrap().take();
            async move {
                s.map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("connection already used"))
            }
        }))
        .await
        .expect("HTTP/2 over the inherited connection");
    let mut c = agentid::api::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::with_interceptor(
        channel,
        Header::Value("true"),
    );
    let x = expect_err(
        c.fetch_x509svid(X509svidRequest {}).await.map(|_| ()),
        "EP-13 FetchX509SVID",
    );
    let j = expect_err(
        c.fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await,
        "EP-13 FetchJWTSVID",
    );
    for (what, s) in [("FetchX509SVID", x), ("FetchJWTSVID", j)] {
        assert_status(&s, Code::Unavailable, None, what);
        assert!(
            s.message().starts_with("workload attestation failed"),
            "EP-13 {what}: {s:?}"
        );
    }
}

fn ids(m: &X509svidResponse) -> Vec<String> {
    m.svids.iter().map(|s| s.spiffe_id.clone()).collect()
}

/// ST-01..ST-05, X-05 on an open stream: the first message comes at once on every stream;
/// a policy change pushes a message with the complete new state (additions keep the other
/// SVIDs, removals drop them); losing the last identity ends the stream with
/// PermissionDenied. X509Source follows along.
#[tokio::test]
async fn streams_push_complete_state_st_01_to_st_05() {
    let tmp = tempfile::tempdir().unwrap();
    let uid = my_uid();
    let alpha = policy("alpha", "/agent/alpha", uid, "");
    let beta = policy("beta", "/agent/beta", uid, "");
    let d = start_with(tmp.path(), std::slice::from_ref(&alpha), &[]);
    let file = tmp.path().join("policies/agents.yaml");
    let (a_id, b_id) = (
        format!("spiffe://{TD}/agent/alpha"),
        format!("spiffe://{TD}/agent/beta"),
    );
    let wait = Duration::from_secs(10);

    // ST-02: the first message on each new stream is sent immediately.
    let mut c = client(&d).await;
    let mut x = c
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = timeout(Duration::from_secs(5), x.message())
        .await
        .expect("ST-02: first X509-SVID message")
        .unwrap()
        .unwrap();
    assert_eq!(ids(&first), std::slice::from_ref(&a_id));
    let mut xb = c
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    timeout(Duration::from_secs(5), xb.message())
        .await
        .expect("ST-02: first X.509 bundles message")
        .unwrap()
        .unwrap();
    let mut jb = c
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    timeout(Duration::from_secs(5), jb.message())
        .await
        .expect("ST-02: first JWT bundles message")
        .unwrap()
        .unwrap();

    let source = spiffe::X509Source::builder()
        .endpoint(d.endpoint())
        .build()
        .await
        .expect("X509Source");
    assert_eq!(source.svid().unwrap().spiffe_id().to_string(), a_id);

    // ST-01, ST-03: a new identity is pushed with the complete state; the unchanged SVID is
    // still there, byte for byte.
    replace_file(&file, &[alpha.clone(), beta.clone()].join("---\n"));
    let m = timeout(wait, x.message())
        .await
        .expect("ST-03: a message after the policy change")
        .unwrap()
        .unwrap();
    assert_eq!(
        ids(&m),
        [a_id.clone(), b_id.clone()],
        "ST-01: complete state, not a delta"
    );
    assert_eq!(
        m.svids[0].x509_svid, first.svids[0].x509_svid,
        "alpha's SVID is carried over unchanged"
    );
    for s in &m.svids {
        check_leaf(
            &split_der(&s.x509_svid)[0],
            &s.x509_svid_key,
            &split_der(&s.bundle)[0],
            &s.spiffe_id,
        );
    }

    // ST-05: a removed identity is absent from the next message.
    replace_file(&file, &beta);
    let m = timeout(wait, x.message())
        .await
        .expect("a message after the removal")
        .unwrap()
        .unwrap();
    assert_eq!(
        ids(&m),
        std::slice::from_ref(&b_id),
        "ST-05: the withdrawn identity is gone"
    );
    let followed = eventually(wait, || {
        source
            .svid()
            .is_ok_and(|s| s.spiffe_id().to_string() == b_id)
    })
    .await;
    assert!(
        followed,
        "X509Source follows the stream to the new default identity"
    );

    // the last identity withdrawn on an open stream ends it with PermissionDenied.
    replace_file(&file, &policy("others", "/agent/x", uid + 4242, ""));
    let end = timeout(wait, x.message())
        .await
        .expect("the stream ends after the withdrawal");
    let s = end.expect_err("X-05: the stream ends with an error");
    assert_status(
        &s,
        Code::PermissionDenied,
        Some("no identity issued"),
        "X-05 on an open stream",
    );
    source.shutdown().await;
}

/// ST-03: SVID rotation reaches open streams. With x509TTL 8s the daemon must renew the SVID
/// and push the new one, while the previous one is still valid, again and again, to a client
/// that fetched it once and then only listens: a raw FetchX509SVID stream, and (on a second
/// daemon, so the two do not mask each other) the rust crate's X509Source.
#[tokio::test]
async fn rotation_reaches_open_streams_st_03() {
    use agentid::crypto::x509::NOT_BEFORE_CUSHION;

    let tmp = tempfile::tempdir().unwrap();
    let id = format!("spiffe://{TD}/agent/short");
    let doc = [policy("short", "/agent/short", my_uid(), "  x509TTL: 8s\n")];
    let d = start_with(&tmp.path().join("a"), &doc, &[]);
    let d2 = start_with(&tmp.path().join("b"), &doc, &[]);

    let raw_stream = async {
        let mut c = client(&d).await;
        let mut x = c
            .fetch_x509svid(X509svidRequest {})
            .await
            .unwrap()
            .into_inner();
        let mut prev = x.message().await.unwrap().unwrap();
        for round in 1..=2 {
            let prev_leaf = split_der(&prev.svids[0].x509_svid).remove(0);
            let prev_not_after = parse_cert(&prev_leaf).validity().not_after.timestamp();
            let next = timeout(Duration::from_secs(15), x.message())
                .await
                .unwrap_or_else(|_| {
                    panic!("ST-03: rotation {round} was never pushed on the open stream")
                })
                .unwrap()
                .expect("stream open");
            assert_eq!(
                ids(&next),
                std::slice::from_ref(&id),
                "ST-01: complete state after rotation"
            );
            let leaf = split_der(&next.svids[0].x509_svid).remove(0);
            assert_ne!(leaf, prev_leaf, "rotation {round}: a new certificate");
            assert_ne!(
                next.svids[0].x509_svid_key, prev.svids[0].x509_svid_key,
                "rotation {round}: a new key"
            );
            // Renewed while the previous SVID was still valid: the new one was issued (its
            // back-dated notBefore plus the cushion) before the previous notAfter. Delivery
            // latency on a loaded machine is not what is measured here.
            let validity = parse_cert(&leaf).validity().clone();
            let issued = validity.not_before.timestamp() + NOT_BEFORE_CUSHION.as_secs() as i64;
            assert!(
                issued < prev_not_after,
                "rotation {round}: issued at {issued}, after the previous SVID expired at {prev_not_after}"
            );
            assert!(
                validity.not_after.timestamp() > prev_not_after,
                "rotation {round}: later notAfter"
            );
            check_leaf(
                &leaf,
                &next.svids[0].x509_svid_key,
                &split_der(&next.svids[0].bundle)[0],
                &id,
            );
            prev = next;
        }
    };

    let source = async {
        let source = spiffe::X509Source::builder()
            .endpoint(d2.endpoint())
            .build()
            .await
            .expect("X509Source");
        let mut seen = vec![source.svid().unwrap().leaf().as_bytes().to_vec()];
        let rotated = eventually(Duration::from_secs(20), || {
            if let Ok(held) = source.svid() {
                let leaf = held.leaf().as_bytes().to_vec();
                if seen.last() != Some(&leaf) {
                    seen.push(leaf);
                }
            }
            seen.len() >= 3
        })
        .await;
        assert!(
            rotated,
            "ST-03: X509Source saw {} rotations in 20 s with an 8 s TTL; daemon log:\n{}",
            seen.len() - 1,
            d2.stderr()
        );
        // What it holds is valid.
        let held = source.svid().expect("X509Source holds a usable SVID");
        assert!(
            now()
                < parse_cert(held.leaf().as_bytes())
                    .validity()
                    .not_after
                    .timestamp()
        );
        source.shutdown().await;
    };
    tokio::join!(raw_stream, source);
}

/// ST-02, ST-09, G-10: many parallel one-shot fetches (each reads the first message and
/// cancels the stream) all get their first message promptly, and leave no stream open
/// behind: the daemon's open-streams gauge goes back to 0 and nothing is logged as an error.
#[tokio::test]
async fn one_shot_fetches_leave_no_streams_st_09() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(tmp.path(), &[]);
    let gauge = || metric(&d.admin, "agentid_node_open_streams");
    assert_eq!(gauge(), 0.0);

    // The gauge really counts streams: a held stream shows up, and goes away when dropped.
    let mut c = client(&d).await;
    let mut held = c
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    held.message().await.unwrap().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || gauge() == 1.0).await,
        "a held stream is counted: {}",
        gauge()
    );
    drop(held);
    assert!(
        eventually(Duration::from_secs(5), || gauge() == 0.0).await,
        "a dropped stream is released: {}",
        gauge()
    );

    let sc = spiffe_client(&d).await;
    let fetches = (0..60).map(|i| {
        let sc = sc.clone();
        async move {
            let r = match i % 3 {
                0 => sc.fetch_x509_svid().await.map(|_| ()),
                1 => sc.fetch_x509_bundles().await.map(|_| ()),
                _ => sc.fetch_jwt_bundles().await.map(|_| ()),
            };
            r.map_err(|e| format!("fetch {i}: {e}"))
        }
    });
    let results = timeout(Duration::from_secs(20), futures::future::join_all(fetches))
        .await
        .expect("ST-02: every one-shot fetch gets its first message");
    for r in results {
        r.unwrap();
    }
    // And through separate connections, the way separate processes do.
    for _ in 0..10 {
        spiffe_client(&d).await.fetch_x509_svid().await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || gauge() == 0.0).await,
        "ST-09/G-10: cancelled streams are released, gauge {}",
        gauge()
    );
    let log = d.stderr();
    assert!(
        !log.contains("ERROR"),
        "ST-09: cancellation is not an error:\n{log}"
    );
}

/// WA §7: the WIT-SVID profile is not supported, so its RPCs answer Unimplemented.
#[tokio::test]
async fn wit_svid_rpcs_unimplemented() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(tmp.path(), &[]);
    let mut c = client(&d).await;
    let s = expect_err(
        c.fetch_witsvid(WitsvidRequest {
            spiffe_id: String::new(),
        })
        .await
        .map(|_| ()),
        "FetchWITSVID",
    );
    assert_status(&s, Code::Unimplemented, None, "FetchWITSVID");
    let s = expect_err(
        c.fetch_wit_bundles(WitBundlesRequest {}).await.map(|_| ()),
        "FetchWITBundles",
    );
    assert_status(&s, Code::Unimplemented, None, "FetchWITBundles");
}

/// FB-01..FB-03, G-3, G-4: every bundle map is keyed `spiffe://<td>` (no trailing slash), the
/// own trust domain never appears among federated bundles, and bundles of different trust
/// domains are never merged: each daemon's maps hold only its own trust domain and its CAs
/// do not vouch for the other's SVIDs.
#[tokio::test]
async fn bundle_map_keys_fb_01_to_fb_03() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Daemon::start_in(&tmp.path().join("a"), &[]);
    let b = Daemon::start_in(&tmp.path().join("b"), &["--trust-domain", "other.test"]);
    let mut svid_of = Vec::new();
    for (d, td) in [(&a, TD), (&b, "other.test")] {
        let mut c = client(d).await;
        let x = c
            .fetch_x509svid(X509svidRequest {})
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap();
        assert!(
            x.federated_bundles.is_empty(),
            "G-4: no own TD among federated bundles ({td})"
        );
        let xb = c
            .fetch_x509_bundles(X509BundlesRequest {})
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap();
        let jb = c
            .fetch_jwt_bundles(JwtBundlesRequest {})
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap();
        for keys in [
            xb.bundles.keys().collect::<Vec<_>>(),
            jb.bundles.keys().collect::<Vec<_>>(),
        ] {
            assert_eq!(
                keys,
                [&format!("spiffe://{td}")],
                "FB-01/G-3: keyed by the TD's SPIFFE ID"
            );
            // Real clients parse the key as a trust domain.
            assert_eq!(spiffe::TrustDomain::new(keys[0]).unwrap().to_string(), td);
        }
        assert_eq!(
            xb.bundles[&format!("spiffe://{td}")],
            x.svids[0].bundle,
            "FB-03: the map names the bundle's TD"
        );
        svid_of.push((
            split_der(&x.svids[0].x509_svid)[0].clone(),
            split_der(&x.svids[0].bundle),
        ));
    }
    // FB-02: each trust domain's CAs sign only its own SVIDs.
    let (leaf_a, cas_a) = &svid_of[0];
    let (leaf_b, cas_b) = &svid_of[1];
    assert_ne!(cas_a, cas_b, "separate authorities");
    assert!(signed_by(&parse_cert(leaf_a), &parse_cert(&cas_a[0])));
    assert!(
        !signed_by(&parse_cert(leaf_a), &parse_cert(&cas_b[0])),
        "FB-02"
    );
    assert!(
        !signed_by(&parse_cert(leaf_b), &parse_cert(&cas_a[0])),
        "FB-02"
    );
}

/// Section 4.7: the DER encodings of every binary field.
#[tokio::test]
async fn der_encodings_4_7() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(tmp.path(), &[]);
    let mut c = client(&d).await;
    let x = c
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let s = &x.svids[0];

    // x509_svid: DER certificates back to back, leaf first, no padding, not PEM.
    let chain = split_der(&s.x509_svid);
    assert_eq!(
        chain.concat(),
        s.x509_svid,
        "no bytes between or after certificates"
    );
    assert!(
        !parse_cert(&chain[0])
            .basic_constraints()
            .unwrap()
            .unwrap()
            .value
            .ca,
        "leaf first"
    );

    // x509_svid_key: one PKCS#8 PrivateKeyInfo (version 0, id-ecPublicKey), not SEC1 or PKCS#1.
    let key = &s.x509_svid_key;
    assert_eq!(key[0], 0x30, "a DER SEQUENCE");
    let header = if key[1] & 0x80 == 0 {
        2
    } else {
        2 + (key[1] & 0x7f) as usize
    };
    let len = if key[1] & 0x80 == 0 {
        key[1] as usize
    } else {
        key[2..header].iter().fold(0, |a, b| a * 256 + *b as usize)
    };
    assert_eq!(header + len, key.len(), "exactly one DER structure");
    assert_eq!(
        &key[header..header + 3],
        [0x02, 0x01, 0x00],
        "PKCS#8 version 0 (SEC1 would be 1)"
    );
    let ec_public_key = [0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    assert!(
        key.windows(ec_public_key.len()).any(|w| w == ec_public_key),
        "PKCS#8 AlgorithmIdentifier id-ecPublicKey"
    );
    check_key_matches(key, &parse_cert(&chain[0]));

    // bundle, federated_bundles, X509BundlesResponse.bundles: DER CA certificates back to back.
    let cas = split_der(&s.bundle);
    assert_eq!(cas.concat(), s.bundle);
    let xb = c
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    for v in xb.bundles.values() {
        assert_eq!(split_der(v).concat(), *v);
    }
    // JWTBundlesResponse.bundles: UTF-8 JSON bytes (not base64).
    let jb = c
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    for v in jb.bundles.values() {
        let text = std::str::from_utf8(v).expect("UTF-8");
        assert!(
            text.trim_start().starts_with('{'),
            "JSON object, not base64: {text}"
        );
        serde_json::from_str::<serde_json::Value>(text).expect("JSON");
    }
    assert!(x.crl.is_empty() && xb.crl.is_empty(), "no CRLs are sent");
}
