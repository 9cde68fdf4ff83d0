//! The browser page in a real headless Chromium (through chromedriver), against `cq dev` with
//! its real worker and Docker: run a job from the form and watch its log arrive live, fetch an
//! output, drive the page from a host page over postMessage, and survive dropped sockets
//! without a gap or a repeated log line. Screenshots land in the test's temporary directory.

mod support;
use support::{browser, cq_dev_with};

use std::time::{Duration, Instant};

use fantoccini::{Client, Locator};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// Polls `f` until it returns `Some`, up to [`WAIT`]. WebDriver has no way to push a change of
/// the page to the test, so asking again is the only way to wait for one.
async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(started.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn text(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn script(c: &Client, js: &str) -> Value {
    c.execute(js, vec![]).await.unwrap()
}

fn screenshot(name: &str, png: &[u8]) {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_a_job_from_the_page_and_watch_it_live() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &[]);
    let (_driver, c) = browser().await;
    c.goto(&format!("{url}/#queue=local")).await.unwrap();
    c.find(Locator::Css("#image")).await.unwrap().send_keys("cq-test/busybox").await.unwrap();
    let command = r#"sh -c 'echo first; printf "\033[31mred\033[0m\n"; sleep 2; echo second >&2; echo result > /outputs/out.txt'"#;
    c.find(Locator::Css("#command")).await.unwrap().send_keys(command).await.unwrap();
    c.find(Locator::Css("#run")).await.unwrap().click().await.unwrap();

    // The first line shows while the job still runs.
    let state_then = until("the first log line", || async {
        let log = text(&c, "#log").await;
        if log.contains("first") { Some(text(&c, "#state").await) } else { None }
    })
    .await;
    assert_eq!(state_then, "running", "the line arrived before the job finished");
    until("success", || async { (text(&c, "#state").await == "succeeded").then_some(()) }).await;
    let red = script(
        &c,
        "return [...document.querySelectorAll('#log span[style]')].map(s => [s.textContent, s.style.color]);",
    )
    .await;
    assert_eq!(red, json!([["red", "rgb(255, 123, 114)"]]), "ANSI colours are rendered");
    let log = text(&c, "#log").await;
    assert!(log.contains("second"), "{log}");
    let stderr = script(&c, "return document.querySelector('#log .stderr').textContent").await;
    assert_eq!(stderr, json!("second\n"), "stderr is told apart");
    let href = until("the output link", || async {
        let link = c.find(Locator::Css("a.output-link")).await.ok()?;
        link.attr("href").await.ok().flatten()
    })
    .await;
    let body = reqwest::get(format!("{url}{href}")).await.unwrap().text().await.unwrap();
    assert_eq!(body, "result\n");
    assert!(text(&c, "#details").await.contains("exit code 0"));
    screenshot("ui-job-view.png", &c.screenshot().await.unwrap());

    let delays = script(&c, "return window.cq.lineDelays").await;
    let mut delays: Vec<f64> = delays.as_array().unwrap().iter().map(|d| d.as_f64().unwrap()).collect();
    delays.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "log line printed in the container → shown in the page: p50 {} ms, max {} ms over {} lines",
        percentile(&delays, 0.5),
        percentile(&delays, 1.0),
        delays.len()
    );

    c.find(Locator::Css(".tab[data-view=queue]")).await.unwrap().click().await.unwrap();
    let rows = until("the queue's jobs", || async {
        let n = script(&c, "return document.querySelectorAll('#jobs tbody tr').length").await.as_u64()?;
        (n >= 1).then_some(n)
    })
    .await;
    assert_eq!(rows, 1);
    let workers = text(&c, "#workers tbody").await;
    assert!(workers.contains("0 / "), "{workers}");
    assert!(script(&c, "return document.querySelector('#no-worker').hidden").await == json!(true));
    screenshot("ui-queue-view.png", &c.screenshot().await.unwrap());
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_page_drives_the_iframe_over_post_message() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &[]);
    let (_driver, c) = browser().await;
    c.goto(&format!("{url}/ui/demo.html#auto")).await.unwrap();
    let received = until("the finish message", || async {
        let v = script(&c, "return window.received || []").await;
        v.as_array()?.iter().any(|m| m["type"] == "cq:finished").then_some(v)
    })
    .await;
    let types: Vec<&str> = received.as_array().unwrap().iter().map(|m| m["type"].as_str().unwrap()).collect();
    assert_eq!(types[0], "cq:ready", "{types:?}");
    assert!(types.contains(&"cq:submitted"), "{types:?}");
    assert!(
        received.as_array().unwrap().iter().any(|m| m["type"] == "cq:state" && m["state"] == "running"),
        "{received}"
    );
    let finished = received.as_array().unwrap().iter().find(|m| m["type"] == "cq:finished").unwrap();
    assert_eq!(finished["reason"], "succeeded", "{finished}");
    assert_eq!(finished["outputs"][0]["path"], "count.txt");
    let output = reqwest::get(finished["outputs"][0]["url"].as_str().unwrap()).await.unwrap().text().await.unwrap();
    assert_eq!(output, "26 /inputs/note.txt\n", "the host's input reached the job");
    screenshot("ui-demo-host.png", &c.screenshot().await.unwrap());
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_resume_after_dropped_sockets_without_gap_or_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &[]);
    let (_driver, c) = browser().await;
    let job = json!({ "image": "cq-test/busybox",
        "command": ["sh", "-c", "for i in $(seq 1 60); do echo line $i; sleep 0.05; done"] });
    let hash = format!("queue=local&autostart=1&job={}", urlencode(&job.to_string()));
    c.goto(&format!("{url}/#{hash}")).await.unwrap();
    for n in [5, 25] {
        until("some lines", || async {
            let count = script(&c, "return window.cq.job.lines.length").await.as_u64()?;
            (count >= n).then_some(())
        })
        .await;
        script(&c, "window.cq.dropConnection()").await;
    }
    until("success", || async { (text(&c, "#state").await == "succeeded").then_some(()) }).await;
    until("the last line", || async {
        let n = script(&c, "return window.cq.job.lines.length").await.as_u64()?;
        (n >= 60).then_some(())
    })
    .await;
    let lines = script(&c, "return window.cq.job.lines.map(l => l.text)").await;
    let expected: Vec<String> = (1..=60).map(|i| format!("line {i}\n")).collect();
    assert_eq!(lines, json!(expected), "every line once, in order");
    assert_eq!(text(&c, "#conn").await, "live");
    c.close().await.unwrap();
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Serves `page` as HTML on 127.0.0.1 at a port of its own (so another origin than the
/// broker's) from a thread; returns the port.
fn host_page(page: String) -> u16 {
    host_page_on(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), page)
}

