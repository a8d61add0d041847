//! Human-readable output of RPC results: tables for Describe*, `Key: value` otherwise.

use serde_json::Value;

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn table(rows: &[Value], cols: &[&str]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| cell(r.get(*c).unwrap_or(&Value::Null))).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| cells.iter().map(|r| r[i].len()).chain([c.len()]).max().unwrap_or(0))
        .collect();
    let line = |vals: Vec<&str>| {
        let mut s = vals
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(cols.to_vec());
    for r in &cells {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Renders `v`, the result of `method`.
pub(super) fn human(method: &str, v: &Value) -> String {
    let list = |outer: &str, inner: &str| v.get(outer).and_then(|o| o.get(inner)).and_then(Value::as_array);
    let t = match method {
        "DescribeDisks" => list("Disks", "Disk").map(|r| {
            table(
                r,
                &[
                    "DiskId",
                    "RegionId",
                    "Size",
                    "Category",
                    "Type",
                    "Encrypted",
                    "Status",
                    "InstanceId",
                    "SourceSnapshotId",
                    "MultiAttach",
                ],
            )
        }),
        "DescribeSnapshots" => list("Snapshots", "Snapshot").map(|r| {
            table(
                r,
                &[
                    "SnapshotId",
                    "RegionId",
                    "SourceDiskId",
                    "SizeBytes",
                    "Encrypted",
                    "CreationTime",
                ],
            )
        }),
        "DescribeImages" => list("Images", "Image").map(|r| {
            table(
                r,
                &[
                    "ImageId",
                    "RegionId",
                    "ImageOwnerAlias",
                    "SizeBytes",
                    "Encrypted",
                    "SourceSnapshotId",
                    "SharedWith",
                ],
            )
        }),
        "DescribeInstances" => list("Instances", "Instance").map(|r| {
            table(
                r,
                &["InstanceId", "RegionId", "InstanceName", "SystemDiskId", "DataDiskIds"],
            )
        }),
        "DescribeKmsUsage" => v.get("Regions").and_then(Value::as_array).map(|r| {
            table(
                r,
                &[
                    "RegionId",
                    "Activated",
                    "Calls",
                    "Throttled",
                    "Available",
                    "DataKeys",
                    "EncryptedDisks",
                ],
            )
        }),
        "DescribeTasks" => v["TaskSet"]["Task"].as_array().map(|r| {
            table(
                r,
                &[
                    "TaskId",
                    "TaskAction",
                    "TaskStatus",
                    "ResourceId",
                    "BytesDone",
                    "BytesTotal",
                    "RateBytesPerSec",
                ],
            )
        }),
        "DescribeDiskMonitorData" => list("MonitorData", "DiskMonitorData").map(|r| {
            table(
                r,
                &[
                    "TimeStamp",
                    "IOPSRead",
                    "IOPSWrite",
                    "BPSRead",
                    "BPSWrite",
                    "LatencyRead",
                    "LatencyWrite",
                    "LatencyReadP99",
                    "LatencyWriteP99",
                    "Errors",
                ],
            )
        }),
        "DescribeReactors" => v.get("Reactors").and_then(Value::as_array).map(|r| {
            table(
                r,
                &[
                    "ReactorId",
                    "Core",
                    "BusyPercent",
                    "Ios",
                    "Bytes",
                    "QueueFull",
                    "SlowParks",
                ],
            )
        }),
        _ => None,
    };
    if let Some(t) = t {
        return t;
    }
    let mut out = String::new();
    let obj = v.get("KeyMetadata").unwrap_or(v);
    if let Some(m) = obj.as_object() {
        for (k, val) in m {
            if k == "RequestId" {
                continue;
            }
            let s = match val {
                Value::String(s) => s.clone(),
                Value::Array(_) | Value::Object(_) => val.to_string(),
                other => other.to_string(),
            };
            out.push_str(&format!("{k}: {s}\n"));
        }
    } else {
        out.push_str(&format!("{v}\n"));
    }
    out
}
