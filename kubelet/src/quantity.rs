//! Kubernetes resource quantities (`250m`, `64Mi`, `1e3`), exact to the nano-unit.

use std::fmt;

/// A quantity in nano-units (1 = 1e-9 of the base unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity(i128);

const NANO: i128 = 1_000_000_000;

impl Quantity {
    pub const ZERO: Quantity = Quantity(0);
    pub const ONE: Quantity = Quantity(NANO);

    /// Parses the API's quantity syntax: a decimal number and an optional suffix (binary
    /// `Ki`..`Ei`, decimal `n u m k M G T P E`, or an exponent `e3`).
    pub fn parse(s: &str) -> Result<Quantity, String> {
        let bad = || {
            format!("quantity {s:?}: must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'")
        };
        let s = s.trim();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(s.len());
        let (num, suffix) = s.split_at(split);
        if num.is_empty() {
            return Err(bad());
        }
        let (negative, digits) = match num.as_bytes()[0] {
            b'-' => (true, &num[1..]),
            b'+' => (false, &num[1..]),
            _ => (false, num),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if (int.is_empty() && frac.is_empty()) || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        // The number as (mantissa, decimal exponent).
        let mut mantissa: i128 = 0;
        for b in int.bytes().chain(frac.bytes()) {
            mantissa = mantissa.checked_mul(10).and_then(|m| m.checked_add(i128::from(b - b'0'))).ok_or_else(bad)?;
        }
        let mut exp10: i32 = -(frac.len() as i32);
        let mut factor: i128 = 1;
        match suffix {
            "" => {}
            "Ki" => factor = 1 << 10,
            "Mi" => factor = 1 << 20,
            "Gi" => factor = 1 << 30,
            "Ti" => factor = 1 << 40,
            "Pi" => factor = 1 << 50,
            "Ei" => factor = 1 << 60,
            "n" => exp10 -= 9,
            "u" => exp10 -= 6,
            "m" => exp10 -= 3,
            "k" => exp10 += 3,
            "M" => exp10 += 6,
            "G" => exp10 += 9,
            "T" => exp10 += 12,
            "P" => exp10 += 15,
            "E" => exp10 += 18,
            e if e.starts_with(['e', 'E']) => exp10 += e[1..].parse::<i32>().map_err(|_| bad())?,
            _ => return Err(bad()),
        }
        // To nano-units: multiply by 10^(exp10 + 9), rounding up what is finer than a nano-unit.
        let shift = exp10 + 9;
        let mut v = mantissa.checked_mul(factor).ok_or_else(bad)?;
        if shift >= 0 {
            v = v.checked_mul(10i128.checked_pow(shift as u32).ok_or_else(bad)?).ok_or_else(bad)?;
        } else {
            let d = 10i128.checked_pow((-shift) as u32).ok_or_else(bad)?;
            v = (v + d - 1) / d;
        }
        Ok(Quantity(if negative { -v } else { v }))
    }

    pub fn is_zero(&self) -> bool {
        self.0 == 0
    }

    /// `self / divisor`, rounded up to a whole number.
    pub fn div_ceil(&self, divisor: &Quantity) -> i128 {
        let (a, b) = (self.0, divisor.0);
        let q = a / b;
        if a % b != 0 && (a > 0) == (b > 0) { q + 1 } else { q }
    }

    /// The value in whole base units, rounded up (bytes, cores).
    pub fn ceil_units(&self) -> i128 {
        self.div_ceil(&Quantity::ONE)
    }

    /// The value in milli-units, rounded up (millicores).
    pub fn ceil_millis(&self) -> i128 {
        self.div_ceil(&Quantity(NANO / 1000))
    }

    pub fn from_units(n: i128) -> Quantity {
        Quantity(n * NANO)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0 as f64 / NANO as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_and_exponents() {
        let q = |s: &str| Quantity::parse(s).unwrap();
        assert_eq!(q("1").ceil_units(), 1);
        assert_eq!(q("250m").ceil_millis(), 250);
        assert_eq!(q("250m").ceil_units(), 1);
        assert_eq!(q("1.5").ceil_millis(), 1500);
        assert_eq!(q("64Mi").ceil_units(), 64 << 20);
        assert_eq!(q("1Ki").ceil_units(), 1024);
        assert_eq!(q("2G").ceil_units(), 2_000_000_000);
        assert_eq!(q("1e3").ceil_units(), 1000);
        assert_eq!(q("1E-3").ceil_millis(), 1);
        assert_eq!(q("0.5Gi").ceil_units(), 1 << 29);
        assert_eq!(q("100n").div_ceil(&q("1n")), 100);
        assert_eq!(q("8Ei").ceil_units(), 8 << 60);
        for bad in ["", "Mi", "1Qi", "1.2.3", "abc", "--1", "1e"] {
            assert!(Quantity::parse(bad).is_err(), "{bad:?}");
        }
    }
}
