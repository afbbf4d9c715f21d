//! `agentid bench`: the Workload API daemon measured against a floor in the same run.
//!
//! The daemon under test is the real `agentid up`, started as a child process; this process
//! is its client, so every call goes through Unix attestation of this process, policy
//! matching and the SVID cache. The floor (`floor.rs`) is a minimal tonic server sending
//! pre-made answers, in a child process of its own. Load levels alternate between the two
//! (floor, daemon, floor, daemon...) so drift on a shared machine hits both alike, and every
//! figure is reported as daemon/floor. Issuance is measured against raw ECDSA signing.
pub mod attest;
pub mod cluster;
pub mod floor;
pub mod load;
pub mod pods;
pub mod procs;
pub mod signing;
pub mod stats;
pub mod tokens;

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::cli::BenchArgs;
use load::Call;
use procs::{ScratchDir, Server};
use signing::Signing;
use stats::Summary;

/// Latency and memory may cost at most this much over the floor.
pub const MAX_OVER_FLOOR: f64 = 1.5;
/// Issuance must reach at least this fraction of the raw signing rate.
pub const MIN_ISSUANCE_RATIO: f64 = 0.5;

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub setup: Setup,
    pub x509: Vec<Level>,
    pub jwt: Vec<Level>,
    pub rss: Rss,
    pub issuance: Signing,
    pub tokens: tokens::Tokens,
    pub cluster: cluster::Cluster,
    pub drift: attest::Drift,
    pub pods: attest::Pods,
    pub targets: Vec<Target>,
}

/// How the run was made.
#[derive(Debug, Serialize)]
pub struct Setup {
    pub cpus: usize,
    pub release_build: bool,
    /// Length of one measuring window (one server, one round, one level).
    pub window_ms: u128,
    pub rounds: usize,
    pub open_files_limit: u64,
    /// A second floor stood where the daemon goes (`--calibrate`).
    pub calibrate: bool,
    /// What that floor busy-waited in every call (`--calibrate-spin`), in microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibrate_spin_us: Option<f64>,
}

/// One load level: both servers and their ratios.
#[derive(Debug, Serialize)]
pub struct Level {
    pub clients: usize,
    pub daemon: Summary,
    pub floor: Summary,
    pub ratio: Ratios,
}

/// daemon / floor for each figure.
#[derive(Debug, Serialize)]
pub struct Ratios {
    /// The median over rounds of each round's p50 ratio (see [`stats::paired_median`]).
    pub p50: f64,
    /// The median over rounds of each round's p99 ratio.
    pub p99: f64,
    /// The ratio of the percentiles of all rounds' calls pooled, for comparison: a stall
    /// in a few windows of one server sets it.
    pub pooled_p50: f64,
    pub pooled_p99: f64,
    pub mean: f64,
    pub per_sec: f64,
    pub server_cpu: f64,
}

/// Resident memory of each server process.
#[derive(Debug, Serialize)]
pub struct Rss {
    pub streams: usize,
    pub daemon_idle_mib: f64,
    pub floor_idle_mib: f64,
    pub daemon_mib: f64,
    pub floor_mib: f64,
    /// daemon / floor with the streams open.
    pub ratio: f64,
}

/// One target and whether this run met it.
#[derive(Debug, Serialize)]
pub struct Target {
    pub what: String,
    pub value: f64,
    /// `<= 1.5` or `>= 0.5`.
    pub target: String,
    pub met: bool,
}

/// The longest uncounted window per server and load level.
const WARM_UP: Duration = Duration::from_millis(500);

struct Plan {
    window: Duration,
    rounds: usize,
    levels: Vec<usize>,
    jwt_levels: Vec<usize>,
    streams: usize,
}

impl Plan {
    fn from(args: &BenchArgs) -> Self {
        let (duration, rounds) = if args.quick {
            (args.duration.min(Duration::from_millis(500)), 1)
        } else {
            (args.duration, args.rounds.max(1))
        };
        Self {
            window: duration / rounds as u32,
            rounds,
            levels: args.levels.clone(),
            jwt_levels: args.jwt_levels.clone(),
            streams: args.streams,
        }
    }
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

/// `agentid bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let plan = Plan::from(&args);
    if cfg!(debug_assertions) {
        progress("this is a debug build; figures mean little (use cargo run --release -- bench)");
    }
    let open_files_limit = procs::raise_nofile_limit();
    let dir = ScratchDir::new()?;
    let exe = std::env::current_exe()?;
    let (id, _) = floor::default_identity()?;

