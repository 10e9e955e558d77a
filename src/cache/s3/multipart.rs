//! Multipart upload of a large NAR: parts read one at a time from the spooled file, then
//! completed, or aborted on any failure (see [Layout and uploads](super#layout-and-uploads)).

use std::path::Path as FsPath;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{MultipartUpload, ObjectStore, PutMultipartOptions, PutPayload};
use tokio::io::AsyncReadExt;

use super::client::content_type_attr;
use super::{NAR_TYPE, S3Target};
use crate::cache::TargetError;

/// NARs larger than this are uploaded in parts.
pub const MULTIPART_THRESHOLD: u64 = 16 * 1024 * 1024;
/// The usual part size; larger NARs get larger parts to stay under S3's part limit.
const PART_SIZE: u64 = 8 * 1024 * 1024;
/// S3 allows 10,000 parts; staying well below leaves room for rounding.
const MAX_PARTS: u64 = 9_000;
/// Parts uploaded at once for one NAR; the pipeline already runs several NARs in parallel.
const PARTS_IN_FLIGHT: usize = 2;

impl S3Target {
    pub(super) async fn put_multipart(
        &self,
        key: &ObjectPath,
        file: &FsPath,
        size: u64,
    ) -> Result<(), TargetError> {
        let action = format!("uploading {key}");
        let options = PutMultipartOptions {
            attributes: content_type_attr(NAR_TYPE),
            ..PutMultipartOptions::default()
        };
        let mut upload = self
            .data
            .put_multipart_opts(key, options)
            .await
            .map_err(|e| self.error(&e, &format!("starting the upload of {key}")))?;
        let sent = self.send_parts(upload.as_mut(), file, size, &action).await;
        let result = match sent {
            Ok(()) => upload
                .complete()
                .await
                .map(|_| ())
                .map_err(|e| self.error(&e, &format!("completing the upload of {key}"))),
            Err(e) => Err(e),
        };
        if result.is_err() {
            // Until it is completed, a multipart upload is invisible under its key; aborting
            // frees the stored parts. If the server is gone, it discards them by its own
            // lifecycle rules, and the key still never shows a partial object.
            if let Err(abort) = upload.abort().await {
                tracing::warn!(
                    "{}: could not abort the failed upload of {key}: {}",
                    self.display(),
                    self.error(&abort, "aborting").message
                );
            }
        }
        result
    }

    async fn send_parts(
        &self,
        upload: &mut dyn MultipartUpload,
        file: &FsPath,
        size: u64,
        action: &str,
    ) -> Result<(), TargetError> {
        let local = |e: std::io::Error| {
            TargetError::permanent(format!(
                "{}: cannot read the spooled NAR: {e}",
                file.display()
            ))
        };
        let part_size = part_size_for(size);
        let mut reader = tokio::fs::File::open(file).await.map_err(local)?;
        let mut in_flight: FuturesUnordered<object_store::UploadPart> = FuturesUnordered::new();
        let mut sent = 0u64;
        while sent < size {
            let len = part_size.min(size - sent);
            let mut buf = vec![0u8; len as usize];
            reader.read_exact(&mut buf).await.map_err(local)?;
            sent += len;
            while in_flight.len() >= PARTS_IN_FLIGHT {
                if let Some(done) = in_flight.next().await {
                    done.map_err(|e| self.error(&e, action))?;
                }
            }
            in_flight.push(upload.put_part(PutPayload::from(Bytes::from(buf))));
        }
        while let Some(done) = in_flight.next().await {
            done.map_err(|e| self.error(&e, action))?;
        }
        // The spool file must be exactly what was hashed; more bytes mean it changed under us.
        let mut probe = [0u8; 1];
        if reader.read(&mut probe).await.map_err(local)? != 0 {
            return Err(TargetError::permanent(format!(
                "{}: spooled NAR is longer than its recorded size {size}",
                file.display()
            )));
        }
        Ok(())
    }
}

fn part_size_for(size: u64) -> u64 {
    PART_SIZE.max(size.div_ceil(MAX_PARTS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_stay_under_the_part_limit() {
        assert_eq!(part_size_for(100 * 1024 * 1024), PART_SIZE);
        let huge = 200 * 1024 * 1024 * 1024u64;
        assert!(huge.div_ceil(part_size_for(huge)) <= MAX_PARTS);
    }
}
