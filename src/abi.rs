//! The `/dev/kqemu` interface (ABI.md). Filled in by the foundation work.
