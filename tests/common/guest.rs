//! Boot a real Linux guest under QEMU (TCG) on a vhost-user-blk disk.
//!
//! The kernel is Debian's `linux-image-<abi>-cloud-amd64`, fetched with `apt-get download` and
//! unpacked with `dpkg-deb -x` (never installed), cached under `target/guest-cache/`. Its
//! virtio modules (`virtio_blk`, `virtio_pci` and what they depend on) go into an initramfs
//! built here in Rust (newc cpio) with the host's static busybox and an `/init` that loads
//! them, waits for `/dev/vda`, runs the test's shell script and prints
//! `GUEST-RESULT rc=<script's exit code>` before `poweroff -f`.
//!
//! ```ignore
//! if !guest::guest_available().unwrap() { return; }   // fails unless SEALDISK_ALLOW_SKIP_GUEST=1
//! let opts = guest::BootOpts::new(&sock, guest::pattern_script(1, 4, 7));
//! let run = guest::boot_vhost_blk(&opts).unwrap();
//! run.expect_ok().unwrap();
//! assert_eq!(run.value("GUEST-SUM").unwrap(), guest::sha256_hex(&guest::pattern_bytes(4, 7)));
//! ```
//!
//! What a machine needs: `qemu-system-x86_64` (Debian's `qemu-system-x86`, from
//! bookworm-backports next to qemu-utils 10), `busybox-static`, `apt-get` and `dpkg-deb` with
//! apt lists that know `linux-image-cloud-amd64`. `.ci/run` installs them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Set to `1` to let guest tests pass (loudly skipped) on a machine without QEMU.
pub const ALLOW_SKIP_ENV: &str = "SEALDISK_ALLOW_SKIP_GUEST";
/// Pin the kernel ABI (e.g. `6.1.0-57`) instead of following `linux-image-cloud-amd64`.
pub const KERNEL_ABI_ENV: &str = "SEALDISK_GUEST_KERNEL_ABI";
/// The QEMU binary; `qemu-system-x86_64` on PATH unless this is set.
pub const QEMU_ENV: &str = "SEALDISK_GUEST_QEMU";

/// The modules the guest needs for a virtio-pci block disk; their dependencies are added from
/// each module's own `depends=` (the package ships no `modules.dep`).
const ROOT_MODULES: &[&str] = &["virtio_pci", "virtio_blk"];

/// Printed by `/init` with the script's exit code; [`GuestRun::guest_rc`] parses it.
pub const RESULT_MARKER: &str = "GUEST-RESULT rc=";

const INSTALL_HINT: &str = "install qemu-system-x86 from bookworm-backports (keeps qemu-utils 10) and busybox-static: \
     `bash .ci/run` does it; or set SEALDISK_ALLOW_SKIP_GUEST=1 to skip guest tests";

// ---------------------------------------------------------------------------------------------
// Availability

