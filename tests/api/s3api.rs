//! The S3 API of the tests and the benchmark (Garage, started by tests/run through tests/garage):
//! where it is, the key to sign with, and the few calls object_store does not make (CreateBucket,
//! DeleteBucket, ListMultipartUploads, ListParts), signed with AWS Signature Version 4. Shared by
//! the API tests and the benchmark (benches/upload.rs).

use reqwest::Method;

/// Where the S3 tests find their S3 API: `http://127.0.0.1:PORT`.
pub const S3_ENDPOINT_VAR: &str = "FERRY_TEST_S3_ENDPOINT";
/// The access key id the S3 tests sign with; it must be allowed to create buckets.
pub const S3_KEY_ID_VAR: &str = "FERRY_TEST_S3_KEY_ID";
/// The secret of that key.
pub const S3_SECRET_VAR: &str = "FERRY_TEST_S3_SECRET";
/// The region the S3 API expects in signatures (Garage's `s3_region`).
pub const S3_REGION_VAR: &str = "FERRY_TEST_S3_REGION";
/// The key prefix ferry is given in the tests: `--store s3://<bucket>/ferry`.
pub const S3_PREFIX: &str = "ferry";

/// How to start an S3 API by hand, for the panics below.
pub const S3_HOW: &str = "run tests/run, which starts Garage and sets the FERRY_TEST_S3_* variables (or run \
                      `tests/garage start DIR` yourself, then `set -a; . DIR/env; set +a`, and `tests/garage \
                      stop DIR` afterwards)";

/// A required setting of the S3 tests. They fail (never skip) without it.
pub fn s3_setting(var: &str) -> String {
    match std::env::var(var) {
        Ok(value) if !value.trim().is_empty() => value.trim().to_string(),
        _ => panic!("{var} is not set, and the S3 tests need an S3 API and a key: {S3_HOW}"),
    }
}

/// The S3 endpoint the tests use.
pub fn s3_endpoint() -> String {
    s3_setting(S3_ENDPOINT_VAR).trim_end_matches('/').to_string()
}

/// The S3 API and the key the tests sign with.
#[derive(Debug, Clone)]
pub struct S3Credentials {
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
    pub region: String,
}

impl S3Credentials {
    /// The settings, when all of them are there (the benchmark runs without an S3 API too).
    #[allow(dead_code)]
    pub fn try_from_env() -> Option<Self> {
        let get = |var: &str| std::env::var(var).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        Some(Self {
            endpoint: get(S3_ENDPOINT_VAR)?.trim_end_matches('/').to_string(),
            key_id: get(S3_KEY_ID_VAR)?,
            secret: get(S3_SECRET_VAR)?,
            region: get(S3_REGION_VAR)?,
        })
    }

    pub fn from_env() -> Self {
        Self {
            endpoint: s3_endpoint(),
            key_id: s3_setting(S3_KEY_ID_VAR),
            secret: s3_setting(S3_SECRET_VAR),
            region: s3_setting(S3_REGION_VAR),
        }
    }
}

/// Signs S3 requests with AWS Signature Version 4 (for the calls object_store does not make:
/// CreateBucket, DeleteBucket, ListMultipartUploads, ListParts). The payload is hashed into
/// `x-amz-content-sha256`, which Garage requires.
pub mod sigv4 {
    use hmac::{KeyInit, Mac};
    use sha2::{Digest, Sha256};