/// [`host_page`] on a listener bound earlier.
fn host_page_on(listener: std::net::TcpListener, page: String) -> u16 {
    use std::io::{Read, Write};
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    port
}

/// A host page on its own origin that frames the broker's page and runs a job in it.
fn embedding_page(broker: &str) -> String {
    format!(
        r#"<!doctype html><iframe id="cq" src="{broker}/#queue=local"></iframe><script>
window.received = [];
const frame = document.querySelector('#cq');
window.addEventListener('message', (ev) => {{
  if (ev.source !== frame.contentWindow) return;
  window.received.push(ev.data);
  if (ev.data.type === 'cq:ready') {{
    const send = (m) => frame.contentWindow.postMessage(m, '{broker}');
    send({{ type: 'cq:setJob', definition: {{ image: 'cq-test/busybox', command: ['sh', '-c', 'echo embedded'] }} }});
    send({{ type: 'cq:run' }});
  }}
}});
</script>"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_allowed_origin_can_run_a_job_through_the_embedded_page() {
    // The same host page, once on an origin the broker lists and once on one it does not.
    // Bound first, so the broker can be told its origin before the page exists.
    let listed_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listed = format!("http://127.0.0.1:{}", listed_listener.local_addr().unwrap().port());
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &["--allow-origin", &listed]);
    let (_driver, c) = browser().await;

    let other = host_page(embedding_page(&url));
    c.goto(&format!("http://127.0.0.1:{other}/")).await.unwrap();
    let frame = c.find(Locator::Css("#cq")).await.unwrap();
    frame.enter_frame().await.unwrap();
    until("the page ignoring the foreign host", || async {
        let ignored = script(&c, "return window.cq && window.cq.ignoredOrigins").await;
        ignored.as_array().is_some_and(|a| a.len() >= 2).then_some(())
    })
    .await;
    c.enter_parent_frame().await.unwrap();
    let jobs: Value = reqwest::get(format!("{url}/q/local/j")).await.unwrap().json().await.unwrap();
    assert_eq!(jobs["jobs"], json!([]), "nothing was submitted for a foreign host");
    // Nothing but `cq:ready` and the metapage handshake's opening request, which carry no data.
    let received = script(&c, "return window.received.filter((m) => m.method !== 'SetupIframeClientRequest')").await;
    assert_eq!(received, json!([{ "type": "cq:ready" }]), "the foreign host hears nothing but ready");

    // The listed origin: the host page on that port runs the job and hears it finish.
    host_page_on(listed_listener, embedding_page(&url));
    c.goto(&format!("{listed}/")).await.unwrap();
    let received = until("the finish message", || async {
        let v = script(&c, "return window.received || []").await;
        v.as_array()?.iter().any(|m| m["type"] == "cq:finished").then_some(v)
    })
    .await;
    let finished = received.as_array().unwrap().iter().find(|m| m["type"] == "cq:finished").unwrap();
    assert_eq!(finished["reason"], "succeeded", "{finished}");
    c.close().await.unwrap();
}
