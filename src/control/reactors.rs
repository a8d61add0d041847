//! DescribeReactors: each reactor's counters (host-level, no account).

use serde_json::{json, Value};

use super::{Control, ControlError, Params};

impl Control {
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
                let total = s.busy_ns + s.idle_ns;
                json!({
                    "ReactorId": i,
                    "Core": reactors.core(i),
                    "BusyNs": s.busy_ns,
                    "IdleNs": s.idle_ns,
                    "BusyPercent": if total > 0 { (s.busy_ns as f64 * 1000.0 / total as f64).round() / 10.0 } else { 0.0 },
                    "Ios": s.ios,
                    "Bytes": s.bytes,
                    "QueueFull": s.queue_full,
                    "SlowParks": s.slow_parks,
                })
            })
            .collect();
        Ok(json!({ "Reactors": list }))
    }
}
