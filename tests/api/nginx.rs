//! Real nginx in front of ferry, as in production: a "host" nginx proxying to an "ingress" nginx
//! proxying to ferry, each left at nginx's defaults unless a test says otherwise
//! (`client_max_body_size 1m`, `proxy_request_buffering on`, 60 s timeouts).
//!
//! The binary is `$FERRY_TEST_NGINX`, else `/usr/sbin/nginx`, else `nginx` on `PATH` (Debian's
//! `nginx` package; `.ci/run` installs it). Each nginx runs in the foreground as one process
//! (`master_process off`) with its own temp folder, on a free port of 127.0.0.1, and is killed
//! when dropped.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use reqwest::Method;

use crate::helpers::{Backend, TestApp, header};

/// The nginx binary the tests run.
pub fn nginx_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FERRY_TEST_NGINX") {
        return PathBuf::from(path);
    }
    let debian = Path::new("/usr/sbin/nginx");
    if debian.exists() { debian.to_path_buf() } else { PathBuf::from("nginx") }
}

/// Whether this process runs as root: nginx then needs `user root;` so that its worker may write
/// the temp folders (owned by root) where it buffers request bodies.
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// A `location /` block that proxies to `upstream` (`host:port`), keeping the `Host` the client
/// asked for; `directives` are added inside it (e.g. `client_max_body_size 0;`).
pub fn proxy_location(upstream: &str, directives: &str) -> String {
    format!(
        "location / {{
            proxy_pass http://{upstream};
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            {directives}
        }}"
    )
}

