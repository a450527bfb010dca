//! The shardplan compiler, read top to bottom as its pipeline:
//! `parse → check → (graph → differentiate → partition → schedule → plan)`.
//!
//! Each stage is one module with one public entry point taking the previous
//! stage's product. The compiler does no IO: sources come in as text,
//! diagnostics go out as values, and the CLI renders them.

pub mod diag;
pub mod syntax;

pub use diag::{Diagnostic, Diagnostics, Severity, SourceId, Span};
