//! x86-64 specifics: CPUID, the MP table, boot-time registers.

pub mod cpuid;
pub mod mptable;
pub mod regs;
