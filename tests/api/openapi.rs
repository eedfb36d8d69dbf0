//! `openapi/openapi.yaml` against the running server. A scenario of real requests walks every
//! documented operation through its success and error paths, in tus and in the IETF draft;
//! each exchange must be documented (path, method, status, the protocol's request and response
//! headers, media type, the problem body's members), and every documented operation must have
//! been exercised (those tagged `ietf` in the draft's terms too), so the document can neither
//! miss nor invent behaviour. Headers and parameters marked `x-protocol` belong to one protocol:
//! they must not show up in the other's exchanges, and `required` holds in their own.

use std::collections::{BTreeMap, BTreeSet};

use base64::{Engine, engine::general_purpose::STANDARD};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;
use sha1::{Digest, Sha1};

use crate::helpers::{Backend, TestApp, header, sha256_b64};

const DOCUMENT: &str = include_str!("../../openapi/openapi.yaml");

const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// Statuses the scenario must have seen, so that it cannot silently stop covering error paths.
const REQUIRED_STATUSES: &[u16] = &[200, 201, 204, 206, 304, 400, 403, 404, 409, 410, 412, 413, 415, 416, 460];
/// The same for the IETF draft's requests.
const REQUIRED_IETF_STATUSES: &[u16] = &[200, 201, 204, 400, 404, 409, 410, 413, 415];

/// Response headers that belong to the API contract and must be documented when sent.
fn contract_response_header(name: &str) -> bool {
    name.starts_with("tus-")
        || name.starts_with("upload-")
        || matches!(
            name,
            "location" | "repr-digest" | "etag" | "content-range" | "content-disposition" | "cache-control"
        )
}

/// Request headers that are API parameters and must be documented when the scenario sends them.
fn contract_request_header(name: &str) -> bool {
    name.starts_with("tus-")
        || name.starts_with("upload-")
        || matches!(
            name,
            "x-http-method-override"
                | "range"
                | "if-range"
                | "if-none-match"
                | "trailer"
                | "content-digest"
                | "content-disposition"
        )
}

/// The protocol of a request, by the server's rule: without `Tus-Resumable`, the IETF draft's
/// fields make it the draft's; anything else is tus.
fn protocol_of(method: &str, headers: &reqwest::header::HeaderMap) -> &'static str {
    let partial = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/partial-upload"));
    let draft = headers.contains_key("upload-complete")
        || headers.contains_key("upload-draft-interop-version")
        || (method == "patch" && partial);
    if !headers.contains_key("tus-resumable") && draft { "ietf" } else { "tus" }
}

/// The protocol a header or parameter is marked for, if one.
fn marked(object: &Value) -> Option<&str> {
    object.get("x-protocol").and_then(Value::as_str)
}

/// The parsed document, with `$ref` resolution.
struct Spec {
    doc: Value,
}

impl Spec {
    fn load() -> Self {
        let doc: Value = serde_norway::from_str(DOCUMENT).expect("openapi/openapi.yaml is valid YAML");
        Self { doc }
    }