fn qemu_binary() -> PathBuf {
    match std::env::var_os(QEMU_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => find_in_path("qemu-system-x86_64").unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// What is missing for guest tests on this machine (empty: nothing).
fn missing_tools() -> Vec<String> {
    let mut missing = Vec::new();
    let qemu = qemu_binary();
    if !qemu.is_file() && find_in_path(&qemu.to_string_lossy()).is_none() {
        missing.push("qemu-system-x86_64 (package qemu-system-x86)".to_string());
    }
    if let Err(e) = static_busybox() {
        missing.push(e);
    }
    for tool in ["apt-get", "apt-cache", "dpkg-deb"] {
        if find_in_path(tool).is_none() {
            missing.push(tool.to_string());
        }
    }
    missing
}

/// Whether guest tests can run here. `Ok(true)`: go ahead. `Ok(false)`: tools are missing and
/// `SEALDISK_ALLOW_SKIP_GUEST=1` is set — a loud "SKIPPED" went to stderr and the test should
/// return. `Err`: tools are missing and skipping is not allowed — the test must fail.
pub fn guest_available() -> Result<bool, String> {
    let missing = missing_tools();
    if missing.is_empty() {
        return Ok(true);
    }
    let msg = format!("guest tests need {}; {INSTALL_HINT}", missing.join(", "));
    if std::env::var(ALLOW_SKIP_ENV).as_deref() == Ok("1") {
        eprintln!("\n!!!!!!!! SKIPPED guest test ({ALLOW_SKIP_ENV}=1): {msg} !!!!!!!!\n");
        Ok(false)
    } else {
        Err(msg)
    }
}

/// [`guest_available`] for a test body: panics on `Err`, `false` means "return now".
pub fn require_guest() -> bool {
    match guest_available() {
        Ok(go) => go,
        Err(e) => panic!("{e}"),
    }
}

/// `(major, minor)` of the QEMU binary.
pub fn qemu_version() -> Result<(u32, u32), String> {
    let out = Command::new(qemu_binary())
        .arg("--version")
        .output()
        .map_err(|e| format!("{}: {e}; {INSTALL_HINT}", qemu_binary().display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ver = text
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .ok_or_else(|| format!("no version in {text:?}"))?;
    let mut it = ver.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    Ok((it.next().unwrap_or(0), it.next().unwrap_or(0)))
}

fn static_busybox() -> Result<PathBuf, String> {
    let cands = [
        "/bin/busybox",
        "/usr/bin/busybox",
        "/usr/lib/initramfs-tools/bin/busybox",
    ];
    let Some(p) = cands.iter().map(PathBuf::from).find(|p| p.is_file()) else {
        return Err("busybox (package busybox-static)".into());
    };
    let elf = fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    if elf_has_interp(&elf) {
        return Err(format!(
            "a static busybox ({} is dynamic: install busybox-static)",
            p.display()
        ));
    }
    Ok(p)
}

/// Whether a 64-bit little-endian ELF has a PT_INTERP header (is dynamically linked).
fn elf_has_interp(elf: &[u8]) -> bool {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return true;
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= elf.len() && u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) == 3
    })
}

// ---------------------------------------------------------------------------------------------
// Kernel cache

/// A cached guest kernel and what goes into its initramfs.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// The kernel's `vmlinuz`.
    pub kernel: PathBuf,
    /// The kernel release (`uname -r` in the guest).
    pub release: String,
    /// Uncompressed modules in load order: `(name, path)`.
    pub modules: Vec<(String, PathBuf)>,
    /// The host's static busybox.
    pub busybox: PathBuf,
}

/// `target/guest-cache` (from CARGO_TARGET_TMPDIR, else CARGO_MANIFEST_DIR/target).
pub fn cache_root() -> PathBuf {
    if let Some(t) = std::env::var_os("CARGO_TARGET_TMPDIR").or(option_env!("CARGO_TARGET_TMPDIR").map(Into::into)) {
        if let Some(parent) = Path::new(&t).parent() {
            return parent.join("guest-cache");
        }
    }
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    Path::new(&manifest).join("target").join("guest-cache")
}

/// An exclusive `flock` on a file, held until drop (tests run as separate processes).
struct FileLock(File);

impl FileLock {
    fn acquire(path: &Path) -> Result<FileLock, String> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!("flock {}: {}", path.display(), std::io::Error::last_os_error()));
        }
        Ok(FileLock(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: as above; closing would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn run_cmd(cmd: &mut Command) -> Result<Vec<u8>, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out.stdout)
}

/// The ABIs (`6.1.0-57`) that the versions of `linux-image-cloud-amd64` apt knows depend on,
/// candidate first (an older point release's kernel is the fallback when lists are stale).
fn kernel_abis() -> Result<Vec<String>, String> {
    let out = run_cmd(Command::new("apt-cache").args(["show", "linux-image-cloud-amd64"]))
        .map_err(|e| format!("{e} (apt lists missing? run `apt-get update`)"))?;
    let text = String::from_utf8_lossy(&out);
    let mut abis = Vec::new();
    for deps in text.lines().filter_map(|l| l.strip_prefix("Depends:")) {
        for dep in deps.split(',') {
            let name = dep.split_whitespace().next().unwrap_or("");
            if let Some(abi) = name
                .strip_prefix("linux-image-")
                .and_then(|s| s.strip_suffix("-cloud-amd64"))
            {
                if !abis.iter().any(|a| a == abi) {
                    abis.push(abi.to_string());
                }
            }
        }
    }
    if abis.is_empty() {
        return Err(format!(
            "no linux-image-<abi>-cloud-amd64 in the Depends of linux-image-cloud-amd64:\n{text}"
        ));
    }
    Ok(abis)
}

