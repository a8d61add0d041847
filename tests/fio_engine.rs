//! The fio external engine (`fio-engine/`, `libsealdisk_fio.so`) loaded by
//! the real fio 3.33: randrw with crc32c verify, two jobs, plain and
//! encrypted, RAM and file backends. A missing fio is a failure, not a skip.

use std::path::PathBuf;
use std::process::Command;

/// Build the engine (same profile as this test) and return its path.
fn engine() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf(); // target/<profile>
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "sealdisk-fio", "--manifest-path"])
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd.status().expect("run cargo to build the fio engine");
    assert!(st.success(), "building the fio engine failed");
    let so = profile_dir.join("libsealdisk_fio.so");
    assert!(so.exists(), "{} missing after the build", so.display());
    so
}

fn fio(args: &[String]) -> serde_json::Value {
    let out = Command::new("fio")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run fio ({e}): apt-get install fio (.ci/run does)"));
    let so = String::from_utf8_lossy(&out.stdout);
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fio {args:?} failed\nstdout:\n{so}\nstderr:\n{se}"
    );
    let start = so.find('{').unwrap_or_else(|| panic!("no JSON from fio:\n{so}\n{se}"));
    serde_json::from_str(&so[start..]).unwrap_or_else(|e| panic!("fio JSON: {e}\n{so}"))
}

fn check(v: &serde_json::Value, jobs: usize, what: &str) {
    let js = v["jobs"].as_array().unwrap();
    assert_eq!(js.len(), jobs, "{what}: {v}");
    for j in js {
        assert_eq!(j["error"], 0, "{what}: job error in {j}");
        assert!(j["read"]["io_bytes"].as_u64().unwrap() > 0, "{what}: nothing read");
        assert!(j["write"]["io_bytes"].as_u64().unwrap() > 0, "{what}: nothing written");
    }
}

fn job(so: &std::path::Path, filename: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--name=sealdisk",
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=16",
        "--numjobs=2",
        "--size=16M",
        "--offset_increment=16M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("--ioengine=external:{}", so.display()));
    a.push(format!("--filename={filename}"));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn fio_external_engine_randrw_verify_plain_and_encrypted() {
    let so = engine();
    // Threads sharing one RAM disk, plain and encrypted.
    for spec in [
        "backend=malloc,size=32M",
        "backend=malloc,size=32M,encrypt=4096",
        "backend=malloc,size=32M,encrypt=4096,inplace=1",
    ] {
        check(&fio(&job(&so, spec, &["--thread=1"])), 2, spec);
    }
    // Processes (fio's default) on a file, encrypted with 512-byte sectors,
    // with mixed block sizes and a trim-free flush every 64 writes.
    let tmp = tempfile::Builder::new()
        .prefix("sealdisk-fio-engine-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let path = dir.join("disk.img");
    let spec = format!("backend=file,path={},size=32M,encrypt=512", path.display());
    check(&fio(&job(&so, &spec, &["--bsrange=4k-128k", "--fsync=64"])), 2, &spec);
    // Bad targets are refused with a message, not a crash.
    let out = Command::new("fio")
        .args(job(&so, "backend=tape,size=1M", &[]))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown backend"));
}