    /// Characters S3 leaves as they are in a canonical URI or query; everything else is
    /// percent-encoded (RFC 3986's unreserved set).
    fn encode(text: &str, keep_slash: bool) -> String {
        let mut out = String::with_capacity(text.len());
        for byte in text.bytes() {
            match byte {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(byte as char),
                b'/' if keep_slash => out.push('/'),
                _ => out.push_str(&format!("%{byte:02X}")),
            }
        }
        out
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn hmac(key: &[u8], data: &str) -> Vec<u8> {
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any size");
        mac.update(data.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// A signed request: the URL to send it to (with the query in canonical order) and the
    /// headers to add.
    pub struct Signed {
        pub url: String,
        pub headers: Vec<(&'static str, String)>,
    }

    /// Signs `method` on `endpoint` + `path` (not yet encoded; starting with `/`) with `query`
    /// (not yet encoded) and `body`, at `now`.
    pub fn sign(
        credentials: &super::S3Credentials,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        body: &[u8],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Signed {
        let endpoint = url::Url::parse(&credentials.endpoint).expect("the S3 endpoint is a URL");
        let host = match endpoint.port() {
            Some(port) => format!("{}:{port}", endpoint.host_str().expect("the S3 endpoint has a host")),
            None => endpoint.host_str().expect("the S3 endpoint has a host").to_string(),
        };
        let uri = encode(path, true);
        let mut pairs: Vec<(String, String)> =
            query.iter().map(|(k, v)| (encode(k, false), encode(v, false))).collect();
        pairs.sort();
        let canonical_query = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
        let payload = hex(&Sha256::digest(body));
        let stamp = now.format("%Y%m%dT%H%M%SZ").to_string();
        let day = now.format("%Y%m%d").to_string();

        let signed_headers = "host;x-amz-content-sha256;x-amz-date";
        let canonical_request = format!(
            "{method}\n{uri}\n{canonical_query}\nhost:{host}\nx-amz-content-sha256:{payload}\nx-amz-date:{stamp}\n\n\
             {signed_headers}\n{payload}"
        );
        let scope = format!("{day}/{}/s3/aws4_request", credentials.region);
        let string_to_sign =
            format!("AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}", hex(&Sha256::digest(canonical_request.as_bytes())));
        let mut key = hmac(format!("AWS4{}", credentials.secret).as_bytes(), &day);
        for part in [credentials.region.as_str(), "s3", "aws4_request"] {
            key = hmac(&key, part);
        }
        let signature = hex(&hmac(&key, &string_to_sign));
        let authorization = format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            credentials.key_id
        );

        let base = credentials.endpoint.trim_end_matches('/');
        let url =
            if canonical_query.is_empty() { format!("{base}{uri}") } else { format!("{base}{uri}?{canonical_query}") };
        Signed {
            url,
            headers: vec![("x-amz-date", stamp), ("x-amz-content-sha256", payload), ("authorization", authorization)],
        }
    }

    #[cfg(test)]
    mod tests {
        /// The "GET Bucket Lifecycle" example of AWS's documentation of Signature Version 4 for
        /// S3 (authenticating requests in the Authorization header), which signs exactly the
        /// headers this signer does, with its published signature.
        #[test]
        fn signs_the_example_of_aws_documentation() {
            let credentials = crate::helpers::S3Credentials {
                endpoint: "https://examplebucket.s3.amazonaws.com".into(),
                key_id: "AKIAIOSFODNN7EXAMPLE".into(),
                secret: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
                region: "us-east-1".into(),
            };
            let now = chrono::DateTime::parse_from_rfc3339("2013-05-24T00:00:00Z").unwrap().to_utc();
            let signed = super::sign(&credentials, "GET", "/", &[("lifecycle", "")], b"", now);
            assert_eq!(signed.url, "https://examplebucket.s3.amazonaws.com/?lifecycle=");
            let authorization = &signed.headers.iter().find(|(name, _)| *name == "authorization").unwrap().1;
            assert_eq!(
                authorization,
                "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
                 SignedHeaders=host;x-amz-content-sha256;x-amz-date, \
                 Signature=fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"
            );
        }
    }
}

/// Sends one signed request to the S3 API: its status and body.
pub async fn s3_call(
    http: &reqwest::Client,
    credentials: &S3Credentials,
    method: Method,
    path: &str,
    query: &[(&str, &str)],
) -> Result<(reqwest::StatusCode, String), reqwest::Error> {
    let signed = sigv4::sign(credentials, method.as_str(), path, query, b"", chrono::Utc::now());
    let mut request = http.request(method, &signed.url);
    for (name, value) in signed.headers {
        request = request.header(name, value);
    }
    let response = request.send().await?;
    let status = response.status();
    Ok((status, response.text().await?))
}