/// The guest kernel and modules, downloaded and unpacked once per machine (per target dir).
pub fn guest_image() -> Result<GuestImage, String> {
    let busybox = static_busybox().map_err(|e| format!("guest image needs {e}; {INSTALL_HINT}"))?;
    let root = cache_root();
    fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let _lock = FileLock::acquire(&root.join(".lock"))?;

    // Reuse any complete cache unless an ABI is pinned: no apt look-up on the common path.
    let abis = match std::env::var(KERNEL_ABI_ENV).ok().filter(|a| !a.is_empty()) {
        Some(abi) => vec![abi],
        None => match newest_ready(&root) {
            Some(dir) => return load_image(&dir, busybox),
            None => kernel_abis()?,
        },
    };
    let mut errors = Vec::new();
    for abi in abis {
        let dir = root.join(format!("linux-{abi}"));
        if !dir.join("ready").is_file() {
            if let Err(e) = prepare_kernel(&abi, &dir) {
                let _ = fs::remove_dir_all(&dir);
                errors.push(e);
                continue;
            }
        }
        return load_image(&dir, busybox);
    }
    Err(format!("no guest kernel could be fetched:\n{}", errors.join("\n")))
}

fn newest_ready(root: &Path) -> Option<PathBuf> {
    let mut ready: Vec<PathBuf> = fs::read_dir(root)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("ready").is_file())
        .collect();
    // By the numbers in the name, so that 6.1.0-57 beats 6.1.0-9.
    let key = |p: &PathBuf| -> Vec<u64> {
        let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        name.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    ready.sort_by_key(key);
    ready.pop()
}

fn load_image(dir: &Path, busybox: PathBuf) -> Result<GuestImage, String> {
    let read = |name: &str| fs::read_to_string(dir.join(name)).map_err(|e| format!("{}/{name}: {e}", dir.display()));
    let release = read("release")?.trim().to_string();
    let modules = read("modules.order")?
        .lines()
        .filter(|l| !l.is_empty())
        .map(|m| (m.to_string(), dir.join("modules").join(format!("{m}.ko"))))
        .collect();
    Ok(GuestImage {
        kernel: dir.join("vmlinuz"),
        release,
        modules,
        busybox,
    })
}

fn prepare_kernel(abi: &str, dir: &Path) -> Result<(), String> {
    let pkg = format!("linux-image-{abi}-cloud-amd64");
    eprintln!("guest: fetching {pkg} into {}", dir.display());
    let _ = fs::remove_dir_all(dir);
    let dl = dir.join("download");
    fs::create_dir_all(&dl).map_err(|e| format!("{}: {e}", dl.display()))?;
    run_cmd(
        Command::new("apt-get")
            .current_dir(&dl)
            .args(["-q", "-o", "APT::Sandbox::User=root", "download", &pkg]),
    )
    .map_err(|e| format!("{e} (apt lists stale or missing? run `apt-get update`)"))?;
    let deb = fs::read_dir(&dl)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download {pkg} left no .deb in {}", dl.display()))?;
    let unpack = dir.join("unpack");
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpack))?;

    // The release: the one directory under lib/modules (usr/lib/modules on merged-/usr builds).
    let mods_base = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| unpack.join(p))
        .find(|p| p.is_dir())
        .ok_or_else(|| format!("{pkg}: no lib/modules"))?;
    let release = fs::read_dir(&mods_base)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or_else(|| format!("{pkg}: empty lib/modules"))?;
    let mdir = mods_base.join(&release);
    let vmlinuz = unpack.join("boot").join(format!("vmlinuz-{release}"));
    fs::copy(&vmlinuz, dir.join("vmlinuz")).map_err(|e| format!("{}: {e}", vmlinuz.display()))?;

    let builtin: HashSet<String> = fs::read_to_string(mdir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let mut files = HashMap::new();
    collect_modules(&mdir.join("kernel"), &mut files)?;

    let mut order = Vec::new();
    let mut seen = HashSet::new();
    let out = dir.join("modules");
    fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    for root in ROOT_MODULES {
        resolve_module(root, &files, &builtin, &mut seen, &mut order, &out)?;
    }
    fs::write(dir.join("modules.order"), order.join("\n") + "\n").map_err(|e| e.to_string())?;
    fs::write(dir.join("release"), format!("{release}\n")).map_err(|e| e.to_string())?;
    fs::remove_dir_all(&unpack).map_err(|e| e.to_string())?;
    fs::remove_dir_all(&dl).map_err(|e| e.to_string())?;
    fs::write(dir.join("ready"), format!("{pkg}\n")).map_err(|e| e.to_string())?;
    eprintln!("guest: {pkg} ready: kernel {release}, modules {}", order.join(" "));
    Ok(())
}

