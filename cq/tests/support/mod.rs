//! What cq's process tests share: `cq` commands as child processes and a headless Chromium
//! session through chromedriver, all stopped when dropped.

// Each test crate compiles this module and uses only some of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};

/// A child process, killed and reaped when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cq ARGS` for a command that prints `listening on ADDR` first (dev, broker); returns it and
/// its URL.
pub fn cq_listening(args: &[&str]) -> (Killed, String) {
    listening(args, "warn", Stdio::inherit())
}

/// [`cq_listening`], with its log at info level written to `log`.
pub fn cq_listening_logged(args: &[&str], log: &std::path::Path) -> (Killed, String) {
    listening(args, "info", std::fs::File::create(log).unwrap().into())
}

fn listening(args: &[&str], level: &str, log: Stdio) -> (Killed, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cq"))
        .args(args)
        .env("CQ_LOG", level)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").expect("the first line names the address").to_string();
    (Killed(child), url)
}

/// `cq dev` on a free port with its own data directory and `extra` arguments; returns its URL.
/// Killed with it, its local worker's containers are removed too.
pub fn cq_dev_with(dir: &std::path::Path, extra: &[&str]) -> (KilledWorker, String) {
    let mut args = vec!["dev", "--listen", "127.0.0.1:0", "--data-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (process, url) = cq_listening(&args);
    (KilledWorker { process, data_dir: dir.join("worker"), worker_id: None }, url)
}

impl Killed {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

/// A `cq worker` of the broker at `url` with its own data directory and `extra` arguments.
pub fn cq_worker(url: &str, dir: &std::path::Path, extra: &[&str]) -> KilledWorker {
    let child = Command::new(env!("CARGO_BIN_EXE_cq"))
        .args(["worker", "--url", url, "--data-dir", dir.to_str().unwrap()])
        .args(extra)
        .env("CQ_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let id = extra.iter().position(|a| *a == "--worker-id").and_then(|i| extra.get(i + 1)).map(|id| id.to_string());
    KilledWorker::new(child, dir, id)
}

/// A `cq worker` process, killed when dropped; then the containers it left (a job it was
/// running or creating when killed) are removed too, found by the worker's label.
pub struct KilledWorker {
    process: Killed,
    data_dir: std::path::PathBuf,
    /// Its `--worker-id`, if given.
    worker_id: Option<String>,
}

impl KilledWorker {
    pub fn new(child: Child, data_dir: &std::path::Path, worker_id: Option<String>) -> KilledWorker {
        KilledWorker { process: Killed(child), data_dir: data_dir.to_path_buf(), worker_id }
    }

    pub fn id(&self) -> u32 {
        self.process.id()
    }
}

impl Drop for KilledWorker {
    fn drop(&mut self) {
        let _ = self.process.0.kill();
        let _ = self.process.0.wait();
        // The worker's id: `--worker-id`, else the one it keeps in its data directory.
        let id = self.worker_id.clone().or_else(|| std::fs::read_to_string(self.data_dir.join("worker-id")).ok());
        if let Some(id) = id {
            remove_containers_of(id.trim());
        }
    }
}

/// Removes every container labelled as worker `id`'s (`docker rm -f`).
pub fn remove_containers_of(id: &str) {
    let listed = Command::new("docker").args(["ps", "-aq", "--filter", &format!("label=cq.worker={id}")]).output();
    if let Ok(out) = listed {
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect();
        if !ids.is_empty() {
            let _ = Command::new("docker").args(["rm", "-f"]).args(&ids).stdout(Stdio::null()).status();
        }
    }
}

/// chromedriver on a free port, and a headless Chromium session through it.
pub async fn browser() -> (Killed, Client) {
    // Two rustls crypto providers are in the build (ring and aws-lc-rs): name one for the
    // WebDriver client, which asks for the process default. A second test installing it is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver is not installed (apt-get install chromium chromium-driver)");
    // It says when it listens.
    let mut out = BufReader::new(driver.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("started successfully") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "chromedriver exited before it listened");
    }
    let driver = Killed(driver);
    let url = format!("http://127.0.0.1:{port}");
    let mut caps = serde_json::Map::new();
    let mut options = json!({ "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-dev-shm-usage", "--window-size=1200,900"] });
    if std::path::Path::new("/usr/bin/chromium").exists() {
        options["binary"] = json!("/usr/bin/chromium");
    }
    caps.insert("goog:chromeOptions".into(), options);
    // Keep the console (script errors, failed module loads) for `browser_console`.
    caps.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
    let client = ClientBuilder::rustls().unwrap().capabilities(caps).connect(&url).await.expect("a Chromium session");
    (driver, client)
}

/// chromedriver's console log command (`POST /session/{id}/se/log`), which WebDriver itself lacks.
#[derive(Debug)]
struct ConsoleLog;

impl fantoccini::wd::WebDriverCompatibleCommand for ConsoleLog {
    fn endpoint(&self, base: &url::Url, session: Option<&str>) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

/// What the page wrote to the browser's console since the last call (errors of scripts and of
/// module loads among it), one line per entry; why it could not be read, if it could not.
pub async fn browser_console(c: &Client) -> Vec<String> {
    match c.issue_cmd(ConsoleLog).await {
        Ok(Value::Array(entries)) => entries
            .iter()
            .map(|e| format!("{} {}", e["level"].as_str().unwrap_or("?"), e["message"].as_str().unwrap_or("")))
            .collect(),
        Ok(other) => vec![format!("(an unexpected console log: {other})")],
        Err(e) => vec![format!("(the console log could not be read: {e})")],
    }
}
