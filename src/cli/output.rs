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

/// The results shown as a table: the method, the path to its rows, the columns.
const TABLES: &[(&str, &[&str], &[&str])] = &[
    (
        "DescribeDisks",
        &["Disks", "Disk"],
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
    ),
    (
        "DescribeSnapshots",
        &["Snapshots", "Snapshot"],
        &[
            "SnapshotId",
            "RegionId",
            "SourceDiskId",
            "SizeBytes",
            "Encrypted",
            "CreationTime",
        ],
    ),
    (
        "DescribeImages",
        &["Images", "Image"],
        &[
            "ImageId",
            "RegionId",
            "ImageOwnerAlias",
            "SizeBytes",
            "Encrypted",
            "SourceSnapshotId",
            "SharedWith",
        ],
    ),
    (
        "DescribeInstances",
        &["Instances", "Instance"],
        &["InstanceId", "RegionId", "InstanceName", "SystemDiskId", "DataDiskIds"],
    ),
    (
        "DescribeKmsUsage",
        &["Regions"],
        &[
            "RegionId",
            "Activated",
            "Calls",
            "Throttled",
            "Available",
            "DataKeys",
            "EncryptedDisks",
        ],
    ),
    (
        "DescribeTasks",
        &["TaskSet", "Task"],
        &[
            "TaskId",
            "TaskAction",
            "TaskStatus",
            "ResourceId",
            "BytesDone",
            "BytesTotal",
            "RateBytesPerSec",
        ],
    ),
    (
        "DescribeDiskMonitorData",
        &["MonitorData", "DiskMonitorData"],
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
    ),
    (
        "DescribeReactors",
        &["Reactors"],
        &[
            "ReactorId",
            "Core",
            "BusyPercent",
            "Ios",
            "Bytes",
            "QueueFull",
            "SlowParks",
        ],
    ),
];

/// Renders `v`, the result of `method`: a table for the methods in [`TABLES`]
/// (when the rows are there), else its fields, one per line.
pub(super) fn human(method: &str, v: &Value) -> String {
    let rows = TABLES
        .iter()
        .find(|(m, _, _)| *m == method)
        .and_then(|(_, path, cols)| {
            let rows = path.iter().try_fold(v, |v, k| v.get(*k))?.as_array()?;
            Some(table(rows, cols))
        });
    rows.unwrap_or_else(|| fields(v))
}

/// `key: value` per line (of `KeyMetadata` if there is one), without `RequestId`.
fn fields(v: &Value) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn listed_results_are_tables_and_the_rest_fields() {
        let v = json!({
            "RequestId": "r-1",
            "TaskSet": {"Task": [{"TaskId": "t-1", "TaskAction": "MigrateDisk", "TaskStatus": "Finished",
                                  "ResourceId": "d-1", "BytesDone": 5, "BytesTotal": 5, "RateBytesPerSec": 0}]},
        });
        let out = human("DescribeTasks", &v);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        let head: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            head,
            [
                "TaskId",
                "TaskAction",
                "TaskStatus",
                "ResourceId",
                "BytesDone",
                "BytesTotal",
                "RateBytesPerSec"
            ]
        );
        assert!(lines[1].starts_with("t-1  "), "{out}");
        assert!(lines[1].contains("MigrateDisk"), "{out}");
        // A method without a table, and one whose rows are missing: one field a line,
        // without RequestId; a KMS key's metadata unwrapped.
        assert_eq!(
            human("CreateDisk", &json!({"DiskId": "d-1", "RequestId": "r"})),
            "DiskId: d-1\n"
        );
        assert_eq!(
            human("DescribeDisks", &json!({"RequestId": "r", "TotalCount": 0})),
            "TotalCount: 0\n"
        );
        assert_eq!(
            human(
                "DescribeKey",
                &json!({"KeyMetadata": {"KeyId": "k-1"}, "RequestId": "r"})
            ),
            "KeyId: k-1\n"
        );
    }
}
