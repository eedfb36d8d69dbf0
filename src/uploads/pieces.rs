//! Reading a final (concatenated) upload from its pieces: the partial uploads' objects, one
//! after the other. A range is cut into the sub-ranges of the pieces it crosses; each piece is
//! opened only when the stream reaches it, so a download holds one piece's reader at a time.

use std::{ops::Range, sync::Arc};

use futures_util::{StreamExt, TryStreamExt};

use crate::model::parts::Piece;
use crate::store::{ByteStream, Download, Result, Store};

/// The bytes of `range` (or all of them) of the upload made of `pieces`, in order.
pub async fn read(store: Arc<dyn Store>, pieces: Vec<Piece>, range: Option<Range<u64>>) -> Result<Download> {
    let size = pieces.last().map_or(0, Piece::end);
    let range = range.unwrap_or(0..size);
    let mut spans: Vec<(Piece, Range<u64>)> = pieces
        .into_iter()
        .filter(|piece| piece.size > 0 && piece.start < range.end && piece.end() > range.start)
        .map(|piece| {
            let from = range.start.max(piece.start) - piece.start;
            let to = range.end.min(piece.end()) - piece.start;
            (piece, from..to)
        })
        .collect();
    if spans.is_empty() {
        return Ok(Download { size, stream: futures_util::stream::empty().boxed() });
    }
    // The first piece is opened now, so that a missing object is an error before the answer
    // starts; the others when the stream gets to them.
    let (first, first_range) = spans.remove(0);
    let head = open(store.as_ref(), &first, first_range).await?;
    let rest = futures_util::stream::iter(spans)
        .then(move |(piece, range)| {
            let store = store.clone();
            async move { open(store.as_ref(), &piece, range).await }
        })
        .try_flatten();
    Ok(Download { size, stream: head.chain(rest).boxed() })
}

/// One piece's bytes in `range` (relative to the piece); a piece whose object is shorter or
/// longer than recorded is an error, never silently different bytes.
async fn open(store: &dyn Store, piece: &Piece, range: Range<u64>) -> Result<ByteStream> {
    let download = store.read(piece.upload, &piece.store(), Some(range)).await?;
    if download.size != piece.size {
        return Err(crate::store::StoreError::Other(format!(
            "partial upload {} has {} bytes in the store, {} were recorded",
            piece.upload, download.size, piece.size
        )));
    }
    Ok(download.stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::types::UploadId;
    use crate::store::LocalStore;

    async fn piece_of(store: &LocalStore, dir: &std::path::Path, data: &[u8], start: u64) -> Piece {
        let id = UploadId::new();
        let upload = store.create(id, None, data.len() as u64, false).await.unwrap();
        let path = dir.join(upload.object_path(id).to_string());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
        Piece { upload: id, start, size: data.len() as u64, key_prefix: None }
    }

    #[tokio::test]
    async fn ranges_cross_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalStore::new(dir.path()).unwrap();
        let parts: [&[u8]; 4] = [b"hello ", b"", b"wide ", b"world"];
        let mut pieces = Vec::new();
        let mut start = 0;
        for data in parts {
            pieces.push(piece_of(&local, dir.path(), data, start).await);
            start += data.len() as u64;
        }
        let store: Arc<dyn Store> = Arc::new(local);
        let whole = b"hello wide world";
        for range in [None, Some(0..16), Some(3..9), Some(6..11), Some(5..6), Some(11..16), Some(15..16)] {
            let download = read(store.clone(), pieces.clone(), range.clone()).await.unwrap();
            assert_eq!(download.size, 16);
            let bytes: Vec<u8> = download.stream.map_ok(|b| b.to_vec()).try_concat().await.unwrap();
            let expected = &whole[range.clone().map_or(0..16, |r| r.start as usize..r.end as usize)];
            assert_eq!(bytes, expected, "{range:?}");
        }

        // A piece whose object lost bytes is an error, not a shorter file.
        let broken = dir.path().join(pieces[3].store().object_path(pieces[3].upload).to_string());
        std::fs::write(&broken, b"worl").unwrap();
        let download = read(store.clone(), pieces.clone(), None).await.unwrap();
        let result: Result<Vec<bytes::Bytes>> = download.stream.try_collect().await;
        assert!(result.is_err(), "a short piece is reported");
    }
}