pub struct Nginx {
    /// `http://127.0.0.1:<port>`
    pub url: String,
    pub port: u16,
    /// The server block in force, with `{listen}` already filled in.
    server: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Nginx {
    /// nginx at its defaults, proxying everything to `upstream` (`host:port`).
    pub fn proxy(upstream: &str) -> Self {
        Self::proxy_with(upstream, "")
    }

    /// nginx proxying everything to `upstream`, with `directives` inside `location /`.
    pub fn proxy_with(upstream: &str, directives: &str) -> Self {
        let location = proxy_location(upstream, directives);
        Self::server(&format!("server {{\n    listen {{listen}};\n    {location}\n}}"))
    }

    /// nginx spreading requests round robin over several `upstreams` (`host:port` each), as a
    /// Kubernetes Service spreads them over pods, with `directives` inside `location /`. Unlike
    /// [`proxy_location`] it leaves `Host` at nginx's default, the upstream's name (`ferry_pods`):
    /// past this proxy, only forwarded headers tell which host the client asked for (add
    /// `proxy_set_header Host $http_host;` to keep it). Like ingress-nginx, it leaves `Location`
    /// headers alone (`proxy_redirect off`): absolute URLs are the upstream's to get right, and
    /// it never takes a failed upstream out of rotation for a while (`max_fails=0`), so pods that
    /// come back are used at once.
    pub fn balance_with(upstreams: &[String], directives: &str) -> Self {
        let servers: String = upstreams.iter().map(|u| format!("    server {u} max_fails=0;\n")).collect();
        Self::server(&format!(
            "upstream ferry_pods {{
{servers}}}
server {{
    listen {{listen}};
    location / {{
        proxy_pass http://ferry_pods;
        proxy_redirect off;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        {directives}
    }}
}}"
        ))
    }

    /// nginx serving one `server` block, in which `{listen}` is replaced by this nginx's
    /// `127.0.0.1:<port>` (so a site file from `deploy/` can be run as it is).
    pub fn server(server: &str) -> Self {
        let mut last_error = String::new();
        // A free port now; should another process take it before nginx binds it, try again.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut nginx = Nginx {
                url: format!("http://127.0.0.1:{port}"),
                port,
                server: server.replace("{listen}", &format!("127.0.0.1:{port}")),
                dir: tempfile::tempdir().expect("temp dir for nginx"),
                child: None,
            };
            match nginx.launch() {
                Ok(()) => return nginx,
                Err(e) => last_error = e,
            }
        }
        panic!("nginx did not start: {last_error}");
    }

    /// The configuration file this nginx runs: the server block inside a minimal `http` block
    /// whose temp folders and logs are this nginx's own.
    fn write_config(&self) -> PathBuf {
        let dir = self.dir.path().display();
        let user = if running_as_root() { "user root;" } else { "" };
        let config = format!(
            "daemon off;
master_process off;
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 512; }}
http {{
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    access_log {dir}/access.log;
{server}
}}
",
            server = self.server
        );
        let path = self.dir.path().join("nginx.conf");
        std::fs::write(&path, config).expect("write nginx.conf");
        path
    }

    /// `nginx -t` on this nginx's configuration: Ok, or nginx's complaint.
    pub fn check(&self) -> Result<(), String> {
        let config = self.write_config();
        let output = Command::new(nginx_binary())
            .arg("-t")
            .arg("-c")
            .arg(&config)
            .arg("-p")
            .arg(self.dir.path())
            .output()
            .expect("run nginx -t");
        if output.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&output.stderr).into_owned()) }
    }

    fn launch(&mut self) -> Result<(), String> {
        let config = self.write_config();
        let log = std::fs::File::create(self.dir.path().join("stderr.log")).unwrap();
        let mut child = Command::new(nginx_binary())
            .arg("-c")
            .arg(&config)
            .arg("-p")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e} (set FERRY_TEST_NGINX)", nginx_binary().display()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!("nginx exited with {status}:\n{}", self.logs()));
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("nginx did not listen on port {} within 20 s:\n{}", self.port, self.logs()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills nginx (connections through it break, as when a proxy restarts).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts nginx again on the same port, with the same configuration.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "nginx is running");
        self.launch().unwrap_or_else(|e| panic!("nginx did not start again: {e}"));
    }

    /// Stops nginx and starts it again on the same port with `server` as its server block
    /// (`{listen}` is filled in as in [`Nginx::server`]).
    pub fn reconfigure(&mut self, server: &str) {
        self.stop();
        self.server = server.replace("{listen}", &format!("127.0.0.1:{}", self.port));
        self.start();
    }

    /// Stops nginx and starts it again with `directives` inside a fresh `location /` proxying to
    /// `upstream`.
    pub fn reconfigure_proxy(&mut self, upstream: &str, directives: &str) {
        let location = proxy_location(upstream, directives);
        self.reconfigure(&format!("server {{\n    listen {{listen}};\n    {location}\n}}"));
    }

    /// `host:port`, for another proxy's `proxy_pass`.
    pub fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The access log: one line per request, with its status (nginx's `combined` format).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// The error log and stderr, for failure messages.
    pub fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", read("stderr.log"), read("error.log"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The production path: client → host nginx → ingress nginx → ferry. The host nginx tells what
/// the client asked for in `X-Forwarded-Proto`/`-Host` (start ferry with `--behind-proxy`); both
/// keep nginx's default limits.
pub struct ProxyChain {
    pub host: Nginx,
    pub ingress: Nginx,
}

impl ProxyChain {
    /// Both proxies at their defaults, in front of ferry at `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Self {
        Self::start_with(upstream, "", "")
    }

    /// Like [`ProxyChain::start`], with extra directives inside each proxy's `location /`.
    pub fn start_with(upstream: &str, host_directives: &str, ingress_directives: &str) -> Self {
        let ingress = Nginx::proxy_with(upstream, ingress_directives);
        let host = Nginx::proxy_with(&ingress.authority(), &Self::host_directives(host_directives));
        ProxyChain { host, ingress }
    }

    /// A host nginx at its defaults in front of `ingress`, with extra `host_directives`.
    pub fn around(ingress: Nginx, host_directives: &str) -> Self {
        let host = Nginx::proxy_with(&ingress.authority(), &Self::host_directives(host_directives));
        ProxyChain { host, ingress }
    }

    fn host_directives(extra: &str) -> String {
        format!(
            "proxy_set_header X-Forwarded-Proto $scheme;\n            proxy_set_header X-Forwarded-Host $http_host;\n            {extra}"
        )
    }

    /// Restarts both proxies with new directives (e.g. the advice of `ferry doctor`).
    pub fn reconfigure(&mut self, upstream: &str, host_directives: &str, ingress_directives: &str) {
        self.ingress.reconfigure_proxy(upstream, ingress_directives);
        let ingress = self.ingress.authority();
        self.host.reconfigure_proxy(&ingress, &Self::host_directives(host_directives));
    }

    /// The URL clients use: the host nginx.
    pub fn url(&self) -> &str {
        &self.host.url
    }

    /// Both proxies' logs, for failure messages.
    pub fn logs(&self) -> String {
        format!("--- host nginx\n{}\n--- ingress nginx\n{}", self.host.logs(), self.ingress.logs())
    }
}

