//! `http://` and `https://` binary caches written with PUT (skeleton; being completed).

use std::collections::HashSet;

use async_trait::async_trait;

use super::{NarFormat, PreparedNar, Target, TargetError};
use crate::format::narinfo::NarInfo;
use crate::format::store_path::StorePath;
use crate::store::PathInfo;

pub enum HttpAuth {
    None,
    Bearer(String),
    Basic { user: String, password: String },
}

pub struct HttpTarget {
    base: String,
    #[allow(dead_code)]
    auth: HttpAuth,
    compression_level: i32,
}

impl HttpTarget {
    pub fn new(base: String, auth: HttpAuth, compression_level: i32) -> Result<Self, TargetError> {
        Ok(HttpTarget {
            base,
            auth,
            compression_level,
        })
    }
}

#[async_trait]
impl Target for HttpTarget {
    fn url(&self) -> String {
        self.base.clone()
    }
    fn nar_format(&self) -> NarFormat {
        NarFormat::Zstd {
            level: self.compression_level,
        }
    }
    async fn open(&self) -> Result<(), TargetError> {
        Err(TargetError::permanent("http target: not implemented yet"))
    }
    async fn missing(&self, _paths: &[PathInfo]) -> Result<HashSet<StorePath>, TargetError> {
        Err(TargetError::permanent("http target: not implemented yet"))
    }
    async fn put_nar(&self, _nar: &PreparedNar) -> Result<String, TargetError> {
        Err(TargetError::permanent("http target: not implemented yet"))
    }
    async fn put_narinfo(&self, _narinfo: &NarInfo, _nar: &PreparedNar) -> Result<(), TargetError> {
        Err(TargetError::permanent("http target: not implemented yet"))
    }
}