    let mut floor = Server::floor(&exe, dir.path())?;
    let mut daemon = if args.calibrate {
        Server::floor_named(&exe, dir.path(), "floor-2", args.calibrate_spin)?
    } else {
        Server::daemon(&exe, dir.path())?
    };
    floor.ready().await?;
    daemon.ready().await?;
    // First calls issue the SVID and JWT-SVID and hash this executable: the cache is warm after.
    for s in [&floor, &daemon] {
        for call in [Call::X509, Call::Jwt] {
            load::run(&s.socket, 1, call, Duration::ZERO, || s.cpu_time()).await?;
        }
    }

    // Memory first, while both processes have only been warmed up.
    progress(&format!("memory with {} open streams", plan.streams));
    let rss = measure_rss(&floor, &daemon, plan.streams).await?;

    let mut x509 = Vec::new();
    for &n in &plan.levels {
        progress(&format!("FetchX509SVID, {n} clients"));
        x509.push(measure_level(&plan, &floor, &daemon, Call::X509, n).await?);
    }
    let mut jwt = Vec::new();
    for &n in &plan.jwt_levels {
        progress(&format!("FetchJWTSVID, {n} clients"));
        jwt.push(measure_level(&plan, &floor, &daemon, Call::Jwt, n).await?);
    }
    drop((floor, daemon));

    progress("X.509 issuance and raw ECDSA P-256 signing");
    let state = dir.path().join("bench-authority");
    let (window, rounds) = (plan.window, plan.rounds);
    let issuance =
        tokio::task::spawn_blocking(move || signing::measure(&state, &id, window, rounds))
            .await??;

    progress("task tokens: mint and delegate through the socket, verification");
    let tokens = tokens::measure(&exe, dir.path(), plan.window, plan.rounds).await?;

    progress("cluster: server signing for node connections, policy push to a node's stream");
    let push_samples = if args.quick { 4 } else { 40 };
    let cluster = cluster::measure(
        &exe,
        dir.path(),
        &args.node_levels,
        plan.window,
        push_samples,
    )
    .await?;

    progress("Kubernetes attestation against pod index size");
    let pods = attest::pods(&args.pod_levels, if args.quick { 200 } else { 5000 }).await;

    progress("config drift: file change to stream withdrawal");
    let drift = attest::drift(&exe, dir.path(), if args.quick { 5 } else { 50 }).await?;

