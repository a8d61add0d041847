//! DescribeReactors: each reactor's counters, and the slow path beside them (the
//! pool's metadata thread, the KMS). Host-level, no account.

use serde_json::{json, Value};

use super::{Control, ControlError, Params};
use crate::counters::HistogramSnapshot;
use crate::kms::{KmsBackendSnapshot, KmsStatsSnapshot};
use crate::reactor::IoCount;
use crate::volume::MetaStatsSnapshot;

/// The slow path's counters at one moment (what the metrics endpoint renders).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SlowPathSnapshot {
    pub metadata_thread: MetaStatsSnapshot,
    pub kms: KmsStatsSnapshot,
}

/// Count, sum, max and mean of a histogram.
fn summary(h: &HistogramSnapshot) -> Value {
    json!({ "Count": h.count, "Sum": h.sum, "Max": h.max, "Mean": (h.mean() * 10.0).round() / 10.0 })
}

fn io_count(c: &IoCount) -> Value {
    json!({ "Ios": c.ios, "Bytes": c.bytes })
}

fn kms_backend(b: &KmsBackendSnapshot) -> Value {
    json!({
        "Calls": b.calls,
        "Errors": b.errors,
        "Throttled": b.throttled,
        "LatencyNs": summary(&b.latency_ns),
    })
}

impl Control {
    /// The pool's metadata thread and the KMS counters.
    pub fn slow_path(&self) -> SlowPathSnapshot {
        SlowPathSnapshot {
            metadata_thread: self.pool.meta_stats(),
            kms: self.kms.stats(),
        }
    }

    pub(super) fn describe_reactors(&self, p: Params) -> Result<Value, ControlError> {
        p.finish()?;
        let reactors = self.reactors.as_ref().ok_or_else(|| {
            ControlError::DataPath("DescribeReactors needs the reactors (run it through the daemon)".into())
        })?;
        let list: Vec<Value> = reactors
            .stats()
            .iter()
            .enumerate()
            .map(|(i, s)| {
                json!({
                    "ReactorId": i,
                    "Core": reactors.core(i),
                    "BusyNs": s.busy_ns,
                    "IdleNs": s.idle_ns,
                    "BusyPercent": (s.busy_percent() * 10.0).round() / 10.0,
                    "Polls": s.polls,
                    "IdlePolls": s.idle_polls,
                    "Parks": s.parks,
                    "Ios": s.ios,
                    "Bytes": s.bytes,
                    "IosBySource": {
                        "Vhost": io_count(&s.by_source.vhost),
                        "Nbd": io_count(&s.by_source.nbd),
                        "Bench": io_count(&s.by_source.bench),
                        "Job": io_count(&s.by_source.job),
                    },
                    "QueueFull": s.queue_full,
                    "SlowParks": s.slow_parks,
                })
            })
            .collect();
        let sp = self.slow_path();
        let m = &sp.metadata_thread;
        Ok(json!({
            "Reactors": list,
            "MetadataThread": {
                "QueueDepth": m.queue_depth,
                "Requests": m.requests,
                "BatchSize": summary(&m.batch_size),
                "WriterWaitNs": summary(&m.writer_wait_ns),
                "FdatasyncNs": summary(&m.fdatasync_ns),
                "CommitNs": summary(&m.commit_ns),
                "BatchNs": summary(&m.batch_ns),
                "PrepareFailures": m.prepare_failures,
                "DurabilityFailures": m.durability_failures,
            },
            "Kms": {
                "Backend": self.kms.backend_kind().to_string(),
                "Local": kms_backend(&sp.kms.local),
                "Transit": kms_backend(&sp.kms.transit),
            },
        }))
    }
}
