//! What depro ships, as `packaging/build.sh` leaves it under `dist/`: the
//! static binary, the .deb and the .rpm. These tests install the .deb on
//! this machine (they need root, as `dpkg -i` does), so they run one at a
//! time, and put the machine back as it was.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use support::Fleet;

/// dpkg and rpm operations must not overlap.
static SYSTEM: Mutex<()> = Mutex::new(());

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn dist(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("dist")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run packaging/build.sh first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Runs a command and returns its stdout, failing the test with its output
/// if it fails.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (is it installed? scripts/test.sh installs it): {e}")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_static_binary_has_no_interpreter_is_small_and_deploys() {
    let binary = dist(&format!("depro-{VERSION}-x86_64-unknown-linux-musl"));
    let path = binary.to_str().unwrap();
    assert_static_stripped_small(path, "x86-64");
    let version = run(path, &["--version"]);
    assert!(
        version.starts_with(&format!("depro {VERSION}")),
        "{version}"
    );
    if Path::new(env!("CARGO_MANIFEST_DIR")).join(".git").exists() {
        assert!(
            version.contains("(commit "),
            "built from a checkout: {version}"
        );
    }

    // A real deploy, driven by the static binary, to agents on the test Consul.
    let fleet = Fleet::start(2);
    let out = Command::new(path)
        .args([
            "deploy",
            "v1",
            "-nodes=2",
            &format!("-prefix={}", fleet.prefix),
        ])
        .arg(format!("-server={}", fleet.consul.addr()))
        .output()
        .unwrap();
    let stdout = support::Output::of(out).ok().to_string();
    assert!(stdout.contains("active on 2/2 nodes"), "{stdout}");
    fleet.expect_active("v1");
}

/// Each static binary's budget: Cargo.toml's `max-binary-bytes`, which
/// packaging/build.sh reads too.
fn max_binary_bytes() -> u64 {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    manifest
        .lines()
        .find_map(|line| line.strip_prefix("max-binary-bytes = "))
        .and_then(|value| value.trim().parse().ok())
        .expect("Cargo.toml: max-binary-bytes = N under [package.metadata.depro]")
}

/// A shipped binary: static (no ELF interpreter), stripped, for `machine`
/// (as file(1) names it), and within the budget.
fn assert_static_stripped_small(path: &str, machine: &str) {
    let kind = run("file", &[path]);
    assert!(
        kind.contains("statically linked") || kind.contains("static-pie linked"),
        "{kind}"
    );
    assert!(kind.contains(machine), "{kind}");
    assert!(!kind.contains("interpreter"), "{kind}");
    assert!(
        kind.contains("stripped") && !kind.contains("not stripped"),
        "{kind}"
    );
    let headers = run("readelf", &["--program-headers", path]);
    assert!(!headers.contains("INTERP"), "{headers}");
    let size = std::fs::metadata(path).unwrap().len();
    let budget = max_binary_bytes();
    assert!(size <= budget, "{path}: {size} bytes, over {budget}");
}

