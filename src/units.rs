//! Sizes and times as people write and read them: `64G` / `4k` / `128KiB`, and RFC 3339
//! UTC time stamps. One parser and one formatter for the CLI, the fio-style benchmarks,
//! the fio engine, the control plane and the KMS audit log.

/// A size or a time stamp that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("{0:?} is not a size: use e.g. 4096, 4k, 128KiB, 64M or 10G")]
    Size(String),
    #[error("{0:?} is not a UTC time like 2026-11-28T02:42:45Z (yyyy-MM-ddTHH:mm:ssZ)")]
    Time(String),
}

/// A size in bytes: a number with an optional binary unit `k`, `m`, `g` or `t` (powers
/// of 1024, as fio's default `kb_base=1024`), optionally followed by `b` or `ib`, any
/// case, spaces allowed around the unit: `4096`, `4k`, `128KiB`, `64M`, `10 G`, `1T`.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let bad = || UnitError::Size(s.to_owned());
    let t = s.trim().to_ascii_lowercase();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let unit = unit.trim();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(unit);
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(bad()),
    };
    if num.is_empty() || (unit.is_empty() && t.ends_with("ib")) {
        return Err(bad());
    }
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(bad)
}

/// Parses RFC 3339 UTC with seconds, exactly as `rfc3339` writes it without fraction
/// (`2026-11-28T02:42:45Z`, ECS's `yyyy-MM-ddTHH:mm:ssZ`), into seconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Result<u64, UnitError> {
    let bad = || UnitError::Time(s.to_owned());
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' || b[19] != b'Z'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, UnitError> {
        let t = &s[r];
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse::<i64>().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let mdays = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if y < 1970 || !(1..=12).contains(&m) || d < 1 || d > mdays[(m - 1) as usize] || hh > 23 || mm > 59 || ss > 59 {
        return Err(bad());
    }
    // Howard Hinnant's days_from_civil.
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok((days * 86400 + hh * 3600 + mm * 60 + ss) as u64)
}

/// Seconds and nanoseconds since the Unix epoch, now.
pub(crate) fn now_unix() -> (u64, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

/// RFC 3339 UTC time stamp, e.g. `2026-11-28T02:42:45.123Z` (milliseconds) or without
/// fraction when `millis` is `None`.
pub(crate) fn rfc3339(secs: u64, millis: Option<u32>) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (rem / 3600, (rem / 60) % 60, rem % 60);
    match millis {
        Some(ms) => format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{ms:03}Z"),
        None => format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z"),
    }
}

/// Now, RFC 3339 UTC with seconds (`2026-11-28T02:42:45Z`).
pub(crate) fn now_rfc3339() -> String {
    rfc3339(now_unix().0, None)
}

/// Now, RFC 3339 UTC with milliseconds.
pub(crate) fn now_rfc3339_millis() -> String {
    let (s, ns) = now_unix();
    rfc3339(s, Some(ns / 1_000_000))
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_every_spelling_and_the_bad_ones() {
        for (s, v) in [
            ("4096", 4096),
            ("4k", 4096),
            ("4K", 4096),
            ("4kb", 4096),
            ("128KiB", 128 << 10),
            ("64M", 64 << 20),
            ("10 G", 10 << 30),
            (" 1t ", 1 << 40),
            ("0", 0),
            ("512b", 512),
        ] {
            assert_eq!(parse_size(s), Ok(v), "{s}");
        }
        for s in [
            "",
            "k",
            "4x",
            "-4k",
            "4.5k",
            "4kk",
            "ib",
            "4ib",
            "99999999999999999999",
            "16777216T",
        ] {
            let e = parse_size(s).unwrap_err().to_string();
            assert!(e.contains("is not a size"), "{s}: {e}");
        }
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0, None), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400, None), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000, Some(7)), "2023-11-14T22:13:20.007Z");
        assert_eq!(rfc3339(4_102_444_800, None), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn parse_rfc3339_round_trips_and_refuses_other_forms() {
        for secs in [0u64, 951_782_400, 1_700_000_000, 1_795_000_000, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&rfc3339(secs, None)), Ok(secs));
        }
        for bad in [
            "",
            "2026-11-28",
            "2026-11-28T02:42:45",
            "2026-11-28T02:42:45+00:00",
            "2026-11-28 02:42:45Z",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-28T24:00:00Z",
            "2026-11-28T02:60:00Z",
            "1969-12-31T23:59:59Z",
            "+026-11-28T02:42:45Z",
            "2026-11-28T02:42:\u{e9}Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?} accepted");
        }
    }
}
