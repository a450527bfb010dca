//! The abstract syntax tree of a plan file. Every node carries its span.
//!
//! The tree is exactly what was written: names are not resolved, layers are
//! not instantiated and nothing is evaluated. That is the checker's job.
//!
//! Input: none (definitions). Output: the node types the parser builds.
//! Invariant: every span points into the source the tree was parsed from.

use crate::diag::Span;

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct File {
    pub layers: Vec<LayerDef>,
    pub models: Vec<ModelDef>,
    pub data: Vec<DataDef>,
    pub trains: Vec<TrainDef>,
    pub devices: Vec<DevicesDef>,
    pub placements: Vec<PlacementDef>,
}

// ------------------------------------------------------------------ layers

/// `layer Name(a, b = 4 * a) { param …  layer …  forward(x) … }`
#[derive(Clone, Debug, PartialEq)]
pub struct LayerDef {
    pub name: Ident,
    pub params: Vec<LayerParam>,
    pub members: Vec<Member>,
    pub span: Span,
}

/// A template argument, with an optional default evaluated left to right.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerParam {
    pub name: Ident,
    pub default: Option<Expr>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Member {
    Param(ParamDecl),
    Sublayer(SublayerDecl),
    Forward(ForwardDef),
}

/// `param w: f32[in, out] = glorot_uniform`
#[derive(Clone, Debug, PartialEq)]
pub struct ParamDecl {
    pub name: Ident,
    pub ty: TensorType,
    pub init: Option<Expr>,
    pub span: Span,
}

/// `f32[batch, 4 * d]`
#[derive(Clone, Debug, PartialEq)]
pub struct TensorType {
    pub dtype: Ident,
    pub dims: Vec<Expr>,
    pub span: Span,
}

/// `layer fc1 = Linear(64, 128)` or `layer blocks = repeat 4 Block(64, 4)`
#[derive(Clone, Debug, PartialEq)]
pub struct SublayerDecl {
    pub name: Ident,
    pub repeat: Option<RepeatCount>,
    pub template: Ident,
    pub args: Vec<Arg>,
    /// The constructor call `Linear(64, 128)`.
    pub ctor_span: Span,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RepeatCount {
    Int(i64, Span),
    Name(Ident),
}

/// `forward(x) = expr` or `forward(x) { let …  return … }`
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardDef {
    pub inputs: Vec<Ident>,
    pub lets: Vec<Let>,
    pub ret: Expr,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Let {
    pub name: Ident,
    pub value: Expr,
    pub span: Span,
}

// ------------------------------------------------------------------ models

#[derive(Clone, Debug, PartialEq)]
pub struct ModelDef {
    pub name: Ident,
    pub members: Vec<ModelMember>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ModelMember {
    Input(InputDecl),
    Layer(SublayerDecl),
    Let(Let),
    Loss(Expr, Span),
}

/// `input x: f32[batch, 64]`
#[derive(Clone, Debug, PartialEq)]
pub struct InputDecl {
    pub name: Ident,
    pub ty: TensorType,
    pub span: Span,
}

// ------------------------------------------------------------------ expressions

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Str(String),
    Range(Option<i64>, Option<i64>),
    List(Vec<Expr>),
    Path(Path),
    Call(Call),
    Neg(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    MatMul,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::MatMul => "@",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub callee: Path,
    pub args: Vec<Arg>,
    pub span: Span,
}

/// A positional (`64`) or named (`lr: 0.1`) argument.
#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
    pub span: Span,
}

/// `blocks[*].mlp.up.w`
#[derive(Clone, Debug, PartialEq)]
pub struct Path {
    pub root: Ident,
    pub segs: Vec<PathSeg>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PathSeg {
    Field(Ident),
    Index(Index, Span),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Index {
    Star,
    At(i64),
    Range(Option<i64>, Option<i64>),
}

impl Path {
    /// A path that is just one name.
    pub fn as_name(&self) -> Option<&Ident> {
        self.segs.is_empty().then_some(&self.root)
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.root.name)?;
        for seg in &self.segs {
            match seg {
                PathSeg::Field(id) => write!(f, ".{}", id.name)?,
                PathSeg::Index(ix, _) => write!(f, "[{ix}]")?,
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Index::Star => write!(f, "*"),
            Index::At(i) => write!(f, "{i}"),
            Index::Range(a, b) => {
                if let Some(a) = a {
                    write!(f, "{a}")?;
                }
                write!(f, "..")?;
                if let Some(b) = b {
                    write!(f, "{b}")?;
                }
                Ok(())
            }
        }
    }
}

// ------------------------------------------------------------------ data, train, devices

/// `data digits = csv("data/digits.csv", label: "label")`
#[derive(Clone, Debug, PartialEq)]
pub struct DataDef {
    pub name: Ident,
    pub source: Call,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TrainDef {
    pub entries: Vec<TrainEntry>,
    /// The `train` keyword.
    pub head: Span,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TrainEntry {
    pub key: Ident,
    pub value: Expr,
    pub span: Span,
}

/// `devices cpu x 4 { memory 256 MiB }`
#[derive(Clone, Debug, PartialEq)]
pub struct DevicesDef {
    pub kind: Ident,
    pub count: i64,
    pub count_span: Span,
    pub options: Vec<DeviceOption>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DeviceOption {
    pub key: Ident,
    pub value: Quantity,
    pub span: Span,
}

/// A number with a unit: `512 MiB`, `25 GB/s`, `5 us`.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantity {
    pub value: f64,
    pub unit: Ident,
    pub span: Span,
}

// ------------------------------------------------------------------ placement

#[derive(Clone, Debug, PartialEq)]
pub struct PlacementDef {
    pub kind: PlacementKind,
    /// The `placement` keyword (and `auto`, if present).
    pub head: Span,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PlacementKind {
    Explicit(Vec<PlacementStmt>),
    Auto(Vec<AutoStmt>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum PlacementStmt {
    Mesh(Vec<MeshAxis>, Span),
    DataParallel {
        axis: Ident,
        span: Span,
    },
    Shard {
        path: Path,
        spec: Vec<Ident>,
        spec_span: Span,
        span: Span,
    },
    Pipeline(PipelineDef),
    ParameterServer {
        device: Ident,
        span: Span,
    },
    /// `zero N [paths]`: ZeRO stage `level` (1 optimizer state, 2 and
    /// gradients, 3 and parameters) for the parameters under `paths`, or
    /// for every parameter no other `zero` names when there are none.
    Zero {
        level: i64,
        level_span: Span,
        paths: Vec<Path>,
        span: Span,
    },
    /// `recompute paths`: these layers' activations are recomputed in the backward pass.
    Recompute {
        paths: Vec<Path>,
        span: Span,
    },
    /// `autocast bf16 [paths]`: these layers (every layer without paths)
    /// compute in bfloat16 where PyTorch's autocast does.
    Autocast {
        dtype: Ident,
        paths: Vec<Path>,
        span: Span,
    },
}

/// `data: 2` inside `mesh (…)`
#[derive(Clone, Debug, PartialEq)]
pub struct MeshAxis {
    pub name: Ident,
    pub size: i64,
    pub size_span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PipelineDef {
    pub axis: Ident,
    pub stages: Vec<StageDef>,
    pub microbatches: Vec<(i64, Span)>,
    pub schedules: Vec<Ident>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StageDef {
    pub paths: Vec<Path>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AutoStmt {
    Memory { value: Quantity, per_device: bool, span: Span },
    Option { key: Ident, value: Ident, span: Span },
}