    /// Follows `$ref`s (local JSON pointers only) until a concrete object.
    fn resolve<'a>(&'a self, mut value: &'a Value) -> &'a Value {
        for _ in 0..16 {
            let Some(reference) = value.get("$ref").and_then(Value::as_str) else {
                return value;
            };
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("only local references are used, got {reference}"));
            value = self.doc.pointer(pointer).unwrap_or_else(|| panic!("{reference} does not resolve"));
        }
        panic!("reference cycle")
    }

    fn paths(&self) -> &serde_json::Map<String, Value> {
        self.doc["paths"].as_object().expect("paths is a map")
    }

    /// Every `(path template, method)` the document describes.
    fn operations(&self) -> BTreeSet<(String, String)> {
        let mut operations = BTreeSet::new();
        for (template, item) in self.paths() {
            let item = self.resolve(item);
            for method in METHODS {
                if item.get(*method).is_some() {
                    operations.insert((template.clone(), method.to_string()));
                }
            }
        }
        operations
    }

    /// The operations tagged `ietf`, which the draft's requests must exercise too.
    fn ietf_operations(&self) -> BTreeSet<(String, String)> {
        self.operations()
            .into_iter()
            .filter(|(template, method)| {
                let tags = self.operation(template, method).and_then(|o| o.get("tags")).and_then(Value::as_array);
                tags.is_some_and(|tags| tags.iter().any(|t| t == "ietf"))
            })
            .collect()
    }

    /// The documented path template a concrete path falls under (literal paths win).
    fn template_for(&self, path: &str) -> Option<String> {
        let segments: Vec<&str> = path.split('/').collect();
        let mut best: Option<(usize, &String)> = None;
        for template in self.paths().keys() {
            let parts: Vec<&str> = template.split('/').collect();
            if parts.len() != segments.len() {
                continue;
            }
            let mut params = 0;
            let fits = parts.iter().zip(&segments).all(|(part, segment)| {
                if part.starts_with('{') && part.ends_with('}') {
                    params += 1;
                    !segment.is_empty()
                } else {
                    part == segment
                }
            });
            if fits && best.is_none_or(|(p, _)| params < p) {
                best = Some((params, template));
            }
        }
        best.map(|(_, template)| template.clone())
    }

    fn operation(&self, template: &str, method: &str) -> Option<&Value> {
        self.resolve(self.paths().get(template)?).get(method)
    }

    /// Path-level and operation-level parameters, resolved.
    fn parameters(&self, template: &str, method: &str) -> Vec<&Value> {
        let item = self.resolve(&self.paths()[template]);
        let shared = item.get("parameters").and_then(Value::as_array).into_iter().flatten();
        let own = item[method].get("parameters").and_then(Value::as_array).into_iter().flatten();
        shared.chain(own).map(|p| self.resolve(p)).collect()
    }

    fn response(&self, template: &str, method: &str, status: u16) -> Option<&Value> {
        let responses = self.operation(template, method)?.get("responses")?;
        let exact = responses.get(status.to_string());
        let range = responses.get(format!("{}XX", status / 100));
        exact.or(range).map(|r| self.resolve(r))
    }

    /// A response's documented headers, by lower-case name, resolved.
    fn response_headers<'a>(&'a self, response: &'a Value) -> BTreeMap<String, &'a Value> {
        response
            .get("headers")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .map(|(name, header)| (name.to_ascii_lowercase(), self.resolve(header)))
            .collect()
    }

    /// Checks a JSON object against the simple schema features the document uses (required
    /// members, the types of the members described); the failures, one sentence each.
    fn check_object(&self, schema: &Value, value: &Value) -> Vec<String> {
        let Some(object) = value.as_object() else { return vec![format!("{value} is not an object")] };
        let mut failures = Vec::new();
        for name in schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
            if !object.contains_key(name) {
                failures.push(format!("the required member {name} is missing"));
            }
        }
        for (name, member) in object {
            let Some(described) = schema.get("properties").and_then(|p| p.get(name)) else { continue };
            let fits = match self.resolve(described).get("type").and_then(Value::as_str) {
                Some("string") => member.is_string(),
                Some("integer") => member.is_i64() || member.is_u64(),
                _ => true,
            };
            if !fits {
                failures.push(format!("the member {name} is {member}, not of the documented type"));
            }
        }
        failures
    }

    /// Checks a header value against the simple schema features the document uses.
    fn check_value(&self, schema: &Value, value: &str) -> Result<(), String> {
        let schema = self.resolve(schema);
        if let Some(expected) = schema.get("const").and_then(Value::as_str)
            && value != expected
        {
            return Err(format!("'{value}' is not the documented constant '{expected}'"));
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.iter().any(|a| a.as_str().map_or_else(|| a.to_string(), str::to_string) == value)
        {
            return Err(format!("'{value}' is not one of the documented values {allowed:?}"));
        }
        if schema.get("type").and_then(Value::as_str) == Some("integer") {
            let number: u64 = value.parse().map_err(|_| format!("'{value}' is not a non-negative integer"))?;
            if let Some(max) = schema.get("maximum").and_then(Value::as_u64)
                && number > max
            {
                return Err(format!("{number} exceeds the documented maximum {max}"));
            }
        }
        Ok(())
    }
}

/// Sends the scenario's requests and checks every exchange against the document.
struct Checker {
    spec: Spec,
    exercised: BTreeSet<(String, String)>,
    /// The operations exercised in the IETF draft's terms.
    exercised_ietf: BTreeSet<(String, String)>,
    statuses: BTreeSet<u16>,
    ietf_statuses: BTreeSet<u16>,
    /// Problem answers whose body has not been checked against the `Problem` schema yet.
    unread_problems: Vec<String>,
    problems: Vec<String>,
    exchanges: usize,
}

impl Checker {
    fn new(spec: Spec) -> Self {
        Self {
            spec,
            exercised: BTreeSet::new(),
            exercised_ietf: BTreeSet::new(),
            statuses: BTreeSet::new(),
            ietf_statuses: BTreeSet::new(),
            unread_problems: Vec::new(),
            problems: Vec::new(),
            exchanges: 0,
        }
    }

    /// Sends a request, asserts the status the scenario expects, and checks the exchange
    /// against the document.
    async fn send(&mut self, request: RequestBuilder, expected: u16) -> Response {
        let (client, request) = request.build_split();
        let request = request.expect("request builds");
        // The server routes by the override when there is one, so the document must too.
        let method = match request.headers().get("x-http-method-override") {
            Some(value) => value.to_str().unwrap().trim().to_ascii_lowercase(),
            None => request.method().as_str().to_ascii_lowercase(),
        };
        let path = request.url().path().to_string();
        let protocol = protocol_of(&method, request.headers());
        let label = format!("{} {path} ({protocol})", method.to_ascii_uppercase());
        let request_headers: Vec<String> = request.headers().keys().map(|k| k.as_str().to_string()).collect();
        let response = client.execute(request).await.unwrap_or_else(|e| panic!("{label}: {e}"));
        let status = response.status().as_u16();
        assert_eq!(status, expected, "{label}: unexpected status; headers {:?}", response.headers());
        self.exchanges += 1;
        self.statuses.insert(status);
        if protocol == "ietf" {
            self.ietf_statuses.insert(status);
        }
        self.check(&label, &path, &method, protocol, &request_headers, &response);
        // A HEAD's problem has no body to read.
        if is_problem(&response) && method != "head" {
            self.unread_problems.push(label);
        }
        response
    }