#[test]
fn the_size_check_passes_each_shipped_binary_and_names_the_toolchain_and_crates_over_budget() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let check = |manifest: Option<&Path>, target: &str| {
        let shipped = dist(&format!("depro-{VERSION}-{target}"));
        let symbols = root.join(format!("target/{target}/release/depro.symbols"));
        let mut command = Command::new(root.join("packaging/size.sh"));
        command.arg("--check");
        if let Some(manifest) = manifest {
            command.arg("--manifest").arg(manifest);
        }
        let out = command.arg(&shipped).arg(&symbols).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for target in [
        "x86_64-unknown-linux-musl",
        "aarch64-unknown-linux-musl",
        "armv7-unknown-linux-musleabihf",
    ] {
        assert_eq!(check(None, target), (Some(0), String::new()), "{target}");
    }
    // Over a budget: one line with the toolchain (read from the binary) and
    // the crates that weigh most, largest first.
    let scratch = tempfile::tempdir().unwrap();
    let manifest = scratch.path().join("Cargo.toml");
    std::fs::write(
        &manifest,
        "[package.metadata.depro]\nmax-binary-bytes = 1000000\n",
    )
    .unwrap();
    let (code, why) = check(Some(&manifest), "x86_64-unknown-linux-musl");
    assert_eq!(code, Some(1), "{why}");
    assert_eq!(why.lines().count(), 1, "{why}");
    for needle in [
        "over the budget of 1000000",
        "max-binary-bytes",
        "built by rustc version 1.",
        "the largest contributors: ",
        "depro ",
        "rustls ",
    ] {
        assert!(why.contains(needle), "{needle:?} missing: {why}");
    }
    let list = why.split("the largest contributors: ").nth(1).unwrap();
    let list = &list[..list.find(';').unwrap()];
    let kilobytes: Vec<u64> = list
        .split(", ")
        .map(|entry| {
            let number = entry
                .strip_suffix(" KB")
                .unwrap_or_else(|| panic!("{entry}"));
            number.rsplit(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(kilobytes.len(), 8, "{why}");
    assert!(kilobytes.windows(2).all(|w| w[0] >= w[1]), "{why}");
}

/// The files a package installs, normalised for comparison: man pages
/// without `.gz`, the environment file and unit at one path.
///
/// lintian warnings kept on purpose (see also the README):
/// - `empty-field Depends`: the binary is static and depends on nothing, and
///   cargo-deb writes the field even when it is empty;
/// - `non-standard-file-perm 0600 != 0644 [etc/default/depro]`: the file may
///   hold the ACL token, so only root may read it.
fn normalise(paths: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    paths
        .into_iter()
        .map(|p| p.trim_start_matches('.').to_string())
        .filter(|p| !p.is_empty() && !p.ends_with('/'))
        // Debian's own files: copyright, changelog, lintian overrides.
        .filter(|p| !p.starts_with("/usr/share/doc/depro/") || p.ends_with("README.md"))
        .filter(|p| !p.starts_with("/usr/share/lintian/"))
        .map(|p| {
            p.trim_end_matches(".gz")
                .replace("/etc/sysconfig/depro", "/etc/default/depro")
                .replace("/lib/systemd/system/", "/usr/lib/systemd/system/")
                // zsh's directory for packaged functions differs by distribution.
                .replace(
                    "/usr/share/zsh/site-functions/",
                    "/usr/share/zsh/vendor-completions/",
                )
                .replace("/usr/usr/", "/usr/")
        })
        .collect()
}

fn deb_files(deb: &str) -> BTreeSet<String> {
    let listing = run("dpkg-deb", &["--contents", deb]);
    normalise(
        listing
            .lines()
            .filter(|l| !l.starts_with('d'))
            .filter_map(|l| l.split_whitespace().nth(5).map(String::from)),
    )
}

#[test]
fn the_deb_installs_keeps_an_edited_conffile_and_purges_clean() {
    let _guard = SYSTEM.lock().unwrap();
    let deb = dist(&format!("depro_{VERSION}_amd64.deb"));
    let deb = deb.to_str().unwrap();
    let example = Path::new("/etc/depro/depro.json.example");

    run("dpkg", &["-i", deb]);
    let installed: Vec<String> = run("dpkg", &["-L", "depro"])
        .lines()
        .map(String::from)
        .collect();
    assert!(run("/usr/bin/depro", &["--version"]).starts_with(&format!("depro {VERSION}")));
    let page = run("man", &["-w", "depro"]);
    assert!(page.trim().ends_with("/man1/depro.1.gz"), "{page}");
    for completion in [
        "/usr/share/bash-completion/completions/depro",
        "/usr/share/zsh/vendor-completions/_depro",
        "/usr/share/fish/vendor_completions.d/depro.fish",
    ] {
        assert!(
            installed.iter().any(|p| p == completion),
            "{completion} not installed: {installed:?}"
        );
    }
    let unit = installed
        .iter()
        .find(|p| p.ends_with("/depro.service"))
        .expect("no unit installed")
        .clone();
    run("systemd-analyze", &["verify", &unit]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata("/etc/default/depro")
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the environment file may hold a token");
    idles_with_the_packaged_config(&unit);
    let conffiles = std::fs::read_to_string("/var/lib/dpkg/info/depro.conffiles").unwrap();
    assert!(
        conffiles.contains("/etc/depro/depro.json.example")
            && conffiles.contains("/etc/default/depro")
    );

    // An edited conffile survives removal and reinstallation.
    let edited = std::fs::read_to_string(example).unwrap() + "// edited by the operator\n";
    std::fs::write(example, &edited).unwrap();
    run("dpkg", &["-r", "depro"]);
    assert!(!Path::new("/usr/bin/depro").exists());
    assert_eq!(
        std::fs::read_to_string(example).unwrap(),
        edited,
        "dpkg -r must keep conffiles"
    );
    run("dpkg", &["--force-confold", "-i", deb]);
    assert_eq!(
        std::fs::read_to_string(example).unwrap(),
        edited,
        "reinstalling overwrote an edited conffile"
    );

    // Purge leaves nothing behind.
    run("dpkg", &["--purge", "depro"]);
    for path in &installed {
        let p = Path::new(path);
        if p.is_dir() {
            continue; // shared directories such as /usr/bin
        }
        assert!(!p.exists(), "{path} is left after purge");
    }
    for path in [
        "/etc/depro",
        "/etc/default/depro",
        "/var/lib/dpkg/info/depro.list",
    ] {
        assert!(!Path::new(path).exists(), "{path} is left after purge");
    }
}

/// Runs the unit's ExecStart as installed: with only the example config it
/// must idle and say so, survive a reload, and stop cleanly.
fn idles_with_the_packaged_config(unit: &str) {
    let text = std::fs::read_to_string(unit).unwrap();
    // The configuration is checked before a start and before a reload,
    // with the command the unit runs.
    let check = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStartPre="))
        .expect("no ExecStartPre");
    assert!(check.contains("agent -check"), "{check}");
    let reload: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ExecReload="))
        .collect();
    assert_eq!(reload.first(), Some(&check), "{reload:?}");
    let words: Vec<&str> = check.split_whitespace().collect();
    let out = Command::new(words[0]).args(&words[1..]).output().unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("is valid"),
        "{out:?}"
    );
    let exec = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("no ExecStart");
    let words: Vec<&str> = exec.split_whitespace().collect();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(words[0])
        .args(&words[1..])
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(log.path()).unwrap_or_default();
    support::wait_for("the idle message", || {
        read().contains("is idle: no deployments configured")
    });
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    support::wait_for("the reload", || read().matches("is idle").count() == 2);
    assert!(child.try_wait().unwrap().is_none(), "{}", read());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0), "{}", read());
}

#[test]
fn lintian_finds_no_errors_in_the_deb() {
    let deb = dist(&format!("depro_{VERSION}_amd64.deb"));
    let out = Command::new("lintian")
        .args(["--no-tag-display-limit", deb.to_str().unwrap()])
        .output()
        .expect("lintian is not installed: apt-get install lintian (scripts/test.sh does)");
    let report = String::from_utf8_lossy(&out.stdout);
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{report}");
}

#[test]
fn the_rpm_has_the_same_files_installs_into_a_scratch_root_and_keeps_configs() {
    let _guard = SYSTEM.lock().unwrap();
    let rpm = dist(&format!("depro-{VERSION}.x86_64.rpm"));
    let rpm = rpm.to_str().unwrap();
    let deb = dist(&format!("depro_{VERSION}_amd64.deb"));

    let rpm_files = normalise(run("rpm", &["-qpl", rpm]).lines().map(String::from));
    assert_eq!(
        rpm_files,
        deb_files(deb.to_str().unwrap()),
        "the .rpm and the .deb ship different files"
    );

    let flags = run(
        "rpm",
        &[
            "-qp",
            "--queryformat",
            "[%{FILENAMES} %{FILEFLAGS:fflags}\n]",
            rpm,
        ],
    );
    for config in ["/etc/depro/depro.json.example", "/etc/sysconfig/depro"] {
        let line = flags
            .lines()
            .find(|l| l.starts_with(config))
            .unwrap_or_else(|| panic!("{config} missing:\n{flags}"));
        let marks = line.split_whitespace().nth(1).unwrap_or("");
        assert!(
            marks.contains('c') && marks.contains('n'),
            "{config} is not %config(noreplace): {line}"
        );
    }

    let root = tempfile::tempdir().unwrap();
    let root_path = root.path().to_str().unwrap();
    run("rpm", &["--root", root_path, "--initdb"]);
    run(
        "rpm",
        &["--root", root_path, "--nodeps", "--noscripts", "-i", rpm],
    );
    let installed = root.path().join("usr/bin/depro");
    assert!(
        run(installed.to_str().unwrap(), &["--version"]).starts_with(&format!("depro {VERSION}"))
    );
    assert!(root.path().join("etc/sysconfig/depro").exists());
    assert!(
        root.path()
            .join("usr/lib/systemd/system/depro.service")
            .exists()
    );
}

/// The ARM builds: target, the qemu-user that runs it here, what file(1)
/// says of its machine, and the architectures of its packages (.deb, .rpm).
const ARM: &[(&str, &str, &str, &str, Option<&str>)] = &[
    (
        "aarch64-unknown-linux-musl",
        "qemu-aarch64-static",
        "ARM aarch64",
        "arm64",
        Some("aarch64"),
    ),
    (
        "armv7-unknown-linux-musleabihf",
        "qemu-arm-static",
        "ARM, EABI5",
        "armhf",
        None,
    ),
];

#[test]
fn each_arm_binary_is_static_small_and_runs_an_agent_among_x86_64_agents_under_qemu() {
    for &(target, qemu, machine, _, _) in ARM {
        let binary = dist(&format!("depro-{VERSION}-{target}"));
        let path = binary.to_str().unwrap();
        assert_static_stripped_small(path, machine);
        let version = run(qemu, &[path, "--version"]);
        assert!(
            version.starts_with(&format!("depro {VERSION}")),
            "{target}: {version}"
        );

        // One ARM agent among two x86_64 agents: it deploys, reports, and
        // rolls out like they do, against the test Consul.
        let mut fleet = Fleet::new(3);
        fleet.agents[1].program = vec![qemu.to_string(), path.to_string()];
        fleet.start_all();
        let exe = std::fs::read_link(format!("/proc/{}/exe", fleet.agents[1].pid())).unwrap();
        assert!(
            exe.to_string_lossy().contains("qemu"),
            "node2 does not run under qemu: {}",
            exe.display()
        );
        fleet.depro(&["deploy", "v1", "-nodes=3"]).ok();
        fleet.expect_active("v1");
        fleet
            .depro(&["deploy", "v2", "-nodes=3", "-no-rollout"])
            .ok();
        assert_eq!(fleet.node_state("v2", "node2").as_deref(), Some("ready"));
        fleet.depro(&["rollout", "v2", "-nodes=3"]).ok();
        fleet.expect_active("v2");
        assert_eq!(
            fleet.agents[1].live("api").as_deref(),
            Some("v2"),
            "{target}:\n{}",
            fleet.agents[1].log()
        );
        fleet.depro(&["remove", "v1", "-wait"]).ok();
        assert!(
            !fleet.agents[1].dir.join("deploy/api/v1").exists(),
            "{target}: v1 not cleaned"
        );
    }
}

/// The machine of the `depro` a package installs, as file(1) says it.
fn packaged_binary_kind(extract: &str, package: &str, dir: &Path) -> String {
    let out = dir.join(package.rsplit('/').next().unwrap());
    std::fs::create_dir_all(&out).unwrap();
    let script = match extract {
        "deb" => format!("dpkg-deb -x {package} {}", out.display()),
        _ => format!(
            "cd {} && rpm2cpio {package} | cpio -id --quiet",
            out.display()
        ),
    };
    run("sh", &["-c", &script]);
    run("file", &[out.join("usr/bin/depro").to_str().unwrap()])
}

#[test]
fn the_arm_packages_install_the_same_files_as_the_x86_64_ones() {
    let amd64 = dist(&format!("depro_{VERSION}_amd64.deb"));
    let x86_64_rpm = dist(&format!("depro-{VERSION}.x86_64.rpm"));
    let deb_reference = deb_files(amd64.to_str().unwrap());
    let rpm_reference = run("rpm", &["-qlp", x86_64_rpm.to_str().unwrap()]);
    let scratch = tempfile::tempdir().unwrap();
    for &(target, _, machine, debarch, rpmarch) in ARM {
        let deb = dist(&format!("depro_{VERSION}_{debarch}.deb"));
        let deb = deb.to_str().unwrap();
        assert_eq!(deb_files(deb), deb_reference, "{deb}");
        assert_eq!(
            run("dpkg-deb", &["--field", deb, "Architecture"]).trim(),
            debarch
        );
        let kind = packaged_binary_kind("deb", deb, scratch.path());
        assert!(kind.contains(machine), "{deb} holds {kind}");
        let Some(rpmarch) = rpmarch else { continue };
        let rpm = dist(&format!("depro-{VERSION}.{rpmarch}.rpm"));
        let rpm = rpm.to_str().unwrap();
        assert_eq!(run("rpm", &["-qlp", rpm]), rpm_reference, "{rpm}");
        assert_eq!(run("rpm", &["-qp", "--qf", "%{ARCH}", rpm]), rpmarch);
        let kind = packaged_binary_kind("rpm", rpm, scratch.path());
        assert!(kind.contains(machine), "{target}: {rpm} holds {kind}");
    }
}

/// `systemd-analyze security --offline`'s overall exposure (0 safe, 10
/// unsafe) of depro.service as packaged, with `drop_in` if given.
fn exposure(drop_in: Option<&Path>) -> f64 {
    let root = tempfile::tempdir().unwrap();
    let units = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(units.join("depro.service.d")).unwrap();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(
        manifest.join("packaging/depro.service"),
        units.join("depro.service"),
    )
    .unwrap();
    if let Some(drop_in) = drop_in {
        std::fs::copy(drop_in, units.join("depro.service.d/hardening.conf")).unwrap();
    }
    let root_flag = format!("--root={}", root.path().display());
    let report = run(
        "systemd-analyze",
        &["security", "--offline=true", &root_flag, "depro.service"],
    );
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level:\n{report}"));
    line.split(": ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

#[test]
fn the_hardening_drop_in_passes_systemd_analyze_verify_and_lowers_the_exposure() {
    let drop_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/hardening/hardening.conf");
    let plain = exposure(None);
    let hardened = exposure(Some(&drop_in));
    assert!(
        hardened <= 3.0 && hardened < plain,
        "exposure {plain} -> {hardened}"
    );

    // verify needs the binary the unit names: with the package installed,
    // the drop-in where an operator puts it, no complaint at all.
    let _guard = SYSTEM.lock().unwrap();
    let deb = dist(&format!("depro_{VERSION}_amd64.deb"));
    run("dpkg", &["-i", deb.to_str().unwrap()]);
    let dir = Path::new("/etc/systemd/system/depro.service.d");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(&drop_in, dir.join("hardening.conf")).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "depro.service"])
        .output()
        .unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    run("dpkg", &["--purge", "depro"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "",
        "systemd-analyze verify complained"
    );
}
