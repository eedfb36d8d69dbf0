//! Azurite, the Azure Blob Storage emulator (npm package `azurite`, installed in tests/azurite by
//! tests/run): its well-known account, how ferry and object_store are pointed at it, and the few
//! REST calls object_store does not make (containers, uncommitted blocks), signed with the
//! account key. Shared by the API tests and the benchmark (benches/upload.rs).

use object_store::azure::{AzureAccessKey, AzureAuthorizer, AzureCredential, MicrosoftAzure, MicrosoftAzureBuilder};

/// Azurite's one account, and its published key.
pub const ACCOUNT: &str = "devstoreaccount1";
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// object_store settings for the Azurite at `endpoint` (`http://HOST:PORT`), as ferry takes them
/// with `--store-option KEY=VALUE`. The account is part of the path of Azurite's URLs, so the
/// endpoint is the account's URL.
pub fn store_options(endpoint: &str) -> Vec<(String, String)> {
    [
        ("azure_storage_account_name", ACCOUNT.to_string()),
        ("azure_storage_account_key", ACCOUNT_KEY.to_string()),
        ("azure_storage_endpoint", format!("{endpoint}/{ACCOUNT}")),
        ("azure_allow_http", "true".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// An object_store client of one container.
pub fn container_store(endpoint: &str, container: &str) -> MicrosoftAzure {
    let mut builder = MicrosoftAzureBuilder::new().with_container_name(container);
    for (key, value) in store_options(endpoint) {
        builder = builder.with_config(key.parse().expect("an Azure setting"), value);
    }
    builder.build().expect("Azure client for Azurite")
}

/// Sends a request signed with the account key (Shared Key) to `path_and_query` under the
/// account's URL (say `/<container>?restype=container`).
pub async fn send(
    http: &reqwest::Client,
    endpoint: &str,
    method: reqwest::Method,
    path_and_query: &str,
) -> reqwest::Result<reqwest::Response> {
    let url = format!("{endpoint}/{ACCOUNT}{path_and_query}");
    let mut request = object_store::client::HttpRequest::new(Vec::<u8>::new().into());
    *request.method_mut() = method.clone();
    *request.uri_mut() = url.parse().expect("a request URI");
    let key = AzureCredential::AccessKey(AzureAccessKey::try_new(ACCOUNT_KEY).expect("the account key"));
    AzureAuthorizer::new(&key, ACCOUNT).try_authorize(&mut request).expect("signing a request");
    let mut builder = http.request(method, url);
    for (name, value) in request.headers() {
        builder = builder.header(name, value);
    }
    builder.send().await
}

/// Creates a container; fails when Azurite does not answer or refuses.
pub async fn create_container(http: &reqwest::Client, endpoint: &str, name: &str) {
    let response = send(http, endpoint, reqwest::Method::PUT, &format!("/{name}?restype=container"))
        .await
        .unwrap_or_else(|e| panic!("Azurite at {endpoint} does not answer: {e}"));
    let status = response.status();
    assert!(status.is_success(), "creating container {name}: {status}: {}", response.text().await.unwrap_or_default());
}