    /// Like [`Checker::send`], for an answer that must be an RFC 9457 problem: its body is
    /// checked against the documented schema, and returned with the answer's headers.
    async fn problem(&mut self, request: RequestBuilder, expected: u16) -> (reqwest::header::HeaderMap, Value) {
        let (client, built) = request.build_split();
        let built = built.expect("request builds");
        let path = built.url().path().to_string();
        let method = built.method().as_str().to_ascii_lowercase();
        let response = self.send(reqwest::RequestBuilder::from_parts(client, built), expected).await;
        assert!(is_problem(&response), "{method} {path}: not a problem answer: {:?}", response.headers());
        let label = self.unread_problems.pop().expect("send() keeps the label of a problem answer");
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{label}: not JSON ({e}): {text}"));
        let template = self.spec.template_for(&path).expect("a documented path");
        let schema = self
            .spec
            .response(&template, &method, expected)
            .and_then(|r| r.pointer("/content/application~1problem+json/schema"))
            .map(|schema| self.spec.resolve(schema).clone());
        match schema {
            None => self.problem_found(format!("{label}: no problem schema documented for {expected}")),
            Some(schema) => {
                for failure in self.spec.check_object(&schema, &body) {
                    self.problem_found(format!("{label}: problem body: {failure}"));
                }
            }
        }
        if body["status"] != expected {
            self.problem_found(format!("{label}: the problem's status is {} on a {expected}", body["status"]));
        }
        (headers, body)
    }

    fn problem_found(&mut self, message: String) {
        self.problems.push(message);
    }

    fn check(
        &mut self,
        label: &str,
        path: &str,
        method: &str,
        protocol: &str,
        request_headers: &[String],
        response: &Response,
    ) {
        let status = response.status().as_u16();
        let Some(template) = self.spec.template_for(path) else {
            return self.problem_found(format!("{label}: the path is not documented"));
        };
        if self.spec.operation(&template, method).is_none() {
            return self.problem_found(format!("{label}: {method} is not documented for {template}"));
        }
        self.exercised.insert((template.clone(), method.to_string()));
        if protocol == "ietf" {
            self.exercised_ietf.insert((template.clone(), method.to_string()));
        }

        let mut problems = Vec::new();
        let parameters: BTreeMap<String, &Value> = self
            .spec
            .parameters(&template, method)
            .into_iter()
            .filter(|p| p["in"] == "header")
            .filter_map(|p| Some((p["name"].as_str()?.to_ascii_lowercase(), p)))
            .collect();
        for name in request_headers.iter().filter(|n| contract_request_header(n)) {
            match parameters.get(name) {
                None => problems.push(format!("{label}: request header {name} is not a documented parameter")),
                Some(parameter) => {
                    if let Some(other) = marked(parameter).filter(|p| *p != protocol) {
                        problems.push(format!("{label}: request header {name} is documented for {other} only"));
                    }
                }
            }
        }

        let Some(documented) = self.spec.response(&template, method, status) else {
            self.problem_found(format!("{label}: status {status} is not documented for {method} {template}"));
            self.problems.extend(problems);
            return;
        };
        let headers = self.spec.response_headers(documented);
        for (name, value) in response.headers() {
            let name = name.as_str();
            if !contract_response_header(name) {
                continue;
            }
            let value = value.to_str().unwrap_or("<not ASCII>");
            match headers.get(name) {
                None => problems.push(format!("{label} -> {status}: header {name} is not documented")),
                Some(header) => {
                    if let Some(other) = marked(header).filter(|p| *p != protocol) {
                        problems.push(format!("{label} -> {status}: header {name} is documented for {other} only"));
                    }
                    if let Some(schema) = header.get("schema")
                        && let Err(e) = self.spec.check_value(schema, value)
                    {
                        problems.push(format!("{label} -> {status}: header {name}: {e}"));
                    }
                }
            }
        }
        for (name, header) in &headers {
            let ours = marked(header).is_none_or(|p| p == protocol);
            if header["required"] == true && ours && !response.headers().contains_key(name.as_str()) {
                problems.push(format!("{label} -> {status}: required header {name} is missing"));
            }
        }

        let content = documented.get("content").and_then(Value::as_object);
        if let Some(content_type) = response.headers().get("content-type") {
            let essence = content_type.to_str().unwrap().split(';').next().unwrap().trim().to_ascii_lowercase();
            let listed = content.is_some_and(|types| {
                types.keys().any(|t| {
                    let t = t.to_ascii_lowercase();
                    t == essence
                        || t == "*/*"
                        || t.strip_suffix("/*").is_some_and(|major| essence.starts_with(&format!("{major}/")))
                })
            });
            if !listed {
                problems.push(format!("{label} -> {status}: media type {essence} is not documented"));
            }
        }
        self.problems.extend(problems);
    }
}

