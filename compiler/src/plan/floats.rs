//! Numbers JSON has no notation for: a plan's non-finite floats (the causal
//! mask's −∞, say), written as the strings `"inf"`, `"-inf"` and `"NaN"`.
//!
//! Input: a [`Plan`] to write ([`nonfinite`] finds where its JSON would hold
//! `null` for such a number), or a JSON deserializer to read from ([`De`]).
//! Output: the JSON pointers and values of the plan's non-finite numbers;
//! a deserializer that also takes those three strings where a float is
//! expected.
//!
//! Invariants: [`De`] is otherwise the deserializer it wraps (the same
//! values, the same errors with their line and column); a string other than
//! the three is a type error where a float is expected, as it was before.

use crate::graph::Op;
use crate::kernel::{BufKind, Fused, Inst, StepKind, Unary};
use crate::partition::Plan;
use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
use std::fmt;

/// The string a non-finite float is written as.
pub fn name(x: f64) -> &'static str {
    if x.is_nan() {
        "NaN"
    } else if x > 0.0 {
        "inf"
    } else {
        "-inf"
    }
}

/// Where the plan's JSON holds numbers that are not finite (serde_json
/// writes them as `null`), as JSON pointers into the plan, with their values.
pub fn nonfinite(plan: &Plan) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let mut add = |at: String, x: f64| {
        if !x.is_finite() {
            out.push((at, x));
        }
    };
    for (i, d) in plan.devices.iter().enumerate() {
        let p = format!("/devices/{i}/program");
        for (k, b) in d.program.buffers.iter().enumerate() {
            if let BufKind::Const(x) = b.kind {
                add(format!("{p}/buffers/{k}/kind/Const"), x);
            }
        }
        for (j, s) in d.program.steps.iter().enumerate() {
            let at = format!("{p}/steps/{j}/kind");
            match &s.kind {
                StepKind::Op(op) => op_floats(op, &format!("{at}/Op"), &mut add),
                StepKind::Fused(f) => fused_floats(f, &format!("{at}/Fused"), &mut add),
                StepKind::Reduce { op, epilogue } => {
                    op_floats(op, &format!("{at}/Reduce/op"), &mut add);
                    fused_floats(epilogue, &format!("{at}/Reduce/epilogue"), &mut add);
                }
                StepKind::Broadcast | StepKind::MatMul { .. } => {}
            }
        }
    }
    out
}

fn op_floats(op: &Op, at: &str, add: &mut impl FnMut(String, f64)) {
    match op {
        Op::Const(x) => add(format!("{at}/Const"), *x),
        Op::ClipScale { max_norm } => add(format!("{at}/ClipScale/max_norm"), *max_norm),
        Op::LayerNorm { eps } => add(format!("{at}/LayerNorm/eps"), *eps),
        Op::LayerNormGradX { eps } => add(format!("{at}/LayerNormGradX/eps"), *eps),
        Op::LayerNormGradGamma { eps } => add(format!("{at}/LayerNormGradGamma/eps"), *eps),
        Op::RmsNorm { eps } => add(format!("{at}/RmsNorm/eps"), *eps),
        Op::RmsNormGradX { eps } => add(format!("{at}/RmsNormGradX/eps"), *eps),
        Op::RmsNormGradGamma { eps } => add(format!("{at}/RmsNormGradGamma/eps"), *eps),
        Op::CausalMask { fill } => add(format!("{at}/CausalMask/fill"), *fill),
        Op::Dropout { p, .. } => add(format!("{at}/Dropout/p"), *p),
        Op::Im2Col { fill, .. } => add(format!("{at}/Im2Col/fill"), *fill),
        Op::Rope { base, .. } => add(format!("{at}/Rope/base"), *base),
        _ => {}
    }
}

