//! A single-node Ceph cluster for a test (`tools/ceph-cluster.sh`), stopped on drop (also
//! when the test panics).
//!
//! Missing Ceph fails the test unless `SEALDISK_SKIP_CEPH=1` is set.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub const SKIP_ENV: &str = "SEALDISK_SKIP_CEPH";

const TOOLS: &[&str] = &["ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "rbd", "rados", "monmaptool"];

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/ceph-cluster.sh")
}

/// What is missing for a cluster here (tools and the client libraries).
fn missing() -> Vec<String> {
    let mut m: Vec<String> = TOOLS
        .iter()
        .filter(|t| {
            !Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {t}"))
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|t| t.to_string())
        .collect();
    if let Err(e) = sealdisk::testing::rbd::available() {
        m.push(e.to_string());
    }
    m
}

/// A running cluster; stopped (every daemon, by pid) and its directory removed on drop.
pub struct Cluster {
    pub dir: PathBuf,
    pub conf: PathBuf,
}

impl Cluster {
    /// Starts a cluster in `$TMPDIR/sealdisk-ceph-<name>-<pid>`. `None`: Ceph is missing and
    /// `SEALDISK_SKIP_CEPH=1` is set (a loud SKIPPED went to stderr); missing Ceph without it
    /// panics.
    pub fn start(name: &str) -> Option<Cluster> {
        let miss = missing();
        if !miss.is_empty() {
            let msg = format!(
                "the RBD tests need a Ceph cluster; missing: {}. Install ceph-mon ceph-osd ceph-mgr \
                 ceph-common librbd1 (`bash .ci/run` does), or set {SKIP_ENV}=1 to skip them",
                miss.join(", ")
            );
            if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
                eprintln!("\n!!!!!!!! SKIPPED Ceph test ({SKIP_ENV}=1): {msg} !!!!!!!!\n");
                return None;
            }
            panic!("{msg}");
        }
        let dir = std::env::temp_dir().join(format!("sealdisk-ceph-{name}-{}", std::process::id()));
        let _ = Command::new("bash").arg(script()).arg("stop").arg(&dir).status();
        let _ = std::fs::remove_dir_all(&dir);
        // From here the guard stops whatever part of the cluster started.
        let mut c = Cluster {
            conf: dir.join("ceph.conf"),
            dir,
        };
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&c.dir)
            .output()
            .expect("run tools/ceph-cluster.sh");
        assert!(
            out.status.success(),
            "tools/ceph-cluster.sh start failed: {}\n(logs in {})",
            String::from_utf8_lossy(&out.stderr),
            c.dir.join("log").display()
        );
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        let printed = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .to_string();
        c.conf = PathBuf::from(printed);
        assert!(c.conf.is_file(), "the script printed no ceph.conf path");
        Some(c)
    }

    /// Runs `prog` (rbd, rados, ceph) against this cluster; panics unless it succeeds.
    pub fn cmd(&self, prog: &str, args: &[&str]) -> Vec<u8> {
        let (ok, out, err) = self.try_cmd(prog, args);
        assert!(ok, "{prog} {args:?}: {err}");
        out
    }

    /// Like [`Cluster::cmd`] but returns (success, stdout, stderr).
    pub fn try_cmd(&self, prog: &str, args: &[&str]) -> (bool, Vec<u8>, String) {
        let out = Command::new(prog)
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{prog}: {e}"));
        (
            out.status.success(),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script()).arg("stop").arg(&self.dir).status();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