/// Structural rules of the document itself.
fn check_document(spec: &Spec) {
    let version = spec.doc["openapi"].as_str().expect("openapi is a string");
    assert!(version.starts_with("3.1."), "openapi must be 3.1.x, is {version}");
    for key in ["title", "version", "description"] {
        assert!(spec.doc["info"][key].as_str().is_some_and(|s| !s.is_empty()), "info.{key} is missing");
    }
    let description = spec.doc["info"]["description"].as_str().unwrap();
    for extension in [
        "creation",
        "creation-with-upload",
        "creation-defer-length",
        "termination",
        "checksum",
        "checksum-trailer",
        "expiration",
        "concatenation",
    ] {
        assert!(description.contains(&format!("`{extension}`")), "info.description does not explain {extension}");
    }

    // Every reference resolves.
    fn walk<'a>(value: &'a Value, refs: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    refs.push(r);
                }
                map.values().for_each(|v| walk(v, refs));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, refs)),
            _ => {}
        }
    }
    let mut refs = Vec::new();
    walk(&spec.doc, &mut refs);
    for r in refs {
        let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("non-local reference {r}"));
        assert!(spec.doc.pointer(pointer).is_some(), "{r} does not resolve");
    }

    // Headers and parameters are reusable components with descriptions; operation ids are unique.
    for kind in ["headers", "parameters"] {
        let components = spec.doc["components"][kind].as_object().unwrap_or_else(|| panic!("no components/{kind}"));
        for (name, component) in components {
            assert!(
                component["description"].as_str().is_some_and(|d| d.len() > 10),
                "components/{kind}/{name} needs a description"
            );
        }
    }
    let mut ids = BTreeSet::new();
    for (template, method) in spec.operations() {
        let operation = spec.operation(&template, &method).unwrap();
        let id = operation["operationId"].as_str().unwrap_or_else(|| panic!("{method} {template}: no operationId"));
        assert!(ids.insert(id.to_string()), "operationId {id} is used twice");
        let item = &spec.paths()[&template];
        let params = item.get("parameters").into_iter().chain(operation.get("parameters"));
        for param in params.filter_map(Value::as_array).flatten() {
            assert!(
                param["$ref"].as_str().is_some_and(|r| r.starts_with("#/components/parameters/")),
                "{method} {template}: parameters must be references to components/parameters"
            );
        }
        for (status, response) in operation["responses"].as_object().expect("responses") {
            for (name, header) in spec.resolve(response).get("headers").and_then(Value::as_object).into_iter().flatten()
            {
                assert!(
                    header["$ref"].as_str().is_some_and(|r| r.starts_with("#/components/headers/")),
                    "{method} {template} {status}: header {name} must be a reference to components/headers"
                );
            }
        }
        // Every path parameter of the template is declared.
        for segment in template.split('/').filter(|s| s.starts_with('{')) {
            let name = segment.trim_matches(['{', '}']);
            assert!(
                spec.parameters(&template, &method).iter().any(|p| p["in"] == "path" && p["name"] == name),
                "{method} {template}: path parameter {name} is not declared"
            );
        }
    }
    assert_eq!(
        spec.doc["components"]["schemas"]["UploadId"]["pattern"], "^[0-9a-f]{32}$",
        "ids are 32 lowercase hex characters"
    );
}

fn is_upload_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn sha1_b64(data: &[u8]) -> String {
    STANDARD.encode(Sha1::digest(data))
}

fn b64(text: &str) -> String {
    STANDARD.encode(text)
}

fn has(response: &Response, name: &str) -> bool {
    response.headers().contains_key(name)
}

fn is_problem(response: &Response) -> bool {
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok());
    content_type.is_some_and(|t| t.starts_with("application/problem+json"))
}

const OCTETS: &str = "application/offset+octet-stream";
const PARTIAL: &str = "application/partial-upload";
const PROBLEM_TYPES: &str = "https://iana.org/assignments/http-problem-types#";

