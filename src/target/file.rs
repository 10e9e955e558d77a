//! `file:///dir` binary caches (skeleton; being completed).

use std::collections::HashSet;
use std::path::PathBuf;

use async_trait::async_trait;

use super::{NarFormat, PreparedNar, Target, TargetError};
use crate::format::narinfo::NarInfo;
use crate::format::store_path::StorePath;
use crate::store::PathInfo;

pub struct FileTarget {
    dir: PathBuf,
    compression_level: i32,
}

impl FileTarget {
    pub fn new(dir: PathBuf, compression_level: i32) -> FileTarget {
        FileTarget {
            dir,
            compression_level,
        }
    }
}

#[async_trait]
impl Target for FileTarget {
    fn url(&self) -> String {
        format!("file://{}", self.dir.display())
    }
    fn nar_format(&self) -> NarFormat {
        NarFormat::Zstd {
            level: self.compression_level,
        }
    }
    fn spool_dir(&self) -> Option<PathBuf> {
        Some(self.dir.join(".narpost-tmp"))
    }
    async fn open(&self) -> Result<(), TargetError> {
        Err(TargetError::permanent("file target: not implemented yet"))
    }
    async fn missing(&self, _paths: &[PathInfo]) -> Result<HashSet<StorePath>, TargetError> {
        Err(TargetError::permanent("file target: not implemented yet"))
    }
    async fn put_nar(&self, _nar: &PreparedNar) -> Result<String, TargetError> {
        Err(TargetError::permanent("file target: not implemented yet"))
    }
    async fn put_narinfo(&self, _narinfo: &NarInfo, _nar: &PreparedNar) -> Result<(), TargetError> {
        Err(TargetError::permanent("file target: not implemented yet"))
    }
}
