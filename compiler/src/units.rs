//! Byte counts as people read them: the one formatter every message,
//! table and explanation prints sizes with.
//!
//! Input: a count of bytes ([`Bytes`]), optionally with the units it may be
//! shown in ([`Bytes::within`], [`Bytes::in_unit`]). Output: text through
//! [`std::fmt::Display`], a number and a binary unit (`B`, `KiB`, `MiB`,
//! `GiB`, `TiB`):
//!
//! - `{}`: the human form, with the fewest digits: a whole number when the
//!   value is whole in its unit (`256 MiB`, `1 GiB`, `100 B`), else one
//!   decimal (`922.5 KiB`);
//! - `{:.N}`: exactly `N` decimals (`{:.2}` gives `8.04 MiB`, `{:.1}` gives
//!   `512.0 MiB`);
//! - a width pads the whole text (`{:>11.2}`), aligned left unless told.
//!
//! Invariants: the unit is the largest of the allowed units (all of them
//! for a plain [`Bytes`]) in which the value is at least 1, or the smallest
//! allowed unit when the value is below 1 in every one; a unit is a power of
//! 1024, so the value shown is the exact quotient before rounding. The
//! same count, units and flags always give the same text.

use std::fmt;

/// A binary unit of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unit {
    B,
    KiB,
    MiB,
    GiB,
    TiB,
}

impl Unit {
    const ALL: [Unit; 5] = [Unit::B, Unit::KiB, Unit::MiB, Unit::GiB, Unit::TiB];

    /// Bytes in one of this unit.
    pub fn size(self) -> u64 {
        1u64 << (10 * self as u32)
    }

    pub fn name(self) -> &'static str {
        match self {
            Unit::B => "B",
            Unit::KiB => "KiB",
            Unit::MiB => "MiB",
            Unit::GiB => "GiB",
            Unit::TiB => "TiB",
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A count of bytes, shown in the largest unit that keeps it at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

impl Bytes {
    /// Shown in the largest unit from `min` to `max` that keeps the value
    /// at least 1 (in `min` when it is below 1 there).
    pub fn within(self, min: Unit, max: Unit) -> Scaled {
        Scaled { bytes: self.0, min, max: max.max(min) }
    }

    /// Shown in `unit` whatever its size (`0.5 MiB`, `2048.0 MiB`).
    pub fn in_unit(self, unit: Unit) -> Scaled {
        self.within(unit, unit)
    }

    /// The unit `{}` shows it in.
    pub fn unit(self) -> Unit {
        self.within(Unit::B, Unit::TiB).unit()
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.within(Unit::B, Unit::TiB).fmt(f)
    }
}

/// A count of bytes with the units it may be shown in: what
/// [`Bytes::within`] and [`Bytes::in_unit`] return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scaled {
    bytes: u64,
    min: Unit,
    max: Unit,
}

impl Scaled {
    /// The unit it is shown in.
    pub fn unit(&self) -> Unit {
        Unit::ALL.into_iter().rev().find(|u| (self.min..=self.max).contains(u) && self.bytes >= u.size()).unwrap_or(self.min)
    }
}

impl fmt::Display for Scaled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = self.unit();
        let v = self.bytes as f64 / unit.size() as f64;
        let text = match f.precision() {
            Some(p) => format!("{v:.p$} {unit}"),
            None if v.fract() == 0.0 => format!("{v} {unit}"),
            None => format!("{v:.1} {unit}"),
        };
        match (f.width(), f.align()) {
            (Some(w), Some(fmt::Alignment::Right)) => write!(f, "{text:>w$}"),
            (Some(w), Some(fmt::Alignment::Center)) => write!(f, "{text:^w$}"),
            (Some(w), _) => write!(f, "{text:<w$}"),
            (None, _) => f.write_str(&text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Bytes, Unit};

    #[test]
    fn the_human_form_has_the_fewest_digits() {
        assert_eq!(Bytes(0).to_string(), "0 B");
        assert_eq!(Bytes(1023).to_string(), "1023 B");
        assert_eq!(Bytes(1024).to_string(), "1 KiB");
        assert_eq!(Bytes(944_640).to_string(), "922.5 KiB");
        assert_eq!(Bytes(256 << 20).to_string(), "256 MiB");
        assert_eq!(Bytes(1536 << 20).to_string(), "1.5 GiB");
        assert_eq!(Bytes(3 << 40).to_string(), "3 TiB");
        assert_eq!(Bytes(5 << 50).to_string(), "5120 TiB");
    }

    #[test]
    fn the_precision_fixes_the_decimals() {
        assert_eq!(format!("{:.2}", Bytes(8_430_000)), "8.04 MiB");
        assert_eq!(format!("{:.1}", Bytes(512 << 20)), "512.0 MiB");
        assert_eq!(format!("{:.0}", Bytes(100)), "100 B");
        assert_eq!(format!("{:.2}", Bytes(1 << 30)), "1.00 GiB");
    }

    #[test]
    fn units_can_be_fixed_or_bounded() {
        assert_eq!(format!("{:.1}", Bytes(512 << 10).in_unit(Unit::MiB)), "0.5 MiB");
        assert_eq!(format!("{:.1}", Bytes(3 << 30).in_unit(Unit::MiB)), "3072.0 MiB");
        assert_eq!(format!("{}", Bytes(512 << 10).in_unit(Unit::MiB)), "0.5 MiB");
        assert_eq!(format!("{:.1}", Bytes(100).within(Unit::KiB, Unit::GiB)), "0.1 KiB");
        assert_eq!(format!("{:.2}", Bytes(3 << 40).within(Unit::KiB, Unit::GiB)), "3072.00 GiB");
        assert_eq!(Bytes(3 << 40).within(Unit::B, Unit::MiB).unit(), Unit::MiB);
        assert_eq!(Bytes(100).within(Unit::KiB, Unit::GiB).unit(), Unit::KiB);
        assert_eq!(Bytes(5000).unit(), Unit::KiB);
    }

    #[test]
    fn a_width_pads_the_whole_text() {
        assert_eq!(format!("{:>11.2}", Bytes(8_430_000)), "   8.04 MiB");
        assert_eq!(format!("{:<9}|", Bytes(2048)), "2 KiB    |");
        assert_eq!(format!("{:>12.0}", Bytes(64 << 10).in_unit(Unit::KiB)), "      64 KiB");
    }
}
