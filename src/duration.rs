//! Go-style durations (`10m`, `1h30m`, `1.5s`, `250ms`), as Consul and the
//! original depro write them, for config fields and flags.

use std::time::Duration;

/// Parses a duration such as `30s`, `10m`, `1h30m`, `1.5s` or `250ms`.
/// A unit is required (a bare `30` is ambiguous, so it is an error).
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let hint = "write it like 30s, 10m, 1h30m or 250ms";
    if text.is_empty() {
        return Err(format!("an empty duration; {hint}"));
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a duration; {hint}"))?;
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("{text:?} has no unit; {hint}")),
            _ => return Err(format!("{text:?} has an unknown unit {unit:?}; {hint}")),
        };
        total += value * scale;
        rest = after;
    }
    if !total.is_finite() || total > 1e9 {
        return Err(format!("{text:?} is too long a duration"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Formats a duration the way Consul expects it in API bodies and query
/// strings: whole milliseconds, e.g. `15000ms`, or whole seconds when exact.
pub(crate) fn to_consul(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A short human form for messages: `250ms`, `1.5s`, `10m`, `1h30m`.
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs();
    if secs < 60 {
        let tenths = ms / 100;
        return if tenths % 10 == 0 {
            format!("{secs}s")
        } else {
            format!("{}.{}s", tenths / 10, tenths % 10)
        };
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style_durations() {
        assert_eq!(parse("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn rejects_missing_or_unknown_units_with_a_hint() {
        for bad in ["", "30", "10 m", "5x", "m", "1..5s", "-5s"] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains("30s, 10m"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn formats_for_consul_and_for_people() {
        assert_eq!(to_consul(Duration::from_secs(15)), "15s");
        assert_eq!(to_consul(Duration::from_millis(1500)), "1500ms");
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human(Duration::from_secs(600)), "10m");
        assert_eq!(human(Duration::from_secs(5430)), "1h30m30s");
    }
}