/// `kernel/drivers/block/virtio_blk.ko.xz` -> `virtio_blk` (dashes are underscores to modprobe).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn collect_modules(dir: &Path, out: &mut HashMap<String, PathBuf>) -> Result<(), String> {
    for e in fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
    {
        let p = e.path();
        if p.is_dir() {
            collect_modules(&p, out)?;
        } else {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().any(|s| name.ends_with(s)) {
                out.insert(module_name(&name), p);
            }
        }
    }
    Ok(())
}

/// The module's bytes, decompressed (busybox insmod does not decompress).
fn read_module(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        Some(t) => run_cmd(Command::new(t).arg("-dc").arg(path)).map_err(|e| format!("decompress {name}: {e}")),
        None => fs::read(path).map_err(|e| format!("{name}: {e}")),
    }
}

/// `depends=a,b` from the module's `.modinfo` strings.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    ko.split(|b| *b == 0)
        .find(|s| s.starts_with(key))
        .map(|s| {
            String::from_utf8_lossy(&s[key.len()..])
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

fn resolve_module(
    name: &str,
    files: &HashMap<String, PathBuf>,
    builtin: &HashSet<String>,
    seen: &mut HashSet<String>,
    order: &mut Vec<String>,
    out: &Path,
) -> Result<(), String> {
    if !seen.insert(name.to_string()) || builtin.contains(name) {
        return Ok(());
    }
    let path = files
        .get(name)
        .ok_or_else(|| format!("module {name} neither built in nor shipped"))?;
    let ko = read_module(path)?;
    for dep in module_depends(&ko) {
        resolve_module(&dep, files, builtin, seen, order, out)?;
    }
    fs::write(out.join(format!("{name}.ko")), &ko).map_err(|e| e.to_string())?;
    order.push(name.to_string());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Initramfs

/// A newc ("070701") cpio archive, the initramfs format.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], (0, 0));
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, data, (0, 0));
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, &[], (major, minor));
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.buf
    }
}

impl GuestImage {
    /// The `/init` that loads the modules, waits for `/dev/vda`, runs `/script.sh` and powers off.
    pub fn init_script(&self) -> String {
        let mods: Vec<&str> = self.modules.iter().map(|(n, _)| n.as_str()).collect();
        format!(
            r#"#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in {mods}; do
    insmod /lib/modules/$m.ko || echo "GUEST-ERROR insmod $m"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do usleep 100000; i=$((i + 1)); done
if [ -b /dev/vda ]; then
    echo "GUEST-DISK size=$(blockdev --getsize64 /dev/vda) queues=$(ls /sys/block/vda/mq 2>/dev/null | wc -l)"
    echo "GUEST-START"
    sh /script.sh
    rc=$?
else
    echo "GUEST-ERROR no /dev/vda after 30 s"
    rc=125
fi
sync
echo "{RESULT_MARKER}$rc"
poweroff -f
"#,
            mods = mods.join(" "),
        )
    }

