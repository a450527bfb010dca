//! The checker's types: dtypes, dims (possibly named by a symbolic dim),
//! tensor types, and the values an expression can evaluate to.
//!
//! Input: none (definitions). Output: [`DType`], [`Dim`], [`Ty`] and the
//! checker's values. Invariants: every dim of a [`Ty`] is at least 1; a dim
//! bound from a symbolic name keeps that name, so diagnostics can say where a
//! size came from.

use crate::diag::Span;
use serde::Serialize;
use std::fmt;
use std::rc::Rc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I32,
    I64,
}

impl DType {
    pub const ALL: [DType; 6] = [DType::F32, DType::F16, DType::BF16, DType::F64, DType::I32, DType::I64];

    pub fn parse(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I32 => "i32",
            DType::I64 => "i64",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }

    pub fn size_bytes(self) -> u64 {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One dimension: its size, and the symbolic name it came from, if any
/// (`batch`), so that messages read as the user wrote them.
#[derive(Clone, Debug)]
pub struct Dim {
    pub size: i64,
    pub sym: Option<Rc<str>>,
}

impl Dim {
    pub fn known(size: i64) -> Dim {
        Dim { size, sym: None }
    }
}

impl PartialEq for Dim {
    fn eq(&self, other: &Dim) -> bool {
        self.size == other.size
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.sym {
            Some(s) => write!(f, "{s}"),
            None => write!(f, "{}", self.size),
        }
    }
}

/// A tensor type: dtype and shape. Rank 0 is a scalar.
#[derive(Clone, Debug, PartialEq)]
pub struct Ty {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl Ty {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> Ty {
        Ty { dtype, shape }
    }

    pub fn scalar(dtype: DType) -> Ty {
        Ty { dtype, shape: Vec::new() }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> i64 {
        self.shape.iter().fold(1i64, |acc, d| acc.saturating_mul(d.size))
    }

    pub fn bytes(&self) -> u64 {
        (self.numel().max(0) as u64).saturating_mul(self.dtype.size_bytes())
    }

    /// `f32[batch=64, 64]`: symbolic dims with their bound sizes.
    pub fn bound(&self) -> String {
        let dims: Vec<String> = self
            .shape
            .iter()
            .map(|d| match &d.sym {
                Some(s) => format!("{s}={}", d.size),
                None => d.size.to_string(),
            })
            .collect();
        format!("{}[{}]", self.dtype, dims.join(", "))
    }
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

/// A tensor computed by the forward pass (index into `Model::trace`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct TId(pub u32);

/// A primitive operation of the forward pass, with its attributes resolved.
#[derive(Clone, Debug, PartialEq)]
pub enum Prim {
    /// Model input `i`.
    Input(usize),
    /// Parameter `i` of `Model::params`.
    Param(usize),
    /// A number, as a rank-0 tensor of the node's dtype.
    Const(f64),
    Add,
    Sub,
    Mul,
    Div,
    Neg,
    MatMul,
    Relu,
    Gelu,
    Tanh,
    Sigmoid,
    Exp,
    Log,
    Sqrt,
    Softmax {
        axis: usize,
    },
    LogSoftmax {
        axis: usize,
    },
    /// (x, gamma, beta) over the last axis.
    LayerNorm {
        eps: f64,
    },
    /// (x, gamma) over the last axis.
    RmsNorm {
        eps: f64,
    },
    Sum {
        axes: Vec<usize>,
        keepdims: bool,
    },
    Mean {
        axes: Vec<usize>,
        keepdims: bool,
    },
    Max {
        axes: Vec<usize>,
        keepdims: bool,
    },
    /// To the node's shape.
    Reshape,
    Transpose {
        perm: Vec<usize>,
    },
    /// (table, ids)
    Embedding,
    /// (q, k, v): q [batch, seq, heads·dh], k and v [batch, seq, kv_heads·dh]
    /// (grouped-query when kv_heads < heads); `causal` masks later positions.
    Attention {
        heads: usize,
        kv_heads: usize,
        causal: bool,
    },
    /// Rotary position embedding of x [batch, seq, heads·head_dim]: each
    /// head's pairs (2i, 2i+1) turned by pos · base^(-2i/head_dim).
    Rope {
        head_dim: usize,
        base: f64,
    },
    /// (x [n, c, h, w], weight [o, c, kh, kw]) → [n, o, oh, ow].
    Conv2d {
        stride: usize,
        padding: usize,
    },
    /// Max or mean over `kernel` × `kernel` windows of x [n, c, h, w].
    Pool2d {
        kernel: usize,
        stride: usize,
        padding: usize,
        max: bool,
    },
    /// Zeroes each element with probability `p` and scales the others by
    /// 1 / (1 − p), while training; x's first dim is the batch.
    Dropout {
        p: f64,
    },
    /// (logits, labels): mean over all label positions.
    CrossEntropy,
    /// (pred, target): mean squared error.
    Mse,
}

/// One step of the forward pass: `prim(args) : ty`.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceOp {
    pub prim: Prim,
    pub args: Vec<TId>,
    pub ty: Ty,
    /// The top-level layer (or `repeat` element) whose call made it; None
    /// for operations written in the model's own `loss`/forward expression.
    pub unit: Option<super::model::Unit>,
}

/// An instance of a layer in the model's tree (index into `Model::instances`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct InstId(pub u32);

/// What an expression evaluates to while checking.
#[derive(Clone, Debug)]
pub enum Val {
    Int(i64, Option<Rc<str>>),
    Float(f64),
    Bool(bool),
    Str(String),
    Range(Option<i64>, Option<i64>),
    List(Vec<(Val, Span)>),
    Tensor(Ty, TId),
    /// A layer instance, callable.
    Layer(InstId),
    /// A `repeat` stack, callable: its instances applied in order.
    Repeat(Vec<InstId>),
    /// A name that is an init or optimizer spec, checked where it is used.
    Name(String),
    /// A call such as `normal(std: 0.02)` kept for the consumer to interpret.
    Spec(String, Vec<(Option<String>, Val, Span)>),
    /// Already reported; silences follow-on errors.
    Error,
}

impl Val {
    /// Words for "found …" in messages.
    pub fn describe(&self) -> String {
        match self {
            Val::Int(i, _) => format!("the integer {i}"),
            Val::Float(x) => format!("the number {x}"),
            Val::Bool(b) => format!("`{b}`"),
            Val::Str(s) => format!("the string {s:?}"),
            Val::Range(..) => "a range".into(),
            Val::List(_) => "a list".into(),
            Val::Tensor(t, _) => format!("a tensor {t}"),
            Val::Layer(_) => "a layer".into(),
            Val::Repeat(_) => "a repeated layer".into(),
            Val::Name(n) => format!("`{n}`"),
            Val::Spec(n, _) => format!("`{n}(…)`"),
            Val::Error => "an invalid value".into(),
        }
    }
}