fn fused_floats(f: &Fused, at: &str, add: &mut impl FnMut(String, f64)) {
    for (m, inst) in f.body.iter().enumerate() {
        match inst {
            Inst::Const(x) => add(format!("{at}/body/{m}/Const"), *x),
            Inst::Unary(Unary::ClipScale(x), _) => add(format!("{at}/body/{m}/Unary/0/ClipScale"), *x),
            _ => {}
        }
    }
}

/// The deserializer `D`, taking the strings `"inf"`, `"-inf"` and `"NaN"` as floats.
pub struct De<D>(pub D);
struct Vis<V>(V);
struct FloatVis<V>(V);
struct Seed<S>(S);
struct Seq<A>(A);
struct Map<A>(A);
struct Enum<A>(A);
struct Variant<A>(A);

macro_rules! forward_deserialize {
    ($($method:ident),*) => {$(
        fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
            self.0.$method(Vis(v))
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for De<D> {
    type Error = D::Error;

    forward_deserialize!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any
    );

    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(FloatVis(v))
    }

    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(FloatVis(v))
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, name: &'static str, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_unit_struct(name, Vis(v))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, name: &'static str, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_newtype_struct(name, Vis(v))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_tuple(len, Vis(v))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(self, name: &'static str, len: usize, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_tuple_struct(name, len, Vis(v))
    }

    fn deserialize_struct<V: Visitor<'de>>(self, name: &'static str, fields: &'static [&'static str], v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_struct(name, fields, Vis(v))
    }

    fn deserialize_enum<V: Visitor<'de>>(self, name: &'static str, variants: &'static [&'static str], v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_enum(name, variants, Vis(v))
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

macro_rules! forward_visit {
    ($($method:ident: $ty:ty),*) => {$(
        fn $method<E: de::Error>(self, x: $ty) -> Result<V::Value, E> {
            self.0.$method(x)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Vis<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    forward_visit!(
        visit_bool: bool,
        visit_i8: i8,
        visit_i16: i16,
        visit_i32: i32,
        visit_i64: i64,
        visit_i128: i128,
        visit_u8: u8,
        visit_u16: u16,
        visit_u32: u32,
        visit_u64: u64,
        visit_u128: u128,
        visit_f32: f32,
        visit_f64: f64,
        visit_char: char,
        visit_str: &str,
        visit_borrowed_str: &'de str,
        visit_string: String,
        visit_bytes: &[u8],
        visit_borrowed_bytes: &'de [u8],
        visit_byte_buf: Vec<u8>
    );

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.0.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.0.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.0.visit_some(De(d))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.0.visit_newtype_struct(De(d))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
        self.0.visit_seq(Seq(a))
    }

    fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(Map(a))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
        self.0.visit_enum(Enum(a))
    }
}

impl<'de, V: Visitor<'de>> Visitor<'de> for FloatVis<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    forward_visit!(visit_i64: i64, visit_u64: u64, visit_f64: f64);

    fn visit_str<E: de::Error>(self, s: &str) -> Result<V::Value, E> {
        match s {
            "inf" => self.0.visit_f64(f64::INFINITY),
            "-inf" => self.0.visit_f64(f64::NEG_INFINITY),
            "NaN" => self.0.visit_f64(f64::NAN),
            _ => Err(E::invalid_type(de::Unexpected::Str(s), &self)),
        }
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(De(d))
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Seq<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(Seed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Map<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        self.0.next_key_seed(Seed(seed))
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.0.next_value_seed(Seed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Enum<A> {
    type Error = A::Error;
    type Variant = Variant<A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<(T::Value, Self::Variant), A::Error> {
        self.0.variant_seed(Seed(seed)).map(|(v, a)| (v, Variant(a)))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Variant<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.0.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.0.newtype_variant_seed(Seed(seed))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, A::Error> {
        self.0.tuple_variant(len, Vis(v))
    }

    fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], v: V) -> Result<V::Value, A::Error> {
        self.0.struct_variant(fields, Vis(v))
    }
}
