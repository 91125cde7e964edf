//! A quick run of the benchmark harness (scripts/bench.py) with tiny sizes,
//! so that it keeps working as the code changes. It checks the harness, not
//! the figures: benchmarks are not timed tests.

mod support;

#[test]
fn the_benchmark_harness_runs_every_part_and_writes_its_report() {
    let out = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench.py"))
        .args(["--depro", support::depro_bin()])
        .arg("--consul")
        .arg(support::consul_bin())
        .args([
            "--sizes",
            "1,2",
            "--rounds",
            "1",
            "--changes",
            "3",
            "--cycles",
            "2",
            "--idle",
            "1",
            "--version-counts",
            "2,10",
            "--many",
            "6",
            "--many-rounds",
            "1",
            "--cluster-sizes",
            "3",
            "--cost-keys",
            "200",
            "--cost-samples",
            "5",
            "--b2b-sizes",
            "1",
            "--b2b-rounds",
            "2",
            "--b2b-pause",
            "0.2",
            "--plain-sizes",
            "2",
            "--plain-rounds",
            "1",
            "--big-shapes",
            "20x3",
            "--artifact-sizes",
            "1,2",
            "--artifact-mb",
            "1",
            "--origin-mbps",
            "200",
            "--artifact-rounds",
            "1",
            "--artifact-zone-fleet",
            "2",
            "--events-sizes",
            "2",
            "--events-cycles",
            "1",
        ])
        .arg("--out")
        .arg(out.path())
        .args([
            "--notes",
            "/nonexistent",
            "--command-line",
            "tests/bench_smoke.rs",
        ])
        .status()
        .expect("python3 is needed for the benchmark harness");
    assert!(status.success());
    let report = std::fs::read_to_string(out.path().join("benchmarks.md")).unwrap();
    for section in [
        "## 1. Fleet scaling",
        "## 2. Reaction latency",
        "## 3. Footprint",
        "## 4. Versions under the prefix",
        "agents on this machine",
        "## 6. A 3-server cluster",
        "## 7. What a request costs the server",
        "## 8. Back-to-back deploys",
        "## 9. The seed's protocol",
        "## 10. Commands on big trees",
        "## 11. Artifacts",
        "## 12. `depro events`",
        "## Targets",
    ] {
        assert!(report.contains(section), "{section} missing:\n{report}");
    }
    assert!(report.contains("| 2 |"), "no row for N=2:\n{report}");
    assert!(
        report.contains("| 60 (20 × 3) |"),
        "no row for the 20 × 3 tree:\n{report}"
    );
    let chart = std::fs::read_to_string(out.path().join("fleet-scaling.svg")).unwrap();
    assert_eq!(chart.matches("<polyline").count(), 4);
}
