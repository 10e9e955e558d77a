//! Nix's formats, pure: no filesystem, network or async. Everything here is checked
//! byte-for-byte against what Nix 2.8 produces (fixtures in `tests/fixtures/`).

pub mod cache_info;
pub mod claim;
pub mod drv;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod serve;
pub mod signing;
pub mod store_path;
