//! The Attic target (skeleton; being written).

/// A cache on an Attic server.
pub struct AtticTarget {}
