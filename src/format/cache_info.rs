//! `nix-cache-info`, the file at the root of every binary cache: which store it is for,
//! and optionally whether Nix may ask it about many paths at once and where it ranks.
//!
//! ```text
//! StoreDir: /nix/store
//! WantMassQuery: 1
//! Priority: 40
//! ```
//!
//! narpost writes what Nix 2.8 writes for a new cache, `StoreDir: /nix/store\n` and nothing
//! else, into every kind of cache alike; it reads any file Nix would.

use super::store_path::STORE_DIR;

/// What a `nix-cache-info` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    pub store_dir: String,
    pub want_mass_query: Option<bool>,
    pub priority: Option<u64>,
}

impl CacheInfo {
    /// The file narpost writes into a cache that has none.
    pub fn ours() -> String {
        format!("StoreDir: {STORE_DIR}\n")
    }

    /// Reads a `nix-cache-info`; fields Nix does not know are ignored, as Nix ignores them.
    pub fn parse(text: &str) -> Result<CacheInfo, String> {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let store_dir = field("StoreDir")
            .ok_or_else(|| "not a binary cache info file (no StoreDir line)".to_string())?;
        Ok(CacheInfo {
            store_dir: store_dir.to_owned(),
            want_mass_query: field("WantMassQuery").map(|v| v == "1"),
            priority: field("Priority").and_then(|v| v.parse().ok()),
        })
    }

    /// Parses `text` and checks that it is a cache for this store; otherwise says what is
    /// wrong with it.
    pub fn check(text: &str) -> Result<CacheInfo, String> {
        let info = CacheInfo::parse(text)?;
        if info.store_dir != STORE_DIR {
            return Err(format!(
                "the cache is for store {}, not {STORE_DIR}",
                info.store_dir
            ));
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_nix_writes_and_refuses_other_stores() {
        assert_eq!(CacheInfo::ours(), "StoreDir: /nix/store\n");
        let info = CacheInfo::check(&CacheInfo::ours()).unwrap();
        assert_eq!((info.want_mass_query, info.priority), (None, None));
        let cachix = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n";
        let info = CacheInfo::check(cachix).unwrap();
        assert_eq!(
            (info.want_mass_query, info.priority),
            (Some(true), Some(41))
        );
        assert!(
            CacheInfo::check("StoreDir: /gnu/store\n")
                .unwrap_err()
                .contains("/gnu/store")
        );
        assert!(
            CacheInfo::check("<html>Login</html>")
                .unwrap_err()
                .contains("no StoreDir")
        );
        // A field name only counts whole.
        assert!(CacheInfo::parse("StoreDirectory: /nix/store\n").is_err());
    }
}