async fn document_matches_server(backend: Backend) {
    let spec = Spec::load();
    check_document(&spec);
    let app = TestApp::spawn(backend).await;
    let mut c = Checker::new(spec);
    let files = app.files.clone();
    let unknown = format!("{files}{}", uuid::Uuid::new_v4().simple());

    // The web page and the health check.
    let page = c.send(app.client.get(format!("{}/", app.base)), 200).await;
    assert!(header(&page, "content-type").starts_with("text/html"));
    c.send(app.client.get(format!("{}/", app.base)).header("If-None-Match", header(&page, "etag")), 304).await;
    let module = c.send(app.client.get(format!("{}/ferry-upload.js", app.base)), 200).await;
    c.send(
        app.client.get(format!("{}/ferry-upload.js", app.base)).header("If-None-Match", header(&module, "etag")),
        304,
    )
    .await;
    let health = c.send(app.client.get(format!("{}/healthz", app.base)), 200).await;
    assert_eq!(health.text().await.unwrap(), "ok\n");
    let ready = c.send(app.client.get(format!("{}/readyz", app.base)), 200).await;
    assert_eq!(ready.text().await.unwrap(), "ready\n");
    let metrics = c.send(app.client.get(format!("{}/metrics", app.base)), 200).await;
    assert!(metrics.text().await.unwrap().contains("ferry_uploads_created_total"));

    // Capabilities, on the collection and on an upload URL.
    let options = c.send(app.client.request(Method::OPTIONS, &files), 204).await;
    assert_eq!(header(&options, "tus-version"), "1.0.0");
    assert_eq!(header(&options, "tus-resumable"), "1.0.0");
    c.send(app.client.request(Method::OPTIONS, &unknown).header("Tus-Resumable", "0.2.2"), 204).await;

    // Versions.
    let refused = c.send(app.client.post(&files).header("Upload-Length", "1"), 412).await;
    assert_eq!(header(&refused, "tus-version"), "1.0.0");
    c.send(app.client.post(&files).header("Tus-Resumable", "0.2.2").header("Upload-Length", "1"), 412).await;

    // Creation refused.
    c.send(app.tus(Method::POST, &files), 400).await;
    c.send(app.tus(Method::POST, &files).header("Upload-Defer-Length", "2"), 400).await;
    c.send(app.tus(Method::POST, &files).header("Upload-Length", "5").header("Upload-Defer-Length", "1"), 400).await;
    c.send(app.tus(Method::POST, &files).header("Upload-Length", "5").header("Upload-Metadata", "a !!!"), 400).await;
    c.send(app.tus(Method::POST, &files).header("Upload-Length", "5").header("Upload-Checksum", "crc32 AAAA"), 400)
        .await;
    c.send(app.tus(Method::POST, &files).header("Upload-Concat", format!("final;{unknown}")), 400).await;
    c.send(app.tus(Method::POST, &files).header("Upload-Length", "1000000000000000"), 413).await;
    let too_long = app.tus(Method::POST, &files).header("Upload-Length", "2").header("Content-Type", OCTETS);
    let too_long = c.send(too_long.body("hello"), 413).await;
    assert!(!has(&too_long, "location"), "nothing is created for a body longer than Upload-Length");
    // Without Content-Length the excess shows only while reading: the upload exists by then.
    let chunks = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"hello world"))]);
    let streamed = app.tus(Method::POST, &files).header("Upload-Length", "5").header("Content-Type", OCTETS);
    let streamed = c.send(streamed.body(reqwest::Body::wrap_stream(chunks)), 413).await;
    assert_eq!(header(&streamed, "upload-offset"), "0");
    assert_eq!(app.offset(&header(&streamed, "location")).await, 0);
    let wrong_type = app.tus(Method::POST, &files).header("Upload-Length", "5").header("Content-Type", "text/plain");
    c.send(wrong_type.body("hello"), 415).await;

    // An upload in two appends, the second through X-HTTP-Method-Override.
    let data = b"hello world";
    let metadata = format!("filename {},filetype {},flag", b64("hello.txt"), b64("text/plain"));
    let created = app.tus(Method::POST, &files).header("Upload-Length", "11").header("Upload-Metadata", &metadata);
    let created = c.send(created, 201).await;
    let url = header(&created, "location");
    assert!(url.starts_with(&files) && is_upload_id(&url[files.len()..]), "Location {url}");
    assert_eq!(header(&created, "upload-offset"), "0");
    assert!(has(&created, "upload-expires"));

    let status = c.send(app.tus(Method::HEAD, &url), 200).await;
    assert_eq!(header(&status, "upload-offset"), "0");
    assert_eq!(header(&status, "upload-length"), "11");
    assert_eq!(header(&status, "upload-metadata"), metadata);
    assert_eq!(header(&status, "cache-control"), "no-store");
    // A HEAD without Tus-Resumable is answered (so `curl -I` works); a wrong version is not.
    c.send(app.client.head(&url), 200).await;
    c.send(app.client.head(&url).header("Tus-Resumable", "0.2.2"), 412).await;
    c.send(app.client.get(&url), 409).await;
    c.send(app.client.get(format!("{url}/link")), 409).await;

    let patch = |offset: &str| app.tus(Method::PATCH, &url).header("Upload-Offset", offset);
    c.send(patch("0").body("hello "), 415).await;
    c.send(app.tus(Method::PATCH, &url).header("Content-Type", OCTETS).body("hello "), 400).await;
    let mismatch = c.send(patch("3").header("Content-Type", OCTETS).body("hello "), 409).await;
    assert_eq!(header(&mismatch, "upload-offset"), "0");
    let bad_sum =
        patch("0").header("Content-Type", OCTETS).header("Upload-Checksum", format!("sha1 {}", sha1_b64(b"HELLO ")));
    c.send(bad_sum.body("hello "), 460).await;
    let unknown_sum = patch("0").header("Content-Type", OCTETS).header("Upload-Checksum", "crc32 AAAA");
    c.send(unknown_sum.body("hello "), 400).await;
    c.send(patch("0").header("Content-Type", OCTETS).body("hello world!"), 413).await;
    let unversioned = app.client.patch(&url).header("Upload-Offset", "0").header("Content-Type", OCTETS);
    c.send(unversioned.body("hello "), 412).await;
    assert_eq!(app.offset(&url).await, 0, "refused appends store nothing");

    let good_sum =
        patch("0").header("Content-Type", OCTETS).header("Upload-Checksum", format!("sha1 {}", sha1_b64(b"hello ")));
    let first = c.send(good_sum.body("hello "), 204).await;
    assert_eq!(header(&first, "upload-offset"), "6");
    assert!(has(&first, "upload-expires"));
    let overridden = app
        .tus(Method::POST, &url)
        .header("X-HTTP-Method-Override", "PATCH")
        .header("Upload-Offset", "6")
        .header("Content-Type", OCTETS)
        .body("world");
    let last = c.send(overridden, 204).await;
    assert_eq!(header(&last, "upload-offset"), "11");
    assert!(!has(&last, "upload-expires"), "complete uploads do not expire");
    c.send(patch("11").header("Content-Type", OCTETS).body(""), 400).await;

    let digest = format!("sha-256=:{}:", sha256_b64(data));
    let status = c.send(app.tus(Method::HEAD, &url), 200).await;
    assert_eq!(header(&status, "upload-offset"), "11");
    assert_eq!(header(&status, "repr-digest"), digest);

    // Downloads.
    let whole = c.send(app.client.get(&url), 200).await;
    assert_eq!(header(&whole, "content-type"), "text/plain");
    assert!(header(&whole, "content-disposition").starts_with("inline; filename=\"hello.txt\""));
    assert_eq!(header(&whole, "repr-digest"), digest);
    let etag = header(&whole, "etag");
    assert_eq!(whole.bytes().await.unwrap().as_ref(), data);
    let part = c.send(app.client.get(&url).header("Range", "bytes=0-4"), 206).await;
    assert_eq!(header(&part, "content-range"), "bytes 0-4/11");
    assert_eq!(part.text().await.unwrap(), "hello");
    let rest = app.client.get(&url).header("Range", "bytes=6-").header("If-Range", &etag);
    assert_eq!(c.send(rest, 206).await.text().await.unwrap(), "world");
    let fresh = c.send(app.client.get(&url).header("If-None-Match", &etag), 304).await;
    assert_eq!(header(&fresh, "etag"), etag);
    // Signed links.
    let link = c.send(app.client.get(format!("{url}/link")), 200).await;
    let link: Value = serde_json::from_slice(&link.bytes().await.unwrap()).unwrap();
    let schema = serde_json::json!({"$ref": "#/components/schemas/DownloadLink"});
    let problems = c.spec.check_object(c.spec.resolve(&schema), &link);
    assert!(problems.is_empty(), "the link's body: {problems:?}");
    let signed = link["url"].as_str().unwrap();
    assert_eq!(c.send(app.client.get(signed), 200).await.bytes().await.unwrap().as_ref(), data);
    c.send(app.client.get(signed.replace("expires=", "expires=9")), 403).await;
    c.send(app.client.get(format!("{unknown}/link")), 404).await;
    let outside = c.send(app.client.get(&url).header("Range", "bytes=11-"), 416).await;
    assert_eq!(header(&outside, "content-range"), "bytes */11");

    // creation-with-upload, including a first body refused by its checksum.
    let with_body = app.tus(Method::POST, &files).header("Upload-Length", "5").header("Content-Type", OCTETS);
    let with_body = c.send(with_body.body("abcde"), 201).await;
    assert_eq!(header(&with_body, "upload-offset"), "5");
    let refused = app
        .tus(Method::POST, &files)
        .header("Upload-Length", "10")
        .header("Content-Type", OCTETS)
        .header("Upload-Checksum", format!("sha1 {}", sha1_b64(b"other")));
    let refused = c.send(refused.body("abcde"), 460).await;
    assert_eq!(header(&refused, "upload-offset"), "0");
    let kept = header(&refused, "location");
    assert_eq!(app.offset(&kept).await, 0);

    // An empty upload is complete at once.
    let empty = c.send(app.tus(Method::POST, &files).header("Upload-Length", "0"), 201).await;
    assert!(!has(&empty, "upload-expires"));
    let empty_url = header(&empty, "location");
    let empty_get = c.send(app.client.get(&empty_url), 200).await;
    assert_eq!(header(&empty_get, "repr-digest"), format!("sha-256=:{}:", sha256_b64(b"")));

    // creation-defer-length.
    let deferred = c.send(app.tus(Method::POST, &files).header("Upload-Defer-Length", "1"), 201).await;
    let deferred = header(&deferred, "location");
    let status = c.send(app.tus(Method::HEAD, &deferred), 200).await;
    assert_eq!(header(&status, "upload-defer-length"), "1");
    assert!(!has(&status, "upload-length"));
    let declare = app
        .tus(Method::PATCH, &deferred)
        .header("Upload-Offset", "0")
        .header("Upload-Length", "3")
        .header("Content-Type", OCTETS);
    c.send(declare.body("abc"), 204).await;
    let status = c.send(app.tus(Method::HEAD, &deferred), 200).await;
    assert_eq!(header(&status, "upload-length"), "3");

    // Concatenation.
    let partial = |length: &str| {
        app.tus(Method::POST, &files).header("Upload-Concat", "partial").header("Upload-Length", length.to_string())
    };
    let first = c.send(partial("3").header("Content-Type", OCTETS).body("foo"), 201).await;
    let first = header(&first, "location");
    let second = header(&c.send(partial("3"), 201).await, "location");
    let append = app.tus(Method::PATCH, &second).header("Upload-Offset", "0").header("Content-Type", OCTETS);
    c.send(append.body("bar"), 204).await;
    let status = c.send(app.tus(Method::HEAD, &second), 200).await;
    assert_eq!(header(&status, "upload-concat"), "partial");
    let unfinished = header(&c.send(partial("3"), 201).await, "location");
    let final_of = |parts: String| app.tus(Method::POST, &files).header("Upload-Concat", format!("final;{parts}"));
    c.send(final_of(format!("{first} {unfinished}")), 400).await;
    c.send(final_of(format!("{first} {second}")).header("Upload-Length", "6"), 400).await;
    let second_path = &second[app.base.len()..];
    let joined = c.send(final_of(format!("{first} {second_path}")), 201).await;
    let joined = header(&joined, "location");
    let status = c.send(app.tus(Method::HEAD, &joined), 200).await;
    let first_path = &first[app.base.len()..];
    assert_eq!(header(&status, "upload-concat"), format!("final;{first_path} {second_path}"));
    assert_eq!(header(&status, "upload-length"), "6");
    let forbidden = app.tus(Method::PATCH, &joined).header("Upload-Offset", "0").header("Content-Type", OCTETS);
    c.send(forbidden.body("x"), 403).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        // 409 while the final upload is being assembled, then 200.
        let done = app.client.get(&joined).send().await.unwrap().status() == 200;
        if done {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the final upload was never assembled");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let assembled = c.send(app.client.get(&joined), 200).await;
    assert_eq!(assembled.text().await.unwrap(), "foobar");
    let status = c.send(app.tus(Method::HEAD, &joined), 200).await;
    assert_eq!(header(&status, "upload-offset"), "6");

    // Termination.
    let doomed = app.create(10).await;
    c.send(app.client.delete(&doomed), 412).await;
    c.send(app.tus(Method::DELETE, &doomed), 204).await;
    c.send(app.tus(Method::HEAD, &doomed), 410).await;
    let late = app.tus(Method::PATCH, &doomed).header("Upload-Offset", "0").header("Content-Type", OCTETS);
    c.send(late.body("x"), 410).await;
    c.send(app.client.get(&doomed), 410).await;
    c.send(app.tus(Method::DELETE, &doomed), 410).await;
    let by_override = app.tus(Method::POST, &unfinished).header("X-HTTP-Method-Override", "DELETE");
    c.send(by_override, 204).await;

    // Unknown and malformed ids.
    c.send(app.tus(Method::HEAD, &unknown), 404).await;
    let stray = app.tus(Method::PATCH, &unknown).header("Upload-Offset", "0").header("Content-Type", OCTETS);
    c.send(stray.body("x"), 404).await;
    c.send(app.tus(Method::DELETE, &unknown), 404).await;
    c.send(app.client.get(&unknown), 404).await;
    let malformed = format!("{files}NOT-AN-ID");
    c.send(app.tus(Method::HEAD, &malformed), 404).await;
    c.send(app.client.get(&malformed), 404).await;

    // The probe of `ferry doctor`: reads and discards the body; ferry's own refusals are marked.
    let probe = format!("{files}probe");
    let measured = c.send(app.client.post(&probe).body("hello"), 200).await;
    assert_eq!(header(&measured, "ferry-probe"), "ok");
    let result: Value = serde_json::from_str(&measured.text().await.unwrap()).unwrap();
    assert_eq!(result["received"], 5);
    let limited = TestApp::spawn_with(backend, |args| {
        args.probe_max_size = 64;
        args.probe_budget = 64;
    })
    .await;
    let limited_probe = format!("{}probe", limited.files);
    let over = c.send(limited.client.post(&limited_probe).body(vec![0u8; 65]), 413).await;
    assert_eq!(header(&over, "ferry-probe"), "limit");
    c.send(limited.client.post(&limited_probe).body(vec![0u8; 64]), 200).await;
    let spent = c.send(limited.client.post(&limited_probe).body(vec![0u8; 64]), 429).await;
    assert_eq!(header(&spent, "ferry-probe"), "budget");

    // The IETF draft on the same paths. Capabilities, with the draft's limits.
    let draft = |method: Method, url: &str| app.client.request(method, url).header("Upload-Draft-Interop-Version", "9");
    let options = c.send(draft(Method::OPTIONS, &files), 204).await;
    let limit = header(&options, "upload-limit");
    assert!(limit.starts_with("max-size=") && limit.contains("max-age="), "Upload-Limit {limit}");
    assert!(!has(&options, "tus-resumable"));
    c.send(draft(Method::OPTIONS, &unknown), 204).await;

    // Creation refused.
    let inconsistent = draft(Method::POST, &files).header("Upload-Complete", "?1").header("Upload-Length", "3");
    let (headers, problem) = c.problem(inconsistent.body("hello"), 400).await;
    assert_eq!(problem["type"], format!("{PROBLEM_TYPES}inconsistent-upload-length"));
    assert_eq!(headers["upload-complete"], "?0");
    let huge = draft(Method::POST, &files).header("Upload-Complete", "?0").header("Upload-Length", "999999999999999");
    let (headers, _) = c.problem(huge, 413).await;
    assert!(headers.contains_key("upload-limit"), "a 413 says the limits");

    // An empty creation with a length, then appends.
    let created = draft(Method::POST, &files).header("Upload-Complete", "?0").header("Upload-Length", "11");
    let created = c.send(created, 201).await;
    assert_eq!(header(&created, "upload-complete"), "?0");
    assert_eq!(header(&created, "upload-offset"), "0");
    assert!(has(&created, "upload-limit") && !has(&created, "tus-resumable"));
    let draft_url = header(&created, "location");
    assert!(draft_url.starts_with(&files) && is_upload_id(&draft_url[files.len()..]), "Location {draft_url}");
    let status = c.send(draft(Method::HEAD, &draft_url), 204).await;
    assert_eq!(header(&status, "upload-offset"), "0");
    assert_eq!(header(&status, "upload-length"), "11");
    assert_eq!(header(&status, "cache-control"), "no-store");
    let by_get = c.send(draft(Method::GET, &draft_url), 204).await;
    assert_eq!(header(&by_get, "upload-complete"), "?0");

    let append = |offset: &str, complete: &str| {
        draft(Method::PATCH, &draft_url)
            .header("Content-Type", PARTIAL)
            .header("Upload-Offset", offset)
            .header("Upload-Complete", complete)
    };
    let (headers, conflict) = c.problem(append("3", "?0").body("lo "), 409).await;
    assert_eq!(conflict["type"], format!("{PROBLEM_TYPES}mismatching-upload-offset"));
    assert_eq!((conflict["expected-offset"].as_u64(), conflict["provided-offset"].as_u64()), (Some(0), Some(3)));
    assert_eq!(headers["upload-offset"], "0");
    assert_eq!(headers["upload-complete"], "?0");
    let typed_for_tus = draft(Method::PATCH, &draft_url)
        .header("Content-Type", OCTETS)
        .header("Upload-Offset", "0")
        .header("Upload-Complete", "?0");
    c.problem(typed_for_tus.body("hello "), 415).await;
    let unsaid = draft(Method::PATCH, &draft_url).header("Content-Type", PARTIAL).header("Upload-Offset", "0");
    c.problem(unsaid.body("hello "), 400).await;
    let damaged = append("0", "?0").header("Content-Digest", format!("sha-256=:{}:", sha256_b64(b"HELLO ")));
    c.problem(damaged.body("hello "), 400).await;
    let (_, short) = c.problem(append("0", "?1").body("hello"), 400).await;
    assert_eq!(short["type"], format!("{PROBLEM_TYPES}inconsistent-upload-length"));
    assert_eq!(app.offset(&draft_url).await, 0, "refused appends store nothing");

    let vouched = append("0", "?0").header("Content-Digest", format!("sha-256=:{}:", sha256_b64(b"hello ")));
    let first = c.send(vouched.body("hello "), 204).await;
    assert_eq!((header(&first, "upload-offset"), header(&first, "upload-complete")), ("6".into(), "?0".into()));
    let last = c.send(append("6", "?1").body("world"), 200).await;
    assert_eq!(header(&last, "upload-complete"), "?1");
    assert_eq!(header(&last, "repr-digest"), digest);
    let (headers, completed) = c.problem(append("11", "?1").body(""), 400).await;
    assert_eq!(completed["type"], format!("{PROBLEM_TYPES}completed-upload"));
    assert_eq!(headers["upload-complete"], "?1");
    let status = c.send(draft(Method::HEAD, &draft_url), 204).await;
    assert_eq!((header(&status, "upload-complete"), header(&status, "repr-digest")), ("?1".into(), digest.clone()));

    // The whole upload in its creation, named the draft's way.
    let whole = draft(Method::POST, &files)
        .header("Upload-Complete", "?1")
        .header("Content-Type", "text/plain")
        .header("Content-Disposition", "inline; filename=\"note.txt\"");
    let whole = c.send(whole.body("hello world"), 201).await;
    assert_eq!((header(&whole, "upload-complete"), header(&whole, "upload-offset")), ("?1".into(), "11".into()));
    assert_eq!(header(&whole, "repr-digest"), digest);
    let note = c.send(app.client.get(header(&whole, "location")), 200).await;
    assert!(header(&note, "content-disposition").contains("filename=\"note.txt\""));
    assert_eq!(header(&note, "content-type"), "text/plain");

    // Interop version 5 (tus-js-client's ietf-draft-03): untyped appends, 201 until complete.
    let early = |method: Method, url: &str| app.client.request(method, url).header("Upload-Draft-Interop-Version", "5");
    let created =
        c.send(early(Method::POST, &files).header("Upload-Complete", "?0").header("Upload-Length", "4"), 201).await;
    let early_url = header(&created, "location");
    let part = c.send(early(Method::PATCH, &early_url).header("Upload-Offset", "0").body("ab"), 201).await;
    assert_eq!((header(&part, "upload-offset"), header(&part, "upload-complete")), ("2".into(), "?0".into()));
    let rest = early(Method::PATCH, &early_url).header("Upload-Offset", "2").header("Upload-Complete", "?1");
    c.send(rest.body("cd"), 200).await;

    // Cancellation, and what is left of it.
    let doomed = c.send(draft(Method::POST, &files).header("Upload-Complete", "?0"), 201).await;
    let doomed = header(&doomed, "location");
    c.send(draft(Method::DELETE, &doomed), 204).await;
    c.send(draft(Method::HEAD, &doomed), 410).await;
    c.problem(draft(Method::GET, &doomed), 410).await;
    let late = draft(Method::PATCH, &doomed).header("Content-Type", PARTIAL).header("Upload-Offset", "0");
    c.problem(late.header("Upload-Complete", "?0").body("x"), 410).await;
    c.problem(draft(Method::DELETE, &doomed), 410).await;
    c.send(draft(Method::HEAD, &unknown), 404).await;
    c.problem(draft(Method::GET, &unknown), 404).await;
    let stray = draft(Method::PATCH, &unknown).header("Content-Type", PARTIAL).header("Upload-Offset", "0");
    c.problem(stray.header("Upload-Complete", "?0").body("x"), 404).await;
    c.problem(draft(Method::DELETE, &unknown), 404).await;
    c.problem(draft(Method::GET, &malformed), 404).await;

    // A CORS preflight, answered before the tus handlers.
    let browser = TestApp::spawn_with(backend, |args| args.cors_origin = vec!["https://app.example".into()]).await;
    let preflight = browser
        .client
        .request(Method::OPTIONS, &browser.files)
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "PATCH");
    let preflight = c.send(preflight, 200).await;
    assert_eq!(header(&preflight, "access-control-allow-origin"), "https://app.example");

    let Checker { spec, exercised, exercised_ietf, statuses, ietf_statuses, unread_problems, problems, exchanges } = c;
    assert!(
        problems.is_empty(),
        "{} of {exchanges} exchanges disagree with the document:\n{}",
        problems.len(),
        problems.join("\n")
    );
    let missing: Vec<_> = spec.operations().difference(&exercised).cloned().collect();
    assert!(missing.is_empty(), "documented operations the scenario never exercised: {missing:?}");
    let missing: Vec<_> = spec.ietf_operations().difference(&exercised_ietf).cloned().collect();
    assert!(missing.is_empty(), "operations tagged ietf the draft's requests never exercised: {missing:?}");
    let unseen: Vec<_> = REQUIRED_STATUSES.iter().filter(|s| !statuses.contains(s)).collect();
    assert!(unseen.is_empty(), "statuses the scenario never produced: {unseen:?}");
    let unseen: Vec<_> = REQUIRED_IETF_STATUSES.iter().filter(|s| !ietf_statuses.contains(s)).collect();
    assert!(unseen.is_empty(), "statuses the draft's requests never produced: {unseen:?}");
    assert!(unread_problems.is_empty(), "problem bodies never checked against the schema: {unread_problems:?}");
}

crate::backend_tests!(document_matches_server);