    /// The initramfs (uncompressed newc cpio) running `script` as `/script.sh`.
    pub fn initramfs(&self, script: &str) -> Result<Vec<u8>, String> {
        let busybox = fs::read(&self.busybox).map_err(|e| format!("{}: {e}", self.busybox.display()))?;
        let mut c = Cpio::default();
        for d in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
            c.dir(d);
        }
        c.char_dev("dev/console", 5, 1);
        c.char_dev("dev/null", 1, 3);
        c.file("bin/busybox", 0o755, &busybox);
        for (name, path) in &self.modules {
            let ko = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            c.file(&format!("lib/modules/{name}.ko"), 0o644, &ko);
        }
        c.file("init", 0o755, self.init_script().as_bytes());
        c.file("script.sh", 0o755, script.as_bytes());
        Ok(c.finish())
    }

    /// [`Self::initramfs`] written to `path`.
    pub fn write_initramfs(&self, script: &str, path: &Path) -> Result<(), String> {
        let data = self.initramfs(script)?;
        fs::write(path, data).map_err(|e| format!("{}: {e}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(|e| e.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Booting

/// How to boot the guest.
#[derive(Clone, Debug)]
pub struct BootOpts {
    /// The vhost-user-blk backend's unix socket (QEMU connects to it).
    pub socket: PathBuf,
    /// `num-queues` of `vhost-user-blk-pci` (2).
    pub num_queues: u16,
    /// `queue-size` of the device (QEMU's default, 128, when `None`).
    pub queue_size: Option<u32>,
    /// Run by `/init` with busybox sh once the modules are loaded; `/dev/vda` is the disk.
    pub script: String,
    /// Guest memory in MiB (256).
    pub mem_mib: u32,
    /// vCPUs (2).
    pub cpus: u32,
    /// Kill QEMU after this long (120 s).
    pub timeout: Duration,
    /// Reconnect to the socket this many seconds after it closes (`reconnect-ms` on QEMU ≥ 9.2).
    pub reconnect: Option<u32>,
    /// Appended to the kernel command line.
    pub kernel_args: String,
    /// Appended to QEMU's arguments.
    pub extra_qemu_args: Vec<String>,
}

impl BootOpts {
    pub fn new(socket: impl Into<PathBuf>, script: impl Into<String>) -> BootOpts {
        BootOpts {
            socket: socket.into(),
            num_queues: 2,
            queue_size: None,
            script: script.into(),
            mem_mib: 256,
            cpus: 2,
            timeout: Duration::from_secs(120),
            reconnect: None,
            kernel_args: String::new(),
            extra_qemu_args: Vec::new(),
        }
    }
}

/// A finished guest.
#[derive(Debug)]
pub struct GuestRun {
    /// The serial console (the script's stdout and stderr, `\r` removed).
    pub console: String,
    /// QEMU's own stderr (vhost-user errors land here).
    pub qemu_stderr: String,
    /// QEMU's exit status (success after the guest's `poweroff -f`).
    pub status: ExitStatus,
    /// The script's exit code from the `GUEST-RESULT rc=` line; `None` if it never came.
    pub guest_rc: Option<i32>,
    pub elapsed: Duration,
}

impl GuestRun {
    /// `Ok` if QEMU exited cleanly and the script returned 0; else the console tail.
    pub fn expect_ok(&self) -> Result<(), String> {
        if self.status.success() && self.guest_rc == Some(0) {
            return Ok(());
        }
        Err(format!(
            "guest failed: qemu {}, script rc {:?}\n{}",
            self.status,
            self.guest_rc,
            self.describe()
        ))
    }

    /// The console tail and QEMU's stderr, for error messages.
    pub fn describe(&self) -> String {
        format!(
            "--- console (tail) ---\n{}\n--- qemu stderr ---\n{}",
            tail(&self.console, 60),
            self.qemu_stderr
        )
    }

    /// The rest of the last console line starting with `key ` (e.g. `GUEST-SUM`).
    pub fn value(&self, key: &str) -> Option<String> {
        self.values(key).pop()
    }

    /// The rest of every console line starting with `key `.
    pub fn values(&self, key: &str) -> Vec<String> {
        console_values(&self.console, key)
    }
}

fn console_values(console: &str, key: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
        .map(|r| r.trim().to_string())
        .collect()
}

fn parse_guest_rc(console: &str) -> Option<i32> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix(RESULT_MARKER))
        .filter_map(|r| r.trim().parse().ok())
        .next_back()
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

#[derive(Default)]
struct Output {
    console: String,
    stderr: String,
    console_closed: bool,
}

/// A guest whose QEMU is still running: watch its console, then [`RunningGuest::wait`].
pub struct RunningGuest {
    child: Option<Child>,
    out: Arc<(Mutex<Output>, Condvar)>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    deadline: Instant,
    run_dir: PathBuf,
}

fn spawn_reader(
    mut src: impl Read + Send + 'static,
    out: Arc<(Mutex<Output>, Condvar)>,
    console: bool,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let (lock, cv) = &*out;
            let mut o = lock.lock().unwrap();
            if n == 0 {
                if console {
                    o.console_closed = true;
                }
                cv.notify_all();
                return;
            }
            let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
            if console {
                o.console.push_str(&text);
            } else {
                o.stderr.push_str(&text);
            }
            cv.notify_all();
        }
    })
}

