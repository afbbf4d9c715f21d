//! `agentid bench` end to end, shortened: it starts the real daemon and the floor as child
//! processes, drives both from the bench process and reports every figure. The figures of a
//! debug build mean nothing, so only the shape of the report is checked here.

mod common;

use std::process::Command;

/// Runs `agentid bench --json` with `args` and returns its report.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(common::bin())
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .expect("run agentid bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "agentid bench failed: {stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn quick_bench_reports_every_figure_against_the_floor() {
    let report = bench_json(&[
        "--quick",
        "--duration",
        "200ms",
        "--levels",
        "1,3",
        "--jwt-levels",
        "2",
        "--streams",
        "20",
        "--pod-levels",
        "10,300",
        "--node-levels",
        "1,3",
    ]);

    let x509 = report["x509"].as_array().unwrap();
    assert_eq!(x509.len(), 2);
    assert_eq!(x509[1]["clients"], 3);
    for level in x509.iter().chain(report["jwt"].as_array().unwrap()) {
        for server in ["daemon", "floor"] {
            assert!(level[server]["calls"].as_u64().unwrap() > 0, "{level}");
            assert!(level[server]["p99_ms"].as_f64().unwrap() > 0.0, "{level}");
            assert!(level[server]["mean_ms"].as_f64().unwrap() > 0.0, "{level}");
            // Every client is served inside every window, and the spread is reported.
            let [fewest, most] = [0, 1].map(|i| level[server]["client_calls"][i].as_u64());
            assert!(fewest.is_some_and(|n| n > 0), "a client starved: {level}");
            assert!(most >= fewest, "{level}");
        }
        for ratio in ["p50", "p99", "pooled_p50", "pooled_p99", "mean"] {
            assert!(level["ratio"][ratio].as_f64().unwrap() > 0.0, "{level}");
        }
        // One round: the median of the rounds' ratios is that round's ratio, and the round's
        // figures are the pooled ones.
        for server in ["daemon", "floor"] {
            assert_eq!(level[server]["round_p99_ms"][0], level[server]["p99_ms"]);
            assert_eq!(level[server]["round_p50_ms"].as_array().unwrap().len(), 1);
        }
        assert_eq!(
            level["ratio"]["p99"], level["ratio"]["pooled_p99"],
            "{level}"
        );
    }
    assert_eq!(report["jwt"][0]["clients"], 2);
    assert_eq!(report["rss"]["streams"], 20);
    assert!(report["rss"]["ratio"].as_f64().unwrap() > 0.0);
    assert!(report["issuance"]["issued_per_sec"].as_f64().unwrap() > 0.0);
    assert!(report["issuance"]["keyed_issued_per_sec"].as_f64().unwrap() > 0.0);
    assert!(report["issuance"]["raw_signs_per_sec"].as_f64().unwrap() > 0.0);
    let tokens = &report["tokens"];
    for call in ["fetch_jwt", "mint", "delegate"] {
        assert!(tokens[call]["calls"].as_u64().unwrap() > 0, "{tokens}");
        assert!(tokens[call]["p99_ms"].as_f64().unwrap() > 0.0, "{tokens}");
    }
    assert!(tokens["mint_ratio_p50"].as_f64().unwrap() > 0.0, "{tokens}");
    assert!(tokens["verify_per_sec"].as_f64().unwrap() > 0.0, "{tokens}");
    assert!(
        tokens["raw_verify_per_sec"].as_f64().unwrap() > 0.0,
        "{tokens}"
    );
    let cluster = &report["cluster"];
    let levels = cluster["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2, "{cluster}");
    assert_eq!(levels[1]["nodes"], 3);
    for l in levels {
        assert!(l["signs_per_sec"].as_f64().unwrap() > 0.0, "{cluster}");
        assert!(l["server_cpu_us"].as_f64().unwrap() > 0.0, "{cluster}");
    }
    assert_eq!(cluster["push_samples"], 4);
    assert!(cluster["push_p50_ms"].as_f64().unwrap() > 0.0, "{cluster}");
    assert!(cluster["node_rss_mib"].as_f64().unwrap() > 0.0, "{cluster}");
    let drift = &report["drift"];
    assert_eq!(drift["samples"], 5);
    assert!(drift["p50_ms"].as_f64().unwrap() > 0.0, "{drift}");
    assert!(drift["max_ms"].as_f64().unwrap() >= drift["p50_ms"].as_f64().unwrap());
    // Kubernetes attestation needs root and cgroups, which these tests have (and must).
    let pods = &report["pods"];
    assert!(pods["unavailable"].is_null(), "{pods}");
    let levels = pods["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    assert_eq!(levels[1]["pods"], 300);
    for l in levels {
        assert!(l["attest_p50_us"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["ratio_p50"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["approx_bytes_per_pod"].as_u64().unwrap() > 0, "{l}");
    }
    // 3 figures per load level, plus memory and issuance.
    assert_eq!(report["targets"].as_array().unwrap().len(), 3 * 3 + 2);
}

#[test]
fn calibration_puts_a_second_floor_in_the_daemons_column() {
    let report = bench_json(&[
        "--quick",
        "--calibrate",
        "--calibrate-spin",
        "20ms",
        "--duration",
        "300ms",
        "--levels",
        "2",
        "--jwt-levels",
        "1",
        "--streams",
        "5",
        "--pod-levels",
        "10",
        "--node-levels",
        "1",
    ]);
    assert_eq!(report["setup"]["calibrate"], true);
    assert_eq!(report["setup"]["calibrate_spin_us"], 20_000.0);
    // The daemon's column is the second floor: every call in it took the 20 ms it spins,
    // which no daemon call takes, and the first floor does not spin.
    for level in [&report["x509"][0], &report["jwt"][0]] {
        let column = level["daemon"]["p50_ms"].as_f64().unwrap();
        assert!(column >= 20.0, "{level}");
        assert!(
            level["floor"]["p50_ms"].as_f64().unwrap() < column,
            "{level}"
        );
    }
}
