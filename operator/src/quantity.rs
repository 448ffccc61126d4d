//! Kubernetes resource quantities as numbers: parsing (`500m`, `2`, `1.5Gi`,
//! `1e3`), summing and formatting. Pure; used for usage accounting and to
//! compare quantities that the API server may have canonicalised.
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Parses a quantity into its value in base units (cores, bytes, count).
pub fn parse(q: &str) -> Option<f64> {
    let q = q.trim();
    if q.is_empty() {
        return None;
    }
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    Some(num * mult)
}

/// The value of a Quantity (0 when unparsable).
pub fn value(q: &Quantity) -> f64 {
    parse(&q.0).unwrap_or(0.0)
}

/// True when both strings are quantities with the same value.
pub fn same_value(a: &str, b: &str) -> bool {
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) => (x - y).abs() <= f64::EPSILON * x.abs().max(y.abs()).max(1.0),
        _ => false,
    }
}

/// Formats CPU cores as a canonical quantity (`250m`, `2`).
pub fn format_cpu(cores: f64) -> Quantity {
    let milli = (cores * 1000.0).round() as i64;
    if milli % 1000 == 0 {
        Quantity(format!("{}", milli / 1000))
    } else {
        Quantity(format!("{milli}m"))
    }
}

/// Formats bytes as a canonical quantity (`512Mi`, `2Gi`, or plain bytes).
pub fn format_bytes(bytes: f64) -> Quantity {
    let b = bytes.round() as i64;
    for (suffix, unit) in [("Ti", 1i64 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if b != 0 && b % unit == 0 {
            return Quantity(format!("{}{suffix}", b / unit));
        }
    }
    Quantity(format!("{b}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_suffix() {
        assert_eq!(parse("500m"), Some(0.5));
        assert_eq!(parse("2"), Some(2.0));
        assert_eq!(parse("1.5Gi"), Some(1.5 * 1024f64.powi(3)));
        assert_eq!(parse("1e3"), Some(1000.0));
        assert_eq!(parse("128974848"), Some(128974848.0));
        assert_eq!(parse("129M"), Some(129e6));
        assert_eq!(parse("10x"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn compares_canonical_forms() {
        assert!(same_value("1000m", "1"));
        assert!(same_value("1024Mi", "1Gi"));
        assert!(!same_value("1", "2"));
        assert!(!same_value("abc", "abc"));
    }

    #[test]
    fn formats() {
        assert_eq!(format_cpu(0.25).0, "250m");
        assert_eq!(format_cpu(3.0).0, "3");
        assert_eq!(format_bytes(512.0 * 1024.0 * 1024.0).0, "512Mi");
        assert_eq!(format_bytes(3.0 * 1024f64.powi(3)).0, "3Gi");
        assert_eq!(format_bytes(1000.0).0, "1000");
        assert_eq!(format_bytes(0.0).0, "0");
    }
}
