//! The XDP firewall, userspace side.
//!
//! - [`rules`]: the rule file (TOML) → a validated [`rules::RuleSet`], errors with file:line.
//! - [`compile`]: a rule set → the tables of one slot ([`compile::CompiledSlot`]).
//! - [`reference`]: the plain-Rust classifier that *is* the spec; tests compare the kernel to it.
//! - [`tables`]: writes a compiled slot into the pinned maps and flips the active slot.
//! - [`state`]: what `rampart` remembers about an attached interface (rules, ids, counters).
//! - [`view`]: a read-only, lock-free view of an interface's counters, for scrapers.
pub mod compile;
pub mod reference;
pub mod rules;
pub mod state;
pub mod tables;
pub mod view;