    let report = Report {
        setup: Setup {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            release_build: !cfg!(debug_assertions),
            window_ms: plan.window.as_millis(),
            rounds: plan.rounds,
            open_files_limit,
            calibrate: args.calibrate,
            calibrate_spin_us: args.calibrate_spin.map(|d| d.as_secs_f64() * 1e6),
        },
        targets: targets(&x509, &jwt, &rss, &issuance),
        x509,
        jwt,
        rss,
        issuance,
        tokens,
        cluster,
        drift,
        pods,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

async fn measure_level(
    plan: &Plan,
    floor: &Server,
    daemon: &Server,
    call: Call,
    clients: usize,
) -> anyhow::Result<Level> {
    // A window per server that is not counted: whichever server the first counted window
    // went to took the run's warm-up, and its p99 sat on the scheduler tick in that round.
    let warm_up = plan.window.min(WARM_UP);
    for server in [floor, daemon] {
        load::run(&server.socket, clients, call, warm_up, || server.cpu_time()).await?;
    }
    let (mut f, mut d) = (load::Window::default(), load::Window::default());
    for round in 0..plan.rounds {
        let mut order = [(floor, &mut f), (daemon, &mut d)];
        // Who goes first alternates (floor, daemon; daemon, floor; ...), so whatever the
        // first or second window of a round has in common falls on both alike.
        if round % 2 == 1 {
            order.reverse();
        }
        for (server, pooled) in order {
            let w = load::run(&server.socket, clients, call, plan.window, || {
                server.cpu_time()
            })
            .await?;
            pooled.pool(w);
        }
    }
    let total = plan.window * plan.rounds as u32;
    let (floor, daemon) = (f.summary(total), d.summary(total));
    let paired = |d: &[f64], f: &[f64]| stats::paired_median(d, f).unwrap_or(f64::NAN);
    Ok(Level {
        clients,
        ratio: Ratios {
            p50: paired(&daemon.round_p50_ms, &floor.round_p50_ms),
            p99: paired(&daemon.round_p99_ms, &floor.round_p99_ms),
            pooled_p50: daemon.p50_ms / floor.p50_ms,
            pooled_p99: daemon.p99_ms / floor.p99_ms,
            mean: daemon.mean_ms / floor.mean_ms,
            per_sec: daemon.per_sec / floor.per_sec,
            server_cpu: daemon.server_cpu_us / floor.server_cpu_us,
        },
        daemon,
        floor,
    })
}

async fn measure_rss(floor: &Server, daemon: &Server, streams: usize) -> anyhow::Result<Rss> {
    const MIB: f64 = 1024.0 * 1024.0;
    let (floor_idle, daemon_idle) = (floor.rss_bytes()?, daemon.rss_bytes()?);
    let mut held = Vec::new();
    for server in [floor, daemon] {
        let open = load::open_streams(&server.socket, streams).await?;
        // Let the server finish whatever the last accepted streams started.
        tokio::time::sleep(Duration::from_millis(500)).await;
        held.push(server.rss_bytes()?);
        drop(open);
    }
    let (floor_rss, daemon_rss) = (held[0] as f64, held[1] as f64);
    Ok(Rss {
        streams,
        daemon_idle_mib: daemon_idle as f64 / MIB,
        floor_idle_mib: floor_idle as f64 / MIB,
        daemon_mib: daemon_rss / MIB,
        floor_mib: floor_rss / MIB,
        ratio: daemon_rss / floor_rss,
    })
}

fn clients_label(n: usize) -> String {
    format!("{n} client{}", if n == 1 { "" } else { "s" })
}

fn targets(x509: &[Level], jwt: &[Level], rss: &Rss, issuance: &Signing) -> Vec<Target> {
    let at_most = |what: String, value: f64, limit: f64| Target {
        what,
        value,
        target: format!("<= {limit}"),
        met: value <= limit,
    };
    let at_least = |what: String, value: f64, limit: f64| Target {
        what,
        value,
        target: format!(">= {limit:.2}"),
        met: value >= limit,
    };
    let mut out = Vec::new();
    for (name, levels) in [("FetchX509SVID", x509), ("FetchJWTSVID", jwt)] {
        for l in levels {
            let n = clients_label(l.clients);
            out.push(at_most(
                format!("{name} {n} p50"),
                l.ratio.p50,
                MAX_OVER_FLOOR,
            ));
            out.push(at_most(
                format!("{name} {n} p99"),
                l.ratio.p99,
                MAX_OVER_FLOOR,
            ));
            out.push(at_least(
                format!("{name} {n} rate"),
                l.ratio.per_sec,
                1.0 / MAX_OVER_FLOOR,
            ));
        }
    }
    out.push(at_most(
        format!("RSS with {} streams", rss.streams),
        rss.ratio,
        MAX_OVER_FLOOR,
    ));
    out.push(at_least(
        "X.509 issuance / raw signing".into(),
        issuance.ratio,
        MIN_ISSUANCE_RATIO,
    ));
    out
}

/// The human table: ratios first, then the absolute figures.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let s = &r.setup;
    let _ = writeln!(
        out,
        "agentid bench: {} build, {} CPUs shared by the clients and both servers,\n\
         {} round(s) of {} ms per level and server, floor and daemon in alternating order;\n\
         p50 and p99 ratios are the median of the rounds' ratios\n",
        if s.release_build { "release" } else { "DEBUG" },
        s.cpus,
        s.rounds,
        s.window_ms
    );
    if s.calibrate {
        let _ = writeln!(
            out,
            "CALIBRATION (--calibrate): a second floor stands in the daemon's column, so every\n\
             ratio is the difference between two identical servers on this machine{}\n",
            match s.calibrate_spin_us {
                Some(us) => format!(",\nbut for the {us:.0} us that one busy-waits in every call"),
                None => String::new(),
            }
        );
    }
    let target = |what: &str| r.targets.iter().find(|t| t.what == what);
    let head = |out: &mut String, title: &str, a: &str, b: &str| {
        let _ = writeln!(
            out,
            "{title:<30} {:>7}  {:<8} {:<6} {a:>11}  {b:>11}",
            "ratio", "target", ""
        );
    };
    let row =
        |out: &mut String, label: &str, t: Option<&Target>, ratio: f64, a: String, b: String| {
            let (goal, met) = match t {
                Some(t) => (t.target.as_str(), if t.met { "ok" } else { "MISSED" }),
                None => ("", ""),
            };
            let _ = writeln!(
                out,
                "  {label:<28} {ratio:>6.2}x  {goal:<8} {met:<6} {a:>11}  {b:>11}"
            );
        };
    for (name, levels) in [("FetchX509SVID", &r.x509), ("FetchJWTSVID", &r.jwt)] {
        if levels.is_empty() {
            continue;
        }
        head(&mut out, name, "daemon", "floor");
        for l in levels {
            let who = clients_label(l.clients);
            let key = |m: &str| format!("{name} {who} {m}");
            let ms = |v: f64| format!("{v:.3} ms");
            let (d, f) = (&l.daemon, &l.floor);
            row(
                &mut out,
                &format!("{who:<12} p50"),
                target(&key("p50")),
                l.ratio.p50,
                ms(d.p50_ms),
                ms(f.p50_ms),
            );
            row(
                &mut out,
                &format!("{:<12} p99", ""),
                target(&key("p99")),
                l.ratio.p99,
                ms(d.p99_ms),
                ms(f.p99_ms),
            );
            row(
                &mut out,
                &format!("{:<12} p99 pooled", ""),
                None,
                l.ratio.pooled_p99,
                String::new(),
                String::new(),
            );
            row(
                &mut out,
                &format!("{:<12} mean", ""),
                None,
                l.ratio.mean,
                ms(d.mean_ms),
                ms(f.mean_ms),
            );
            row(
                &mut out,
                &format!("{:<12} rate", ""),
                target(&key("rate")),
                l.ratio.per_sec,
                format!("{:.0}/s", d.per_sec),
                format!("{:.0}/s", f.per_sec),
            );
            row(
                &mut out,
                &format!("{:<12} server CPU", ""),
                None,
                l.ratio.server_cpu,
                format!("{:.0} us", d.server_cpu_us),
                format!("{:.0} us", f.server_cpu_us),
            );
        }
        out.push('\n');
    }
    let m = &r.rss;
    let mib = |v: f64| format!("{v:.1} MiB");
    head(&mut out, "Server RSS", "daemon", "floor");
    row(
        &mut out,
        &format!("{} open streams", m.streams),
        target(&format!("RSS with {} streams", m.streams)),
        m.ratio,
        mib(m.daemon_mib),
        mib(m.floor_mib),
    );
    row(
        &mut out,
        "idle, before the streams",
        None,
        m.daemon_idle_mib / m.floor_idle_mib,
        mib(m.daemon_idle_mib),
        mib(m.floor_idle_mib),
    );
    out.push('\n');
    let i = &r.issuance;
    head(&mut out, "X.509 issuance, 1 thread", "issuance", "raw sign");
    row(
        &mut out,
        "sign SVID / ECDSA sign",
        target("X.509 issuance / raw signing"),
        i.ratio,
        format!("{:.0}/s", i.issued_per_sec),
        format!("{:.0}/s", i.raw_signs_per_sec),
    );
    // Not a target: a fresh key is a second scalar multiplication, so ~0.5 is its ceiling.
    row(
        &mut out,
        "keygen+sign / ECDSA sign",
        None,
        i.keyed_ratio,
        format!("{:.0}/s", i.keyed_issued_per_sec),
        format!("{:.0}/s", i.raw_signs_per_sec),
    );
    out.push('\n');
    let t = &r.tokens;
    head(&mut out, "Task tokens, 1 client", "p50 / p99", "per call");
    let ms2 = |s: &Summary| format!("{:.3}/{:.3}", s.p50_ms, s.p99_ms);
    let cpu = |s: &Summary| format!("{:.0} us CPU", s.server_cpu_us);
    row(
        &mut out,
        "FetchJWTSVID (baseline)",
        None,
        1.0,
        ms2(&t.fetch_jwt),
        cpu(&t.fetch_jwt),
    );
    row(
        &mut out,
        "MintTaskToken, ms",
        None,
        t.mint_ratio_p50,
        ms2(&t.mint),
        cpu(&t.mint),
    );
    row(
        &mut out,
        "Delegate, ms",
        None,
        t.delegate_ratio_p50,
        ms2(&t.delegate),
        cpu(&t.delegate),
    );
    row(
        &mut out,
        "verify / ES256 verify, 1 core",
        None,
        t.verify_ratio,
        format!("{:.0}/s", t.verify_per_sec),
        format!("{:.0}/s", t.raw_verify_per_sec),
    );
    out.push('\n');
    let c = &r.cluster;
    let _ = writeln!(
        out,
        "Cluster: agentid server signing X509-SVIDs for node connections (raw ECDSA, 1 core: {:.0}/s)",
        c.raw_signs_per_sec
    );
    for l in &c.levels {
        let _ = writeln!(
            out,
            "  {:>4} node(s)  {:>7.0}/s  {:.2}x raw  p50 {:.2} ms  p99 {:.2} ms  server CPU {:.0} us/SVID ({:.0}% signing)",
            l.nodes,
            l.signs_per_sec,
            l.ratio_to_raw,
            l.p50_ms,
            l.p99_ms,
            l.server_cpu_us,
            l.cpu_efficiency * 100.0
        );
    }
    let _ = writeln!(
        out,
        "  policy change -> node stream: p50 {:.0} ms  p99 {:.0} ms ({} samples)\n  RSS: server {:.1} MiB, node {:.1} MiB\n",
        c.push_p50_ms, c.push_p99_ms, c.push_samples, c.server_rss_mib, c.node_rss_mib
    );
    match &r.pods.unavailable {
        Some(why) => {
            let _ = writeln!(out, "Kubernetes attestation: not measured: {why}\n");
        }
        None => {
            let _ = writeln!(
                out,
                "Kubernetes attestation       attest p50/p99   unix p50  ratio   lookup p50/p99   bytes/pod (est., heap)"
            );
            for l in &r.pods.levels {
                let _ = writeln!(
                    out,
                    "  {:>6} pods indexed  {:>6.1}/{:<6.1} us  {:>6.1} us  {:>4.2}x  {:>5}/{:<5} ns   {}, {:.0}",
                    l.pods,
                    l.attest_p50_us,
                    l.attest_p99_us,
                    l.unix_p50_us,
                    l.ratio_p50,
                    l.lookup_p50_ns,
                    l.lookup_p99_ns,
                    l.approx_bytes_per_pod,
                    l.heap_bytes_per_pod
                );
            }
            out.push('\n');
        }
    }
    let dr = &r.drift;
    let _ = writeln!(
        out,
        "Config drift (file written -> open stream withdrawn, {} samples, re-hash every {} s)",
        dr.samples, dr.rehash_interval_s
    );
    let _ = writeln!(
        out,
        "  p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms   target <= 1000 ms: {}\n",
        dr.p50_ms,
        dr.p99_ms,
        dr.max_ms,
        if dr.max_ms <= 1000.0 { "ok" } else { "MISSED" }
    );
    let missed: Vec<&Target> = r.targets.iter().filter(|t| !t.met).collect();
    let _ = writeln!(
        out,
        "targets met: {} of {}",
        r.targets.len() - missed.len(),
        r.targets.len()
    );
    for t in missed {
        let _ = writeln!(
            out,
            "  missed: {} ({:.2}, target {})",
            t.what, t.value, t.target
        );
    }
    out
}
