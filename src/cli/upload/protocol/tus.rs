//! tus 1.0.0 (https://tus.io/protocols/resumable-upload): `Tus-Resumable` on every request,
//! `Upload-Length` and `Upload-Metadata` on the creation, `application/offset+octet-stream`
//! appends with `Upload-Checksum` when the server lists sha256.

use base64::{Engine, engine::general_purpose::STANDARD};
use reqwest::{RequestBuilder, StatusCode, header::HeaderMap};

use super::{Appended, Chunk, Created, Creation, Head, Kind, Offer, Protocol, location, repr_sha256};

pub(crate) struct Tus;

/// A decimal header (tus writes its numbers as plain digits).
fn number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

impl Protocol for Tus {
    fn kind(&self) -> Kind {
        Kind::Tus
    }

    fn speak(&self, request: RequestBuilder) -> RequestBuilder {
        request.header("tus-resumable", "1.0.0")
    }

    fn checksums(&self, offer: &Offer) -> bool {
        offer.sha256
    }

    fn max_size(&self, offer: &Offer) -> Option<(u64, &'static str)> {
        offer.tus_max_size.map(|n| (n, "Tus-Max-Size"))
    }

    fn creates_with_content(&self) -> bool {
        false
    }

    fn create(&self, request: RequestBuilder, creation: &Creation) -> RequestBuilder {
        let mut request = self.speak(request).header("upload-length", creation.size);
        if !creation.metadata.is_empty() {
            request = request.header("upload-metadata", creation.metadata.to_header());
        }
        request
    }

    fn created(&self, status: StatusCode, headers: &HeaderMap, _: &Creation) -> Option<Created> {
        (status == StatusCode::CREATED).then(|| Created { location: location(headers), offset: 0 })
    }

    fn read_offset(&self, headers: &HeaderMap) -> Result<Head, String> {
        let offset = number(headers, "upload-offset").ok_or("HEAD answered without a valid Upload-Offset")?;
        Ok(Head { offset, length: number(headers, "upload-length"), sha256: repr_sha256(headers), complete: None })
    }

    fn append(&self, request: RequestBuilder, chunk: &Chunk) -> RequestBuilder {
        let mut request = self
            .speak(request)
            .header("upload-offset", chunk.offset)
            .header(reqwest::header::CONTENT_TYPE, "application/offset+octet-stream");
        if let Some(sum) = &chunk.sha256 {
            request = request.header("upload-checksum", format!("sha256 {}", STANDARD.encode(sum)));
        }
        request
    }

    fn appended(&self, headers: &HeaderMap, _: &Chunk) -> Option<Appended> {
        Some(Appended { offset: number(headers, "upload-offset")?, complete: None })
    }

    /// tus's 409 is followed by a HEAD: the protocol does not promise the offset in it.
    fn conflict(&self, _: &HeaderMap, _: &str) -> Option<Appended> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::headers;
    use super::*;

    #[test]
    fn answers() {
        let metadata = crate::uploads::types::Metadata::default();
        let creation = Creation { size: 5, metadata: &metadata, whole: None };
        let created = headers(&[("location", "/files/abc"), ("upload-offset", "0")]);
        assert_eq!(
            Tus.created(StatusCode::CREATED, &created, &creation),
            Some(Created { location: Some("/files/abc".into()), offset: 0 })
        );
        assert_eq!(Tus.created(StatusCode::OK, &created, &creation), None, "tus creates with 201");

        let head = Tus.read_offset(&headers(&[("upload-offset", "3"), ("upload-length", "5")])).unwrap();
        assert_eq!((head.offset, head.length, head.complete), (3, Some(5), None));
        assert!(Tus.read_offset(&headers(&[("upload-length", "5")])).is_err());

        let chunk = Chunk { offset: 0, length: 3, last: false, sha256: None };
        assert_eq!(Tus.appended(&headers(&[("upload-offset", "3")]), &chunk).map(|a| a.offset), Some(3));
        assert_eq!(Tus.appended(&HeaderMap::new(), &chunk), None, "a tus append answer names the offset");
    }
}
