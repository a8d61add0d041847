//! `sealdisk bench io`: jobs over both reactors, verify, fio-compatible
//! output, and refusal of bad options.

mod common;

use std::process::Command;

use sealdisk::testing::bench::io::{run, IoBenchOpts};
use sealdisk::testing::bench::{FileJob, JobSpec, Rw, TargetSpec};
use sealdisk::ReactorConfig;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sealdisk"))
}

#[test]
fn many_jobs_over_both_reactors_verify_through_the_crypto_layer() {
    let job = JobSpec {
        name: "mix".into(),
        rw: Rw::RandRw,
        bs: 8192,
        iodepth: 8,
        numjobs: 4,
        size: Some(4 << 20),
        // Disjoint regions: jobs racing on one block would tear it (two
        // reactors writing the same sectors at once), as with fio.
        offset_increment: 4 << 20,
        verify: true,
        ..JobSpec::default()
    };
    let target = TargetSpec {
        backend: Some("malloc".into()),
        encrypt: true,
        sector_size: Some(4096),
    };
    let opts = IoBenchOpts {
        jobs: vec![FileJob { job, target }],
        compare: false,
        rounds: 1,
        reactors: ReactorConfig {
            cores: vec![0, 1],
            pool_bytes: 16 << 20,
            ..ReactorConfig::default()
        },
        progress: false,
        iopoll: Default::default(),
        iostat: false,
    };
    let rep = run(&opts).unwrap();
    let g = &rep.groups[0];
    assert_eq!(g.error, None);
    assert_eq!(g.verify_errors, 0);
    assert!(g.verified_blocks > 0, "verify must read back written blocks");
    assert!(g.read.ios > 0 && g.write.ios > 0);
    assert_eq!(
        g.read.bytes + g.write.bytes,
        4 * (4 << 20),
        "each job moves exactly size bytes"
    );
    assert_eq!(g.reactors.len(), 2, "numjobs=4 on two reactors uses both");
}

#[test]
fn verify_catches_a_corrupted_block_plain_and_encrypted() {
    let tmp = common::TempDir::new("benchio-corrupt");
    let d = &tmp.0;
    for encrypt in [false, true] {
        let img = d.join(format!("disk-{encrypt}.img"));
        let base = |extra: &[&str]| {
            let mut c = bin();
            c.args([
                "bench",
                "io",
                "--quiet",
                "--cores",
                "0",
                "--bs",
                "4k",
                "--size",
                "1m",
                "--iodepth",
                "4",
            ])
            .arg(format!("--backend=file:{}", img.display()))
            .args(extra);
            if encrypt {
                c.arg("--encrypt");
            }
            c
        };
        // Write + verify phase in one run, through each stack. (A bench
        // run's key is random and never leaves the process, so corruption
        // between two encrypted runs is tested at the library level below.)
        let w = base(&["--rw=write", "--verify=crc32c", "--name=w"]).output().unwrap();
        assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
        let text = String::from_utf8_lossy(&w.stdout);
        assert!(text.contains("256 blocks checked, 0 errors"), "{text}");
        if encrypt {
            continue;
        }
        // Flip one byte in block 100.
        let mut bytes = std::fs::read(&img).unwrap();
        bytes[100 * 4096 + 2000] ^= 0x40;
        std::fs::write(&img, &bytes).unwrap();
        let v = base(&["--rw=read", "--verify=crc32c", "--verify_only", "--name=v"])
            .output()
            .unwrap();
        assert_eq!(v.status.code(), Some(1), "a verify failure must fail the run");
        let text = String::from_utf8_lossy(&v.stdout);
        assert!(text.contains("1 errors"), "{text}");
        assert!(text.contains("offset 409600"), "the error names the block: {text}");
    }
}

/// `--inplace`: write buffers go down as scratch and the crypto layer encrypts them
/// where they are (no bounce buffer). What reaches the file is ciphertext, and reading
/// it back through the layer gives the written blocks.
#[test]
fn inplace_writes_are_encrypted_where_they_are_and_verify() {
    let tmp = common::TempDir::new("benchio-inplace");
    let img = tmp.0.join("disk.img");
    let run = |encrypt: bool| {
        let mut c = bin();
        c.args([
            "bench",
            "io",
            "--quiet",
            "--cores=0",
            "--bs=4k",
            "--size=1m",
            "--iodepth=16",
        ])
        .args(["--rw=write", "--verify=crc32c", "--inplace"])
        .arg(format!("--backend=file:{}", img.display()));
        if encrypt {
            c.arg("--encrypt");
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains("256 blocks checked, 0 errors"), "{text}");
        std::fs::read(&img).unwrap()
    };
    // Unencrypted, every block of the file starts with the verify header's magic.
    let plain = run(false);
    let magic = plain[..4].to_vec();
    let starts = |f: &[u8]| f.chunks(4096).filter(|b| b[..4] == magic[..]).count();
    assert_eq!(starts(&plain), 256);
    // Encrypted in place: none does, and the verify pass read every block back.
    let cipher = run(true);
    assert_eq!(cipher.len(), 1 << 20);
    assert_eq!(starts(&cipher), 0, "the file holds ciphertext");
}

