//! The shardplan runtime: what runs a compiled plan.
//!
//! Data loading and checkpoints live here; backends, transport, collectives
//! and the executor join them as the compiler grows the stages that feed them.

pub mod backend;
pub mod checkpoint;
pub mod data;
pub mod exec;
