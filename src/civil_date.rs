//! Civil dates in UTC (proleptic Gregorian), without a date crate: `expires:` dates of
//! the configuration and the timestamps `check`, `token`, `doctor` and the expiry
//! warnings print. The conversions are Howard Hinnant's `days_from_civil` and
//! `civil_from_days` (<https://howardhinnant.github.io/date_algorithms.html>).

use std::time::{Duration, SystemTime};

/// `YYYY-MM-DD` (years 1970 to 9999) as 00:00 UTC of that day.
pub(crate) fn parse_date(value: &str) -> Option<SystemTime> {
    let mut parts = value.splitn(3, '-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, i64, i64) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || d < 1
        || d > month_days[(m - 1) as usize]
    {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(days).ok()? * 86_400))
}

/// `time` as `YYYY-MM-DDTHH:MM:SSZ` (RFC 3339, UTC); times before 1970 as the epoch.
pub(crate) fn utc_at(time: SystemTime) -> String {
    utc(time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()))
}

/// Epoch seconds as `YYYY-MM-DDTHH:MM:SSZ` (RFC 3339, UTC).
pub(crate) fn utc(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_seconds_print_as_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_795_867_200), "2026-11-28T12:00:00Z");
    }

    #[test]
    fn dates_parse_to_midnight_utc_and_print_back() {
        let epoch = |text| {
            parse_date(text)
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
        };
        assert_eq!(epoch("1970-01-01"), Some(0));
        assert_eq!(
            epoch("2000-02-29").map(utc).as_deref(),
            Some("2000-02-29T00:00:00Z")
        );
        for bad in [
            "1900-02-29",
            "2001-02-29",
            "2026-13-01",
            "2026-1-01",
            "1969-12-31",
        ] {
            assert_eq!(epoch(bad), None, "{bad}");
        }
    }
}