/// The chain at its defaults passes 1 MiB chunks and refuses anything larger with nginx's 413,
/// before ferry sees it: what every proxy test builds on.
#[tokio::test]
async fn the_default_chain_passes_one_mib_and_refuses_more() {
    let app = TestApp::spawn_with(Backend::Sqlite, |args| args.behind_proxy = true).await;
    let chain = ProxyChain::start(&app.addr.to_string());
    let files = format!("{}/files/", chain.url());
    let created = app.tus(Method::POST, &files).header("Upload-Length", (3u64 << 20).to_string()).send().await.unwrap();
    assert_eq!(created.status(), 201, "{}", chain.logs());
    let url = header(&created, "location");
    assert!(url.starts_with(&files), "{url} is not an URL of the host proxy {files}");

    let too_big = app.patch(&url, 0, vec![0u8; (1 << 20) + 1]).await;
    assert_eq!(too_big.status(), 413);
    assert!(too_big.headers().get("tus-resumable").is_none(), "the 413 came from nginx, not ferry");
    for offset in 0..3u64 {
        let chunk = app.patch(&url, offset << 20, vec![offset as u8; 1 << 20]).await;
        assert_eq!(chunk.status(), 204, "{}", chain.logs());
    }
    let head = app.tus(Method::HEAD, &url).send().await.unwrap();
    assert_eq!(header(&head, "upload-offset"), (3u64 << 20).to_string());

    // Raised on both proxies, the limit lets the larger body through. (A new client: the old
    // one's pooled connections died with the proxies.)
    let mut chain = chain;
    chain.reconfigure(&app.addr.to_string(), "client_max_body_size 4m;", "client_max_body_size 4m;");
    let client = reqwest::Client::new();
    let tus = |method: Method, url: &str| client.request(method, url).header("Tus-Resumable", "1.0.0");
    let created = tus(Method::POST, &files).header("Upload-Length", (2u64 << 20).to_string()).send().await.unwrap();
    let whole = tus(Method::PATCH, &header(&created, "location"))
        .header("Upload-Offset", "0")
        .header("Content-Type", "application/offset+octet-stream")
        .body(vec![9u8; 2 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), 204, "{}", chain.logs());
}

/// A stopped proxy refuses connections; started again on the same port, it passes requests.
#[tokio::test]
async fn a_proxy_restarts_on_its_port() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let mut nginx = Nginx::proxy(&app.addr.to_string());
    let options = |url: String| {
        let client = app.client.clone();
        async move { client.request(Method::OPTIONS, url).send().await }
    };
    assert_eq!(options(format!("{}/files/", nginx.url)).await.unwrap().status(), 204);
    nginx.stop();
    assert!(options(format!("{}/files/", nginx.url)).await.is_err());
    nginx.start();
    assert_eq!(options(format!("{}/files/", nginx.url)).await.unwrap().status(), 204);
    nginx.check().expect("the running configuration passes nginx -t");
}