#[test]
fn verify_catches_a_flipped_ciphertext_byte() {
    use sealdisk::testing::bench::{check_verify_block, fill_verify_block, VerifyError};
    use std::sync::Arc;
    let r = common::reactors(&[0]);
    let base: sealdisk::BdevRef = Arc::new(sealdisk::MallocBdev::new("m", 1 << 20, 512));
    let enc: sealdisk::BdevRef = Arc::new(sealdisk::CryptoBdev::new(base.clone(), common::xts(4), 4096).unwrap());
    let mut block = vec![0u8; 4096];
    fill_verify_block(&mut block, 8192, 1);
    let out = common::run_ios(
        &r,
        0,
        &enc,
        vec![common::Op::Write {
            offset: 8192,
            data: block,
        }],
    );
    assert!(out[0].result.is_ok());
    let back = common::run_ios(
        &r,
        0,
        &enc,
        vec![common::Op::Read {
            offset: 8192,
            len: 4096,
        }],
    );
    check_verify_block(&back[0].data, 8192).expect("intact block verifies");
    let mut raw = common::run_ios(
        &r,
        0,
        &base,
        vec![common::Op::Read {
            offset: 8192,
            len: 4096,
        }],
    )
    .remove(0)
    .data;
    raw[3000] ^= 1;
    common::run_ios(
        &r,
        0,
        &base,
        vec![common::Op::Write {
            offset: 8192,
            data: raw,
        }],
    );
    let back = common::run_ios(
        &r,
        0,
        &enc,
        vec![common::Op::Read {
            offset: 8192,
            len: 4096,
        }],
    );
    let e = check_verify_block(&back[0].data, 8192).unwrap_err();
    // One flipped ciphertext bit garbles one 16-byte block of the plaintext, past the
    // header: the checksum catches it.
    assert!(matches!(e, VerifyError::Crc { offset: 8192, .. }), "{e}");
    assert!(e.to_string().contains("8192"), "{e}");
}

