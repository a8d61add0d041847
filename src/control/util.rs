//! Small helpers: identifiers and timestamps (formatted by [`crate::units`]).

use rand::RngCore;

/// A new object id: `<prefix>-<16 hex digits>` (satisfies the KMS identifier rules).
pub(crate) fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    let mut s = String::with_capacity(prefix.len() + 17);
    s.push_str(prefix);
    s.push('-');
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

pub(crate) use crate::units::{now_rfc3339, parse_rfc3339};

/// Seconds since the epoch as RFC 3339 UTC with seconds (what [`parse_rfc3339`] reads).
pub fn rfc3339(secs: u64) -> String {
    crate::units::rfc3339(secs, None)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_follow_rules() {
        let id = super::new_id("d");
        assert_eq!(id.len(), 18);
        assert!(id.starts_with("d-"));
    }
}
