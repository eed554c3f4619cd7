//! Time formatting without a date library: RFC 3339 in UTC.

use std::time::{SystemTime, UNIX_EPOCH};

/// Formats seconds and nanoseconds since the epoch as RFC 3339 UTC with 9 fraction digits.
pub fn rfc3339_nanos(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z", sod / 3600, sod % 3600 / 60, sod % 60)
}

/// Now as RFC 3339 UTC with nanoseconds.
pub fn now_rfc3339() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    rfc3339_nanos(d.as_secs() as i64, d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_nanos(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339_nanos(1_475_713_029, 669_794_202), "2016-10-06T00:17:09.669794202Z");
        assert_eq!(rfc3339_nanos(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(rfc3339_nanos(4_102_444_799, 999_999_999), "2099-12-31T23:59:59.999999999Z");
    }
}