#[test]
fn json_output_uses_fio_field_names_and_compare_names_jobs() {
    let tmp = common::TempDir::new("benchio-json");
    let d = &tmp.0;
    let plot = d.join("p.svg");
    let out = bin()
        .args([
            "bench",
            "io",
            "--quiet",
            "--backend=malloc",
            "--size=32m",
            "--rw=randrw",
            "--bs=4k",
        ])
        .args([
            "--iodepth=8",
            "--runtime=2",
            "--time_based",
            "--compare",
            "--rounds=4",
            "--cores=0",
            "--output-format=json",
        ])
        .arg(format!("--plot={}", plot.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("exactly one JSON document");
    let jobs = v["jobs"].as_array().unwrap();
    let names: Vec<&str> = jobs.iter().map(|j| j["jobname"].as_str().unwrap()).collect();
    assert_eq!(names, ["plain", "encrypted"]);
    for j in jobs {
        for dir in ["read", "write"] {
            let d = &j[dir];
            assert!(d["iops"].as_f64().unwrap() > 0.0);
            assert!(d["bw_bytes"].as_u64().unwrap() > 0);
            assert!(d["io_bytes"].as_u64().unwrap() > 0);
            assert!(d["runtime"].as_u64().unwrap() > 0);
            assert!(d["total_ios"].as_u64().unwrap() > 0);
            for p in ["50.000000", "99.000000", "99.900000"] {
                assert!(d["clat_ns"]["percentile"][p].as_u64().unwrap() > 0, "{dir} {p}");
            }
            assert!(d["lat_ns"]["mean"].as_f64().unwrap() > 0.0);
        }
        assert!(j["usr_cpu"].as_f64().is_some() && j["sys_cpu"].as_f64().is_some());
    }
    let r = &v["sealdisk"]["ratios"];
    assert!(r["read"]["iops"].as_f64().unwrap() > 0.0);
    assert!(r["cipher_ns_per_io"].as_f64().unwrap() > 0.0);
    assert!(r["cipher_hot_ns_per_io"].as_f64().unwrap() > 0.0);
    // Per-round ratios: one per alternation, their median reported.
    let m = &r["round_median"];
    assert_eq!(m["rounds"].as_u64(), Some(4));
    for k in ["iops", "clat_p99", "extra_over_cipher"] {
        let x = m[k].as_f64().unwrap_or_else(|| panic!("round_median.{k} missing: {m}"));
        assert!(x.is_finite() && x != 0.0, "round_median.{k} = {x}");
    }
    assert!(m["iops"].as_f64().unwrap() > 0.0);
    // ... and the rounds themselves, in order.
    let rounds = r["rounds"].as_array().expect("per-round figures");
    assert_eq!(rounds.len(), 4);
    for round in rounds {
        for side in ["plain", "encrypted"] {
            for k in ["iops", "clat_p99_ns", "busy_ns_per_io"] {
                assert!(round[side][k].as_f64().unwrap() > 0.0, "rounds[].{side}.{k}: {round}");
            }
        }
    }
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("encrypted read"));
}

/// A job file of two jobs on the null backend: `a` reads 1 MiB, `b` writes 1 MiB
/// at random through the crypto layer.
const TWO_JOBS: &str =
    "[global]\nbackend=null\nbs=4k\niodepth=4\nsize=1m\n\n[a]\nrw=read\n[b]\nrw=randwrite\nencrypt=1\n";

/// `bench io` on the job file `jf` with `extra` options, on core 0: its JSON report.
fn run_job_file(jf: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let out = bin()
        .args(["bench", "io", "--quiet", "--cores=0", "--output-format=json"])
        .args(extra)
        .arg(jf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn job_files_run_like_fio() {
    let tmp = common::TempDir::new("benchio-jobfile");
    let jf = tmp.0.join("t.fio");
    std::fs::write(&jf, TWO_JOBS).unwrap();
    let v = run_job_file(&jf, &[]);
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0]["jobname"], "a");
    assert_eq!(jobs[0]["read"]["io_bytes"], 1 << 20);
    assert_eq!(jobs[1]["write"]["io_bytes"], 1 << 20);
    assert_eq!(jobs[1]["job options"]["filename"], "crypto(null0)");
}

#[test]
fn iostat_on_stacks_the_statistics_layer_on_every_target() {
    let tmp = common::TempDir::new("benchio-iostat");
    let jf = tmp.0.join("jobs.fio");
    std::fs::write(&jf, TWO_JOBS).unwrap();
    for (flag, names) in [
        ("--iostat=on", ["iostat(null0)", "iostat(crypto(null0))"]),
        ("--iostat=off", ["null0", "crypto(null0)"]),
    ] {
        let v = run_job_file(&jf, &[flag]);
        let jobs = v["jobs"].as_array().unwrap();
        assert_eq!(jobs[0]["job options"]["filename"], names[0]);
        assert_eq!(jobs[1]["job options"]["filename"], names[1]);
        assert_eq!(jobs[0]["read"]["io_bytes"], 1 << 20);
        assert_eq!(jobs[1]["write"]["io_bytes"], 1 << 20);
    }
    let out = bin()
        .args(["bench", "io", "--quiet", "--iostat=maybe"])
        .arg(&jf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--iostat maybe: use on or off"));
}

#[test]
fn bad_options_are_refused_with_a_clear_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["--rw=sideways"], "rw=sideways"),
        (&["--bs=1000"], "multiple of 512"),
        (&["--iodepth=0"], "iodepth"),
        (&["--backend=tape"], "unknown backend"),
        (&["--verify=md5"], "crc32c"),
        (&["--inplace=maybe"], "inplace"),
        (&["--compare", "--encrypt"], "drop --encrypt"),
        (&["--cores=99"], "not available"),
        (&["--output-format=xml"], "normal or json"),
        (&["--runtime=soon"], "bad time"),
        (&["--offset=2m"], "past the end"),
    ];
    let tmp = common::TempDir::new("benchio-badopts");
    let d = &tmp.0;
    let small = d.join("small.img");
    std::fs::write(&small, vec![0u8; 1 << 20]).unwrap();
    for (args, want) in cases {
        let mut c = bin();
        c.args(["bench", "io", "--quiet", "--size=1m"]);
        if args[0].starts_with("--offset") {
            c.arg(format!("--backend=file:{}", small.display()));
        }
        let out = c.args(*args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// 32-byte pieces of `data` that appear more than once.
fn repeated_pieces(data: &[u8]) -> usize {
    let mut seen = std::collections::HashSet::new();
    data.chunks(32).filter(|p| !seen.insert(p.to_vec())).count()
}

#[test]
fn refill_buffers_writes_fresh_data_every_time_scramble_only_stamps() {
    let tmp = common::TempDir::new("benchio-refill");
    let d = &tmp.0;
    let run_with = |flag: &str| {
        let img = d.join(format!("{}.img", flag.trim_start_matches('-')));
        std::fs::write(&img, vec![0u8; 256 << 10]).unwrap();
        let out = bin()
            .args([
                "bench",
                "io",
                "--quiet",
                "--cores=0",
                "--rw=write",
                "--bs=4k",
                "--iodepth=1",
            ])
            .args(["--size=256k", flag])
            .arg(format!("--backend=file:{}", img.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "{flag}: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::read(&img).unwrap()
    };
    // One buffer (iodepth 1) written 64 times: scrambled, only the stamps
    // differ, so most of its pieces repeat; refilled, none do.
    let scrambled = run_with("--scramble_buffers=1");
    assert!(repeated_pieces(&scrambled) > 4000, "{}", repeated_pieces(&scrambled));
    let refilled = run_with("--refill_buffers");
    assert_eq!(repeated_pieces(&refilled), 0);
    assert!(refilled.iter().filter(|&&b| b == 0).count() < refilled.len() / 100);
}
