//! Go-style durations ("10s", "1m30s", "250ms", "1h"), as Consul's API and config use them.

use std::time::Duration;

/// The longest duration Go's `time.Duration` holds (an i64 of nanoseconds, about 292 years):
/// anything longer is an error here too, so no later arithmetic on a parsed value overflows.
pub const MAX: Duration = Duration::from_nanos(i64::MAX as u64);

/// Parse a duration as Consul's API and config take one: a Go duration, or a bare number of
/// seconds (`wait=30`). `None` for anything else, negative or too large.
pub fn parse(s: &str) -> Option<Duration> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = t.parse().ok()?;
        let d = Duration::from_secs(secs);
        return (d <= MAX).then_some(d);
    }
    parse_go(s).ok()
}

/// Go's `time.ParseDuration` for non-negative durations, in exact integer arithmetic with every
/// step checked: the one duration parser of the code base.
pub fn parse_go(s: &str) -> Result<Duration, String> {
    let orig = s;
    let s = s.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.starts_with('-') {
        return Err(format!("invalid duration {orig:?}: must not be negative"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(format!("invalid duration {orig:?}"));
    }
    let too_large = || format!("invalid duration {orig:?}: too large");
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number = &rest[..num_end];
        if number.is_empty() || number == "." {
            return Err(format!("invalid duration {orig:?}"));
        }
        rest = &rest[num_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit: u128 = match &rest[..unit_end] {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("missing unit in duration {orig:?}")),
            u => return Err(format!("unknown unit {u:?} in duration {orig:?}")),
        };
        rest = &rest[unit_end..];
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        if frac.contains('.') {
            return Err(format!("invalid duration {orig:?}"));
        }
        // Longer digit strings than u128 holds are far past MAX anyway.
        let int: u128 = if int.is_empty() { 0 } else { int.parse().map_err(|_| too_large())? };
        let mut nanos = int.checked_mul(unit).ok_or_else(too_large)?;
        let mut scale = unit;
        for digit in frac.bytes().take(20) {
            scale /= 10;
            nanos = nanos.checked_add(u128::from(digit - b'0') * scale).ok_or_else(too_large)?;
        }
        total = total.checked_add(nanos).ok_or_else(too_large)?;
    }
    if total > MAX.as_nanos() {
        return Err(too_large());
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Go's `time.Duration.String()` ("10s", "1m30s", "1h0m0s", "250ms", "1.5s").
pub fn format(d: Duration) -> String {
    format_go(d)
}

/// Go's `time.Duration.String()` ("10s", "1m30s", "1h0m0s", "250ms", "1.5s").
pub fn format_go(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    fn with_fraction(value: u128, unit: u128) -> String {
        let int = value / unit;
        let frac = value % unit;
        if frac == 0 {
            return int.to_string();
        }
        let width = unit.ilog10() as usize;
        let digits = format!("{frac:0width$}");
        format!("{int}.{}", digits.trim_end_matches('0'))
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}\u{b5}s", with_fraction(nanos, 1_000));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", with_fraction(nanos, 1_000_000));
    }
    let secs_total = nanos / 1_000_000_000;
    let sub = nanos % 1_000_000_000;
    let (h, m, s) = (secs_total / 3600, (secs_total % 3600) / 60, secs_total % 60);
    let secs = with_fraction(s * 1_000_000_000 + sub, 1_000_000_000);
    match (h, m) {
        (0, 0) => format!("{secs}s"),
        (0, m) => format!("{m}m{secs}s"),
        (h, m) => format!("{h}h{m}m{secs}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any input, crafted or random, parses to a bounded duration or to an error.
        #[test]
        fn parsing_never_panics_and_stays_bounded(s in "[0-9.a-zµ+-]{0,40}") {
            if let Some(d) = parse(&s) {
                proptest::prop_assert!(d <= MAX);
                // Everything the API adds to a parsed duration stays in range.
                let _ = std::time::Instant::now().checked_add(d);
            }
        }

        #[test]
        fn formatted_durations_parse_back(n in 0u64..(i64::MAX as u64)) {
            let d = Duration::from_nanos(n);
            proptest::prop_assert_eq!(parse_go(&format_go(d)), Ok(d));
        }
    }

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse("5x"), None);
        assert_eq!(parse("-5s"), None);
        assert_eq!(parse("99999999999999999999999h"), None);
        assert_eq!(parse("2562047h47m16.854775807s"), Some(MAX));
        assert_eq!(parse("2562047h47m16.854775808s"), None);
        assert_eq!(parse("18446744073709551615"), None);
        assert_eq!(parse("s"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format(Duration::from_secs(15)), "15s");
        assert_eq!(format(Duration::from_secs(90)), "1m30s");
        assert_eq!(format(Duration::from_millis(250)), "250ms");
    }
}

/// RFC 3339 UTC timestamp ("2026-11-29T15:04:05Z") for a system time.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, (rem % 3600) / 60, rem % 60)
}

#[cfg(test)]
mod rfc3339_tests {
    #[test]
    fn formats_the_epoch_and_a_leap_day() {
        use std::time::{Duration, UNIX_EPOCH};
        assert_eq!(super::rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661)), "2000-02-29T01:01:01Z");
    }
}
