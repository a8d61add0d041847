//! External tools in tests: run one, and the qemu-io script that the NBD tests (file pool
//! and RBD backends) run against an export.
#![allow(dead_code)]

use std::process::Command;

/// Runs `tool` with `args`; panics (with its output) unless it succeeds. Its stdout.
pub fn run_tool(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {tool} ({e}): install it (apt-get install fio libnbd-bin qemu-utils; .ci/run does)")
    });
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\nstdout:\n{so}\nstderr:\n{se}",
        out.status
    );
    so
}

/// qemu-io through the NBD export `uri` (at least 33 MiB): patterned writes (one larger
/// than a bdev request, one FUA, two in flight), flush, discard, write-zeroes; then
/// every range read back against its pattern (discarded and zeroed ranges as zeros).
pub fn qemu_io_patterns(uri: &str, what: &str) {
    let w = run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xa5 0 1M",
            "-c",
            "write -P 0x5a 4M 3M", // larger than one bdev request: split
            "-c",
            "write -P 0x11 -f 8M 64k", // FUA
            "-c",
            "flush",
            "-c",
            "discard 0 64k",
            "-c",
            "write -z 4M 128k",
            "-c",
            "aio_write -P 0x33 16M 4k",
            "-c",
            "aio_write -P 0x44 17M 4k",
            "-c",
            "aio_flush",
            uri,
        ],
    );
    assert!(!w.contains("error") && !w.contains("failed"), "{what}: {w}");
    let r = run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0 0 64k",
            "-c",
            "read -P 0xa5 64k 960k",
            "-c",
            "read -P 0 4M 128k",
            "-c",
            "read -P 0x5a 4224k 2944k",
            "-c",
            "read -P 0x11 8M 64k",
            "-c",
            "read -P 0x33 16M 4k",
            "-c",
            "read -P 0x44 17M 4k",
            "-c",
            "read -P 0 32M 1M",
            uri,
        ],
    );
    assert!(
        !r.contains("Pattern verification failed") && !r.contains("error"),
        "{what}: {r}"
    );
    assert_eq!(r.matches("read ").count(), 8, "{what}: {r}");
}
