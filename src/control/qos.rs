//! Per-category QoS caps, computed from the disk size like cloud disks do.
//! sealdisk records the caps on each disk at creation, reports them in DescribeDisks, and
//! enforces them at attach with a `qos` vbdev on top of the disk's stack
//! (`bdev::qos`); a daemon started with `--no-qos` attaches without caps.

use serde::{Deserialize, Serialize};

use crate::catalog::{Category, QosCaps};

/// How one category's caps grow with size: `min(base + per_gib * GiB, max)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CategoryQos {
    pub iops_base: u64,
    pub iops_per_gib: u64,
    pub iops_max: u64,
    /// MB/s (10^6 bytes per second).
    pub mbps_base: u64,
    /// MB/s per GiB, in thousandths (e.g. 500 = 0.5 MB/s per GiB).
    pub mbps_per_gib_milli: u64,
    pub mbps_max: u64,
}

impl CategoryQos {
    pub fn caps(&self, size_bytes: u64) -> QosCaps {
        let gib = size_bytes.div_ceil(1 << 30);
        let iops = (self.iops_base + self.iops_per_gib * gib).min(self.iops_max);
        let mbps = (self.mbps_base + self.mbps_per_gib_milli * gib / 1000).min(self.mbps_max);
        QosCaps {
            iops,
            bandwidth_bytes: mbps * 1_000_000,
        }
    }
}

/// The caps table. `enabled = false` records no caps (benchmarks).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QosConfig {
    pub enabled: bool,
    pub basic: CategoryQos,
    pub ultra: CategoryQos,
    pub ssd: CategoryQos,
}

impl Default for QosConfig {
    /// Modelled on public-cloud disk classes: basic ≈ a few hundred IOPS and 30–40 MB/s;
    /// ultra (cloud_efficiency) `min(1800 + 50/GiB, 5000)` IOPS, `min(100 + 0.15/GiB, 140)` MB/s;
    /// ssd (cloud_ssd) `min(1800 + 30/GiB, 25000)` IOPS, `min(120 + 0.5/GiB, 300)` MB/s.
    fn default() -> Self {
        QosConfig {
            enabled: true,
            basic: CategoryQos {
                iops_base: 300,
                iops_per_gib: 0,
                iops_max: 300,
                mbps_base: 30,
                mbps_per_gib_milli: 0,
                mbps_max: 40,
            },
            ultra: CategoryQos {
                iops_base: 1800,
                iops_per_gib: 50,
                iops_max: 5000,
                mbps_base: 100,
                mbps_per_gib_milli: 150,
                mbps_max: 140,
            },
            ssd: CategoryQos {
                iops_base: 1800,
                iops_per_gib: 30,
                iops_max: 25000,
                mbps_base: 120,
                mbps_per_gib_milli: 500,
                mbps_max: 300,
            },
        }
    }
}

impl QosConfig {
    /// No caps at all.
    pub fn off() -> QosConfig {
        QosConfig {
            enabled: false,
            ..QosConfig::default()
        }
    }

    /// The caps for a new disk (`None` when switched off).
    pub fn caps(&self, category: Category, size_bytes: u64) -> Option<QosCaps> {
        if !self.enabled {
            return None;
        }
        Some(match category {
            Category::Basic => self.basic.caps(size_bytes),
            Category::Ultra => self.ultra.caps(size_bytes),
            Category::Ssd => self.ssd.caps(size_bytes),
        })
    }
}
