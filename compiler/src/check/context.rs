//! What the rules of the primitive operations (`ops`) need from the model
//! checker that applies them, so that `ops` does not depend on `model`.
//!
//! Input: nothing but the checker's types, diagnostics and the syntax tree.
//! Output: the [`Context`] trait (report an error, append an operation to
//! the forward trace), evaluated call arguments ([`ArgVal`]), [`number`],
//! and the verb of a binary operator (`BinOp::verb`) for messages.
//!
//! Invariants: a leaf of `check`: it imports no other checking module but
//! `types`, so the imports run one way, `model` → `ops` → `context`. The
//! model checker's context (`model::Cx`) is its one implementation.

use super::types::{Prim, TId, Ty, Val};
use crate::diag::{Diagnostic, Span};
use crate::syntax::ast::{self, BinOp};

/// Where checking an expression reports its errors and records the
/// operations it evaluates.
pub(super) trait Context {
    /// Reports an error, labelled with the calls it was found inside.
    fn err(&mut self, d: Diagnostic);

    /// Appends `prim(args) : ty` to the trace; returns the tensor it makes.
    fn emit(&mut self, prim: Prim, args: Vec<TId>, ty: Ty) -> Val;
}

/// An evaluated argument.
pub(super) struct ArgVal {
    pub name: Option<ast::Ident>,
    pub val: Val,
    pub span: Span,
}

/// The value of a number (an integer or a float), else None.
pub(super) fn number(v: &Val) -> Option<f64> {
    match v {
        Val::Int(i, _) => Some(*i as f64),
        Val::Float(f) => Some(*f),
        _ => None,
    }
}

impl BinOp {
    pub(super) fn verb(self) -> &'static str {
        match self {
            BinOp::Add => "add",
            BinOp::Sub => "subtract",
            BinOp::Mul => "multiply",
            BinOp::Div => "divide",
            BinOp::MatMul => "matrix-multiply",
        }
    }
}