static RUN_SEQ: AtomicU64 = AtomicU64::new(0);

/// Start QEMU with the guest on `opts.socket`; returns while it runs.
pub fn spawn_vhost_blk(opts: &BootOpts) -> Result<RunningGuest, String> {
    let image = guest_image()?;
    let run_dir = std::env::temp_dir().join(format!(
        "sealdisk-guest-{}-{}",
        std::process::id(),
        RUN_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
    let initrd = run_dir.join("initrd.cpio");
    image.write_initramfs(&opts.script, &initrd)?;

    let mut chardev = format!("socket,id=vhost0,path={}", opts.socket.display());
    if let Some(secs) = opts.reconnect {
        if qemu_version()? >= (9, 2) {
            chardev += &format!(",reconnect-ms={}", u64::from(secs) * 1000);
        } else {
            chardev += &format!(",reconnect={secs}");
        }
    }
    let mut device = format!("vhost-user-blk-pci,chardev=vhost0,num-queues={}", opts.num_queues);
    if let Some(q) = opts.queue_size {
        device += &format!(",queue-size={q}");
    }
    let mem = format!("{}M", opts.mem_mib);
    let append = format!("console=ttyS0 panic=-1 quiet {}", opts.kernel_args)
        .trim()
        .to_string();
    let mut cmd = Command::new(qemu_binary());
    cmd.args([
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
    ])
    .args(["-no-reboot", "-m", &mem, "-smp", &opts.cpus.to_string()])
    .args(["-object", &format!("memory-backend-memfd,id=mem,size={mem},share=on")])
    .args(["-numa", "node,memdev=mem"])
    .args(["-chardev", &chardev, "-device", &device])
    .arg("-kernel")
    .arg(&image.kernel)
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", &append])
    .args(&opts.extra_qemu_args)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("{cmd:?}: {e}; {INSTALL_HINT}"))?;
    let out = Arc::new((Mutex::new(Output::default()), Condvar::new()));
    let readers = vec![
        spawn_reader(child.stdout.take().unwrap(), out.clone(), true),
        spawn_reader(child.stderr.take().unwrap(), out.clone(), false),
    ];
    Ok(RunningGuest {
        child: Some(child),
        out,
        readers,
        started,
        deadline: started + opts.timeout,
        run_dir,
    })
}

/// Boot the guest, run the script, wait for QEMU to exit (or kill it at the timeout: `Err`).
pub fn boot_vhost_blk(opts: &BootOpts) -> Result<GuestRun, String> {
    spawn_vhost_blk(opts)?.wait()
}

impl RunningGuest {
    /// The console so far.
    pub fn console(&self) -> String {
        self.out.0.lock().unwrap().console.clone()
    }

    /// Wait until the console has a line containing `needle` (e.g. a marker the script echoes
    /// before the test restarts the backend). `Err` with the console tail on timeout or exit.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<(), String> {
        let until = (Instant::now() + timeout).min(self.deadline);
        let (lock, cv) = &*self.out;
        let mut o = lock.lock().unwrap();
        loop {
            if o.console.lines().any(|l| l.contains(needle)) {
                return Ok(());
            }
            let now = Instant::now();
            if o.console_closed || now >= until {
                let why = if o.console_closed { "QEMU exited" } else { "timed out" };
                return Err(format!(
                    "{why} waiting for {needle:?} on the guest console\n--- console (tail) ---\n{}\n--- qemu stderr ---\n{}",
                    tail(&o.console, 60),
                    o.stderr
                ));
            }
            o = cv.wait_timeout(o, until - now).unwrap().0;
        }
    }

    /// Kill QEMU now.
    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
        }
    }

    /// Wait for QEMU to exit; at the deadline kill it and return `Err` with the console tail.
    pub fn wait(mut self) -> Result<GuestRun, String> {
        let mut child = self.child.take().unwrap();
        let status = loop {
            if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
                break st;
            }
            if Instant::now() >= self.deadline {
                let _ = child.kill();
                let _ = child.wait();
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                let o = self.out.0.lock().unwrap();
                return Err(format!(
                    "guest timed out after {:?}; QEMU killed\n--- console (tail) ---\n{}\n--- qemu stderr ---\n{}",
                    self.deadline - self.started,
                    tail(&o.console, 60),
                    o.stderr
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let elapsed = self.started.elapsed();
        let o = std::mem::take(&mut *self.out.0.lock().unwrap());
        Ok(GuestRun {
            guest_rc: parse_guest_rc(&o.console),
            console: o.console,
            qemu_stderr: o.stderr,
            status,
            elapsed,
        })
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_dir_all(&self.run_dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Guest scripts

/// 512-byte sectors, each its own text line: `sealdisk seed <seed> sector <i>`, space padded.
/// Every sector differs, so a misplaced or torn sector changes the checksum.
pub fn pattern_bytes(size_mib: u64, seed: u8) -> Vec<u8> {
    let sectors = size_mib * 2048;
    let mut v = Vec::with_capacity((sectors * 512) as usize);
    for i in 0..sectors {
        let line = format!("{:<511}\n", format!("sealdisk seed {seed} sector {i}"));
        v.extend_from_slice(line.as_bytes());
    }
    v
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// A script that writes [`pattern_bytes`]`(size_mib, seed)` to `/dev/vda` at `offset_mib` MiB
/// with O_DIRECT (busybox `dd oflag=direct`, 1 MiB page-aligned buffers), drops the page cache,
/// reads it back with `iflag=direct` and prints `GUEST-PATTERN-SUM <sha256 of what it wrote>`
/// and `GUEST-SUM <sha256 of what it read>`; exits non-zero if they differ.
pub fn pattern_script(offset_mib: u64, size_mib: u64, seed: u8) -> String {
    format!(
        r#"set -e
awk -v seed={seed} -v n={sectors} 'BEGIN {{ for (i = 0; i < n; i++) printf "%-511s\n", "sealdisk seed " seed " sector " i }}' > /tmp/pattern
want=$(sha256sum < /tmp/pattern | cut -d' ' -f1)
echo "GUEST-PATTERN-SUM $want"
dd if=/tmp/pattern of=/dev/vda bs=1M seek={offset_mib} count={size_mib} iflag=fullblock oflag=direct conv=notrunc,fsync 2>/tmp/dd.err || {{ cat /tmp/dd.err; exit 1; }}
rm /tmp/pattern
echo 3 > /proc/sys/vm/drop_caches
got=$(dd if=/dev/vda bs=1M skip={offset_mib} count={size_mib} iflag=direct 2>/tmp/dd.err | sha256sum | cut -d' ' -f1)
grep -q "{size_mib}+0 records in" /tmp/dd.err || {{ cat /tmp/dd.err; exit 1; }}
echo "GUEST-SUM $got"
[ "$got" = "$want" ]
"#,
        sectors = size_mib * 2048,
    )
}

/// Shorthand for tests: the checksum line a [`pattern_script`] run must print.
pub fn expected_pattern_sum(size_mib: u64, seed: u8) -> String {
    sha256_hex(&pattern_bytes(size_mib, seed))
}

/// Sorted `KEY value` pairs of every `GUEST-*` line, for debugging output.
pub fn guest_lines(console: &str) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in console.lines().filter(|l| l.starts_with("GUEST-")) {
        let (k, v) = l.split_once(' ').unwrap_or((l, ""));
        m.entry(k.to_string()).or_default().push(v.to_string());
    }
    m
}
