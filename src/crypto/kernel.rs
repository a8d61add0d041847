//! Which XTS kernel runs: detection of CPU features and the
//! `SEALDISK_XTS_KERNEL` override.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use super::XtsError;

/// The environment variable that forces a kernel: `portable`, `aesni` or
/// `vaes-avx2`. Asking for one the CPU lacks is an error, not a silent
/// fallback, so a benchmark never measures something other than it says.
pub(super) const KERNEL_ENV: &str = "SEALDISK_XTS_KERNEL";

#[cfg(target_arch = "x86_64")]
cpufeatures::new!(cpuid_aesni, "aes", "pclmulqdq", "sse4.1");

/// An XTS implementation. All produce identical output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// The `aes` crate's block cipher with tweak handling in plain Rust.
    /// Runs anywhere.
    Portable,
    /// AES-NI on 128-bit registers, eight blocks in flight.
    Aesni,
    /// VAES + VPCLMULQDQ on 256-bit registers, sixteen blocks in flight,
    /// hand-scheduled in inline assembly.
    VaesAvx2,
}

impl Kernel {
    /// Every kernel, fastest first.
    pub const ALL: [Kernel; 3] = [Kernel::VaesAvx2, Kernel::Aesni, Kernel::Portable];

    /// The name used by `SEALDISK_XTS_KERNEL`, the bench output and the docs.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Aesni => "aesni",
            Kernel::VaesAvx2 => "vaes-avx2",
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn is_supported(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Aesni => cpuid_aesni::get(),
            // std's detection is used rather than cpufeatures for VAES:
            // cpufeatures 0.2 ties "vaes" to the OS saving ZMM state, which a
            // Zen 3 (VAES on YMM, no AVX-512) never reports.
            #[cfg(target_arch = "x86_64")]
            Kernel::VaesAvx2 => {
                cpuid_aesni::get()
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("vaes")
                    && std::arch::is_x86_feature_detected!("vpclmulqdq")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Kernels this CPU can run, fastest first.
    pub fn available() -> Vec<Kernel> {
        Kernel::ALL.into_iter().filter(|k| k.is_supported()).collect()
    }

    /// The fastest kernel this CPU supports.
    pub fn best() -> Kernel {
        Kernel::available()[0]
    }

    /// The kernel new engines use: `SEALDISK_XTS_KERNEL` if set, else the
    /// fastest supported. Decided once per process.
    pub fn selected() -> Result<Kernel, XtsError> {
        // The env value is read once; every caller gets a fresh, owned error.
        static CHOICE: OnceLock<Option<String>> = OnceLock::new();
        let choice = CHOICE.get_or_init(|| {
            std::env::var(KERNEL_ENV)
                .ok()
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        });
        match choice {
            None => Ok(Kernel::best()),
            Some(v) => match v.parse::<Kernel>()? {
                k if k.is_supported() => Ok(k),
                k => Err(XtsError::KernelUnsupported(k)),
            },
        }
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kernel {
    type Err = XtsError;
    fn from_str(s: &str) -> Result<Kernel, XtsError> {
        Kernel::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| XtsError::UnknownKernel(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in Kernel::ALL {
            assert_eq!(k.name().parse::<Kernel>().unwrap(), k);
        }
        assert!(matches!("avx512".parse::<Kernel>(), Err(XtsError::UnknownKernel(_))));
    }

    #[test]
    fn portable_always_available() {
        assert!(Kernel::available().contains(&Kernel::Portable));
    }
}
