//! Python interoperability: py-spiffe and bare grpcio (both gRPC C-core) against the real
//! `agentid up` (SPIFFE-CONFORMANCE §4.3; the `:authority` fix-up in src/node/h2_authority.rs).
//!
//! Needs `python3` with `pip install -r tests/requirements.txt`; without it these tests fail
//! and say so (`.ci/run` installs it). They are never skipped.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentid::node::h2_authority::is_valid_authority;
use common::Daemon;

const SETUP: &str =
    "run `pip install -r tests/requirements.txt` (.ci/run does this before `cargo test`)";
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// Fails the test, with what to install, unless `python3` can import py-spiffe and grpcio.
fn require_python() {
    let out = Command::new("python3")
        .args(["-c", "import spiffe, grpc, cryptography"])
        .output()
        .unwrap_or_else(|e| panic!("python3 not found ({e}): install Python 3, then {SETUP}"));
    assert!(
        out.status.success(),
        "python3 cannot import py-spiffe: {}\n{SETUP}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `python3 tests/python/<name> args…` with `SPIFFE_ENDPOINT_SOCKET=endpoint`, killing
/// it after `SCRIPT_TIMEOUT`. Output goes to files in `dir` so a chatty script cannot block.
fn run_python(dir: &Path, name: &str, args: &[&str], endpoint: &str) -> Run {
    let (out_path, err_path) = (
        dir.join(format!("{name}.stdout")),
        dir.join(format!("{name}.stderr")),
    );
    let mut child = Command::new("python3")
        .arg(script(name))
        .args(args)
        .env("SPIFFE_ENDPOINT_SOCKET", endpoint)
        .env("PYTHONUNBUFFERED", "1")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): {SETUP}"));
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let mut stderr = read(&err_path);
    if status.is_none() {
        stderr.push_str(&format!("\n(killed after {SCRIPT_TIMEOUT:?})"));
    }
    Run {
        code: status.and_then(|s| s.code()),
        stdout: read(&out_path),
        stderr,
    }
}

/// Asserts the script passed; otherwise shows its output and the daemon's log.
fn assert_passed(run: &Run, d: &Daemon, what: &str) {
    assert!(
        run.code == Some(0) && run.stdout.trim_end().ends_with("all checks passed"),
        "{what}: exit {:?}\n--- stdout\n{}--- stderr\n{}--- agentid log\n{}",
        run.code,
        run.stdout,
        run.stderr,
        d.stderr()
    );
    println!("{what}:\n{}", run.stdout);
}

/// `GET http://<admin>/metrics` with a bare HTTP/1.1 request.
fn metrics(d: &Daemon) -> String {
    let addr = d.admin.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("admin {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// Waits until the daemon has released every Workload API stream the client opened:
/// cancelled watches must reach the server, not linger until the connection drops.
fn assert_no_open_streams(d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics(d);
        if m.lines().any(|l| l == "agentid_node_open_streams 0") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Workload API streams still open after the client closed them:\n{}",
            m.lines()
                .filter(|l| l.contains("open_streams"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn default_id() -> String {
    let name = agentid::node::attest::user_name(common::my_uid()).expect("user name of this uid");
    format!("spiffe://agentid.local/user/{name}")
}

/// The README's promise: py-spiffe works unchanged against a zero-config `agentid up`.
#[test]
fn py_spiffe_against_zero_config_up() {
    require_python();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(tmp.path(), &[]);
    let run = run_python(tmp.path(), "interop.py", &[&default_id()], &d.endpoint());
    assert_passed(&run, &d, "tests/python/interop.py");
    assert_no_open_streams(&d);
}

/// An open py-spiffe watch receives the update a policy change causes, on the same stream.
#[test]
fn py_spiffe_stream_receives_pushed_policy_change() {
    require_python();
    let tmp = tempfile::tempdir().unwrap();
    let policies = tmp.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let uid = common::my_uid();
    common::write_policy(
        &policies,
        "main.yaml",
        &common::policy_doc("py-main", "/agent/py-main", uid, ""),
    );
    let pending = common::write_policy(
        tmp.path(),
        "pushed.yaml.off",
        &common::policy_doc("py-pushed", "/agent/py-pushed", uid, ""),
    );
    let d = Daemon::start_in(tmp.path(), &["--policy", policies.to_str().unwrap()]);
    let pushed = policies.join("pushed.yaml");
    let args = [
        "spiffe://agentid.local/agent/py-main",
        "--add-policy",
        pending.to_str().unwrap(),
        pushed.to_str().unwrap(),
        "--expect-pushed-id",
        "spiffe://agentid.local/agent/py-pushed",
    ];
    let run = run_python(tmp.path(), "interop.py", &args, &d.endpoint());
    assert_passed(&run, &d, "tests/python/interop.py --add-policy");
    assert!(
        run.stdout
            .contains("ok   stream_x509_contexts pushed policy change"),
        "{}",
        run.stdout
    );
    assert_no_open_streams(&d);
}

/// Reads one HTTP/2 client connection on `listener` up to its first complete header block
/// and returns the decoded `:authority`. Answers SETTINGS so the client proceeds.
fn capture_authority(listener: UnixListener) -> Result<String, String> {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(format!("no connection from grpcio: {e}")),
        }
    };
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0])
        .map_err(|e| e.to_string())?; // SETTINGS {}
    let mut preface = [0u8; 24];
    s.read_exact(&mut preface)
        .map_err(|e| format!("preface: {e}"))?;
    if &preface != b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
        return Err(format!("not HTTP/2: {preface:?}"));
    }
    let mut block = Vec::new();
    loop {
        let mut head = [0u8; 9];
        s.read_exact(&mut head)
            .map_err(|e| format!("frame header: {e}"))?;
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (ty, flags) = (head[3], head[4]);
        let mut payload = vec![0; len];
        s.read_exact(&mut payload)
            .map_err(|e| format!("frame payload: {e}"))?;
        match ty {
            0x4 if flags & 0x1 == 0 => s
                .write_all(&[0, 0, 0, 0x4, 0x1, 0, 0, 0, 0])
                .map_err(|e| e.to_string())?,
            0x1 | 0x9 => {
                let mut frag = &payload[..];
                if ty == 0x1 && flags & 0x8 != 0 {
                    let pad = usize::from(frag[0]);
                    frag = &frag[1..frag.len() - pad];
                }
                if ty == 0x1 && flags & 0x20 != 0 {
                    frag = &frag[5..];
                }
                block.extend_from_slice(frag);
                if flags & 0x4 != 0 {
                    break;
                }
            }
            _ => {}
        }
    }
    let fields = loona_hpack::Decoder::new()
        .decode(&block)
        .map_err(|e| format!("hpack: {e:?}"))?;
    fields
        .iter()
        .find(|(n, _)| n == b":authority")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .ok_or_else(|| format!("no :authority in {} header fields", fields.len()))
}

/// Why the fix-up exists, shown with the grpcio installed here: C-core puts the socket path
/// in `:authority`, which the `h2` crate rejects; agentid still answers every call, over many
/// calls on one connection (HPACK dynamic-table references and evictions) and concurrent
/// streams.
#[test]
fn bare_grpcio_needs_and_gets_the_authority_fix_up() {
    require_python();
    let tmp = tempfile::tempdir().unwrap();

    // 1. What grpcio sends, recorded by a fake server on a Unix socket.
    let fake = tmp.path().join("fake.sock");
    let listener = UnixListener::bind(&fake).unwrap();
    let capture = std::thread::spawn(move || capture_authority(listener));
    let probe = run_python(
        tmp.path(),
        "raw_grpc.py",
        &["--probe"],
        &format!("unix://{}", fake.display()),
    );
    let authority = capture.join().unwrap().unwrap_or_else(|e| {
        panic!(
            "capturing grpcio's request: {e}\n{}{}",
            probe.stdout, probe.stderr
        )
    });
    assert!(
        !is_valid_authority(&authority),
        "grpcio now sends :authority {authority:?}, which h2 accepts: Python clients no longer need \
         the fix-up in src/node/h2_authority.rs ({})",
        probe.stdout.lines().next().unwrap_or_default()
    );
    println!("grpcio sends :authority {authority:?}, which h2 alone would reject");

    // 2. The same client against agentid.
    let d = Daemon::start_in(&tmp.path().join("agentid"), &[]);
    let run = run_python(tmp.path(), "raw_grpc.py", &[], &d.endpoint());
    assert_passed(&run, &d, "tests/python/raw_grpc.py");
}
