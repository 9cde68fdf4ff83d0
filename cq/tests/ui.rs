//! The browser page in a real headless Chromium (through chromedriver), against `cq dev` with
//! its real worker and Docker: run a job from the form and watch its log arrive live, fetch an
//! output, drive the page from a host page over postMessage, and survive dropped sockets
//! without a gap or a repeated log line. Screenshots land in the test's temporary directory.

mod support;
use support::{browser, cq_dev_with, cq_worker};

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
        "return [...document.querySelectorAll('#log .tx span[style]')].map(s => [s.textContent, s.style.color]);",
    )
    .await;
    assert_eq!(red, json!([["red", "rgb(255, 123, 114)"]]), "ANSI colours are rendered");
    let log = text(&c, "#log").await;
    assert!(log.contains("second"), "{log}");
    // The raw log and its downloads: with or without the ANSI codes.
    let raw = script(&c, "return [window.cq.log.text({ ansi: true }), window.cq.log.text()]").await;
    assert!(raw[0].as_str().unwrap().contains("\u{1b}[31mred\u{1b}[0m\n"), "{raw}");
    assert!(raw[1].as_str().unwrap().contains("first\nred\n"), "{raw}");
    let stderr = script(&c, "return document.querySelector('#log .stderr .tx').textContent").await;
    assert_eq!(stderr, json!("second"), "stderr is told apart");
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
        let started = Instant::now();
        while script(&c, "return window.cq.log.length").await.as_u64().unwrap_or(0) < n {
            if started.elapsed() >= WAIT {
                let shown = page_shows(&c).await;
                let queue: Value = reqwest::get(format!("{url}/q/local")).await.unwrap().json().await.unwrap();
                panic!("timed out waiting for {n} lines; the page shows {shown}; the queue is {queue}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        script(&c, "window.cq.dropConnection()").await;
    }
    until("success", || async { (text(&c, "#state").await == "succeeded").then_some(()) }).await;
    until("the last line", || async {
        let n = script(&c, "return window.cq.log.length").await.as_u64()?;
        (n >= 60).then_some(())
    })
    .await;
    let lines = script(&c, "return window.cq.log.texts").await;
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

/// Opens a host page on another origin framing `src` at 400×300, and enters the frame.
async fn enter_small_embed(c: &Client, src: &str) {
    let page = format!(
        r#"<!doctype html><body style="margin:0"><iframe id="cq" style="width:400px;height:300px;border:0"
        src="{src}"></iframe>"#
    );
    let port = host_page(page);
    c.goto(&format!("http://127.0.0.1:{port}/")).await.unwrap();
    c.find(Locator::Css("#cq")).await.unwrap().enter_frame().await.unwrap();
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

/// Types `text` into the field `css`, replacing what it held.
async fn fill(c: &Client, css: &str, text: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(text).await.unwrap();
}

/// Clicks the element `css`. An element the page redraws between finding and clicking it (a
/// queue row whose job changed) is stale: it is found again.
async fn click(c: &Client, css: &str) {
    until(&format!("a click on {css}"), || async {
        let e = c.find(Locator::Css(css)).await.ok()?;
        match e.click().await {
            Ok(()) => Some(()),
            Err(err) if format!("{err:?}").contains("StaleElementReference") => None,
            Err(err) => panic!("clicking {css}: {err}"),
        }
    })
    .await
}

/// Waits for the job on screen to be in the state `want`. On a timeout it says what the page
/// showed instead (state, details, error, connection), so a failure explains itself.
async fn state_is(c: &Client, want: &str) {
    let started = Instant::now();
    while text(c, "#state").await != want {
        if started.elapsed() >= WAIT {
            let shown = page_shows(c).await;
            panic!("timed out waiting for the state {want}; the page shows {shown}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// What the page shows (state, details, error, connection, job, log lines), with a
/// screenshot, for a wait that timed out to explain itself.
async fn page_shows(c: &Client) -> Value {
    screenshot("ui-timeout.png", &c.screenshot().await.unwrap_or_default());
    // Written not to fail where the page's script never ran (no `window.cq`): then the
    // documents and fetches it made, and the console, say what it was missing.
    let mut shows = script(
        c,
        "const t = s => (document.querySelector(s) || {}).textContent; \
         const cq = window.cq; \
         return { state: t('#state'), details: t('#details'), error: t('#form-error'), \
         connection: t('#conn'), job: (cq && cq.job.id) || null, lines: cq && cq.log ? cq.log.length : null, \
         script_ran: !!cq, url: location.href, ready: document.readyState, \
         fetched: performance.getEntriesByType('resource').map(e => \
           `${e.name.replace(location.origin, '')} ${e.responseStatus ?? '?'} ${Math.round(e.duration)}ms`) };",
    )
    .await;
    shows["console"] = json!(support::browser_console(c).await);
    shows
}

/// The page wrote no warning or error to the console (an exception, a failed load) so far.
async fn console_is_clean(c: &Client) {
    let console = support::browser_console(c).await;
    let bad: Vec<&String> = console.iter().filter(|l| l.starts_with("SEVERE") || l.starts_with("WARNING")).collect();
    assert!(bad.is_empty(), "the page's console: {bad:#?}");
}

async fn job_view(url: &str, id: &str) -> Value {
    reqwest::get(format!("{url}/j/{id}")).await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_job_in_a_row_shows_its_own_state_and_the_form_is_the_job_on_screen() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &[]);
    let (_driver, c) = browser().await;
    c.goto(&format!("{url}/#queue=local")).await.unwrap();
    fill(&c, "#image", "cq-test/busybox").await;
    fill(&c, "#command", "sh -c 'echo first; exit 3'").await;
    click(&c, "#run").await;
    state_is(&c, "failed").await;
    let first = script(&c, "return window.cq.job.id").await.as_str().unwrap().to_string();
    let details = text(&c, "#details").await;
    assert!(details.contains("exit code 3"), "{details}");
    assert!(!details.contains("exited with code"), "the exit code is said once: {details}");
    until("one line counted", || async { (text(&c, "#log-count").await == "1 line").then_some(()) }).await;

    // A second job: its own state, its own log, cancellable, and its duration ticks.
    fill(&c, "#command", "sh -c 'for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 1; done'").await;
    click(&c, "#run").await;
    until("the second job's first line", || async {
        let texts = script(&c, "return window.cq.log.texts").await;
        texts.as_array()?.iter().any(|t| t == "tick 1\n").then_some(())
    })
    .await;
    assert_eq!(text(&c, "#state").await, "running", "the new job's state, not the old one's");
    assert_ne!(text(&c, "#phase").await, "running", "the state is said once");
    let details = text(&c, "#details").await;
    assert!(!details.contains("exit code"), "{details}");
    assert!(!text(&c, "#job-link").await.starts_with(&first[..12]));
    let texts = script(&c, "return window.cq.log.texts").await;
    assert!(!texts.as_array().unwrap().iter().any(|t| t == "first\n"), "the old job's log is gone: {texts}");
    assert_eq!(script(&c, "return document.querySelector('#cancel').disabled").await, json!(false));
    let before = text(&c, "#details").await;
    until("the duration to tick", || async {
        let now = text(&c, "#details").await;
        (now != before && text(&c, "#state").await == "running").then_some(())
    })
    .await;
    click(&c, "#cancel").await;
    state_is(&c, "cancelled").await;
    console_is_clean(&c).await;
    let second = script(&c, "return window.cq.job.id").await.as_str().unwrap().to_string();

    // A link to the first job: the form shows its definition, and Re-run runs it (not the form).
    c.goto(&format!("{url}/#queue=local&jobId={first}")).await.unwrap();
    state_is(&c, "failed").await;
    until("the job's definition in the form", || async {
        let image = script(&c, "return document.querySelector('#image').value").await;
        (image == "cq-test/busybox").then_some(())
    })
    .await;
    let command = script(&c, "return document.querySelector('#command').value").await;
    assert_eq!(command, json!("sh -c 'echo first; exit 3'"));
    let attempts = job_view(&url, &first).await["attempt"].as_u64().unwrap();
    click(&c, "#rerun").await;
    until("the re-run", || async {
        let view = job_view(&url, &first).await;
        (view["attempt"].as_u64()? > attempts && view["state"] == "finished").then_some(())
    })
    .await;
    state_is(&c, "failed").await;
    assert_eq!(script(&c, "return window.cq.job.id").await, json!(first));

    // Opened from the queue by keyboard while the form holds another job: the form follows.
    fill(&c, "#command", "echo something else").await;
    click(&c, ".tab[data-view=queue]").await;
    let described = until("the queue's image and command", || async {
        let t = text(&c, "#jobs tbody").await;
        (t.contains("cq-test/busybox · sh -c")).then_some(t)
    })
    .await;
    let open = until("the second job's row", || async {
        let links = c.find_all(Locator::Css("#jobs tbody a.job-open")).await.ok()?;
        for b in links {
            if b.text().await.ok()? == second[..12] {
                return Some(b);
            }
        }
        None
    })
    .await;
    assert!(described.contains("cancelled") && described.contains("failed"), "{described}");
    open.send_keys("\u{e007}").await.unwrap(); // Enter
    state_is(&c, "cancelled").await;
    until("the form to show the opened job", || async {
        let command = script(&c, "return document.querySelector('#command').value").await;
        command.as_str()?.contains("tick").then_some(())
    })
    .await;
    screenshot("ui-second-job.png", &c.screenshot().await.unwrap());
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_viewer_holds_a_long_live_log_and_finds_and_links_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &[]);
    let (_driver, c) = browser().await;
    // A section, then 20,000 lines in bursts of 1,000: `line k` is line k + 3 of the log.
    let command = "echo ::group::setup; echo inside; echo ::endgroup::; \
        for b in $(seq 0 19); do seq $((b*1000+1)) $((b*1000+1000)) | sed 's/^/line /'; sleep 0.25; done";
    let job = json!({ "image": "cq-test/busybox", "command": ["sh", "-c", command] });
    let hash = format!("queue=local&autostart=1&job={}", urlencode(&job.to_string()));
    c.goto(&format!("{url}/#{hash}")).await.unwrap();
    until("500 lines", || async { (script(&c, "return window.cq.log.length").await.as_u64()? >= 500).then_some(()) })
        .await;
    assert_eq!(text(&c, "#state").await, "running");
    // Following: the newest line drawn is in view while lines arrive.
    until("the newest line in view", || async {
        let v = script(
            &c,
            "const l = window.cq.log; const rows = l.el.querySelectorAll('.log-row'); const r = rows[rows.length - 1]; \
             if (!r) return false; const a = r.getBoundingClientRect(), b = l.el.getBoundingClientRect(); \
             return l.follow && Number(r.dataset.line) > 500 && a.bottom <= b.bottom + 1 && a.top >= b.top;",
        )
        .await;
        (v == json!(true)).then_some(())
    })
    .await;

    // The reader scrolls back to line 100 while the job streams on: line 100 stays in view.
    script(&c, "const l = window.cq.log; l.el.scrollTop = 99 * l.rowHeight;").await;
    until("the follow toggle to turn off", || async {
        let pressed = script(&c, "return document.querySelector('#log-follow').getAttribute('aria-pressed')").await;
        (pressed == "false").then_some(())
    })
    .await;
    let top_then = script(&c, "return window.cq.log.topLine()").await;
    assert_eq!(top_then, json!(100));
    until("15,000 more lines", || async {
        (script(&c, "return window.cq.log.length").await.as_u64()? >= 15_000).then_some(())
    })
    .await;
    let (top, in_view) = until("a drawn frame", || async {
        let v = script(
            &c,
            "const l = window.cq.log; const row = l.el.querySelector('[data-line=\"100\"]'); \
             if (!row) return null; const a = row.getBoundingClientRect(), b = l.el.getBoundingClientRect(); \
             return [l.topLine(), a.top >= b.top - 1 && a.bottom <= b.bottom + 1];",
        )
        .await;
        let a = v.as_array()?.clone();
        Some((a[0].clone(), a[1].clone()))
    })
    .await;
    assert_eq!((top, in_view), (json!(100), json!(true)), "line 100 stayed where the reader left it");
    let rows = script(&c, "return document.querySelectorAll('#log .log-row').length").await.as_u64().unwrap();
    assert!(rows < 200, "only the rows in view are in the page: {rows}");
    state_is(&c, "succeeded").await;
    until("every line", || async {
        (script(&c, "return window.cq.log.length").await.as_u64()? == 20_003).then_some(())
    })
    .await;
    assert_eq!(text(&c, "#log-count").await, "20,003 lines");

    // Search finds a line that is not drawn, and goes to it.
    let drawn = script(&c, "return Boolean(document.querySelector('#log [data-line=\"12348\"]'))").await;
    assert_eq!(drawn, json!(false));
    fill(&c, "#log-search", "line 12345").await;
    // After the pause in typing, the first match is shown.
    until("one match, shown", || async { (text(&c, "#log-matches").await == "1 of 1 match").then_some(()) }).await;
    let current = until("the match drawn", || async {
        let v =
            script(&c, "const r = document.querySelector('#log .log-row.current'); return r && r.dataset.line").await;
        v.as_str().map(str::to_string)
    })
    .await;
    assert_eq!(current, "12348");
    click(&c, "#log-next").await;
    assert_eq!(text(&c, "#log-matches").await, "1 of 1 match", "next wraps around to the only match");

    // A link to a line scrolls to it and highlights it, on a fresh page of the finished job.
    let id = script(&c, "return window.cq.job.id").await.as_str().unwrap().to_string();
    c.goto(&format!("{url}/#queue=local&jobId={id}&line=5000")).await.unwrap();
    let highlighted = until("the linked line", || async {
        let v = script(
            &c,
            "const l = window.cq && window.cq.log; const r = l && l.el.querySelector('.log-row.hl'); if (!r) return null; \
             const a = r.getBoundingClientRect(), b = l.el.getBoundingClientRect(); \
             return [r.dataset.line, a.top >= b.top && a.bottom <= b.bottom, l.length];",
        )
        .await;
        v.as_array().map(|a| a.to_vec())
    })
    .await;
    assert_eq!(highlighted, vec![json!("5000"), json!(true), json!(20_003)], "the whole log, over HTTP");
    // Clicking a line number links to that line.
    let href = script(
        &c,
        "const a = document.querySelector('#log .log-row[data-line=\"5001\"] .ln'); a.click(); return location.hash",
    )
    .await;
    assert!(href.as_str().unwrap().ends_with("line=5001"), "{href}");

    // The section folds; timestamps show on demand.
    script(&c, "window.cq.log.setFollow(false); window.cq.log.el.scrollTop = 0;").await;
    let fold = until("the section's header", || async { c.find(Locator::Css("#log button.fold")).await.ok() }).await;
    assert!(fold.text().await.unwrap().contains("setup"));
    fold.click().await.unwrap();
    let after = until("the folded section", || async {
        let v =
            script(&c, "return [...document.querySelectorAll('#log .log-row')].slice(0, 2).map(r => r.dataset.line)")
                .await;
        (v == json!(["1", "4"])).then_some(v)
    })
    .await;
    assert_eq!(after, json!(["1", "4"]));
    let folded = until("the folded header", || async { c.find(Locator::Css("#log button.fold")).await.ok() }).await;
    assert_eq!(folded.text().await.unwrap(), "▸ setup (1 line)", "the `::endgroup::` line is not counted");
    script(&c, "document.querySelector('#log button.fold').click()").await;
    let end = until("the section's end drawn", || async {
        let v = script(&c, "const r = document.querySelector('#log .log-row[data-line=\"3\"]'); return r && [r.className, r.querySelector('.tx').textContent]").await;
        v.as_array().map(|a| a.to_vec())
    })
    .await;
    assert!(end[0].as_str().unwrap().contains("endgroup") && end[1] == json!(""), "{end:?}");
    click(&c, "#log-times").await;
    let stamp = until("timestamps", || async {
        let v =
            script(&c, "const t = document.querySelector('#log .log-row .ts'); return (t && t.textContent) || null")
                .await;
        v.as_str().map(str::to_string)
    })
    .await;
    assert!(stamp.len() == 12 && stamp.as_bytes()[2] == b':', "{stamp}");
    screenshot("ui-log-viewer.png", &c.screenshot().await.unwrap());
    c.close().await.unwrap();
}

/// A host page that runs job A, then B (cancelled once it runs), then A again (cached), and
/// records every message of the page.
fn three_jobs_page(broker: &str) -> String {
    format!(
        r#"<!doctype html><iframe id="cq" src="{broker}/#queue=local" style="width:800px;height:500px"></iframe><script>
window.received = [];
const frame = document.querySelector('#cq');
const send = (m) => frame.contentWindow.postMessage(m, '{broker}');
const a = {{ image: 'cq-test/busybox', command: ['sh', '-c', 'echo a'] }};
const b = {{ image: 'cq-test/busybox', command: ['sh', '-c', 'for i in 1 2 3 4 5 6 7 8; do echo b $i; sleep 1; done'] }};
let step = 0;
window.addEventListener('message', (ev) => {{
  if (ev.source !== frame.contentWindow || !ev.data.type) return;
  const m = ev.data;
  window.received.push(m);
  if (m.type === 'cq:ready') {{ send({{ type: 'cq:setJob', definition: a }}); send({{ type: 'cq:run' }}); }}
  if (m.type === 'cq:finished' && step === 0) {{ step = 1; send({{ type: 'cq:setJob', definition: b }}); send({{ type: 'cq:run' }}); }}
  if (m.type === 'cq:state' && m.state === 'running' && step === 1) {{ step = 2; send({{ type: 'cq:cancel' }}); }}
  if (m.type === 'cq:finished' && step === 2) {{ step = 3; send({{ type: 'cq:setJob', definition: a }}); send({{ type: 'cq:run' }}); }}
}});
</script>"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_hears_every_state_and_one_finish_per_job_cached_included() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &["--allow-origin", &host]);
    let (_driver, c) = browser().await;
    host_page_on(listener, three_jobs_page(&url));
    c.goto(&format!("{host}/")).await.unwrap();
    let received = until("three finishes", || async {
        let v = script(&c, "return window.received || []").await;
        (v.as_array()?.iter().filter(|m| m["type"] == "cq:finished").count() >= 3).then_some(v)
    })
    .await;
    let messages = received.as_array().unwrap();
    let submitted: Vec<&Value> = messages.iter().filter(|m| m["type"] == "cq:submitted").collect();
    assert_eq!(submitted.len(), 3, "{received}");
    let (a, b) = (submitted[0]["jobId"].clone(), submitted[1]["jobId"].clone());
    assert_eq!(submitted[2]["jobId"], a);
    assert_eq!(submitted[2]["outcome"], "cached");
    let finished: Vec<(Value, Value, Value)> = messages
        .iter()
        .filter(|m| m["type"] == "cq:finished")
        .map(|m| (m["jobId"].clone(), m["reason"].clone(), m["cached"].clone()))
        .collect();
    assert_eq!(
        finished,
        vec![
            (a.clone(), json!("succeeded"), json!(false)),
            (b.clone(), json!("cancelled"), json!(false)),
            (a.clone(), json!("succeeded"), json!(true)),
        ],
        "{received}"
    );
    let b_states: Vec<&Value> =
        messages.iter().filter(|m| m["type"] == "cq:state" && m["jobId"] == b).map(|m| &m["state"]).collect();
    assert!(b_states.contains(&&json!("running")) && b_states.contains(&&json!("finished")), "{b_states:?}");
    // The page says the result came from the cache. No more finishes arrive.
    let frame = c.find(Locator::Css("#cq")).await.unwrap();
    frame.enter_frame().await.unwrap();
    until("the cached result said", || async { text(&c, "#details").await.contains("cached result").then_some(()) })
        .await;
    assert_eq!(text(&c, "#state").await, "succeeded");
    c.enter_parent_frame().await.unwrap();
    let again = script(&c, "return window.received.filter(m => m.type === 'cq:finished').length").await;
    assert_eq!(again, json!(3));
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_asked_for_while_the_broker_is_away_shows_only_the_new_job() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &[]);
    let (_driver, c) = browser().await;
    c.goto(&format!("{url}/#queue=local")).await.unwrap();
    fill(&c, "#image", "cq-test/busybox").await;
    fill(&c, "#command", "sh -c 'echo a1; echo a2'").await;
    click(&c, "#run").await;
    state_is(&c, "succeeded").await;
    until("two lines", || async { (text(&c, "#log-count").await == "2 lines").then_some(()) }).await;

    script(&c, "window.cq.holdConnection()").await;
    until("the page to see the broker gone", || async { (text(&c, "#conn").await != "live").then_some(()) }).await;
    fill(&c, "#command", r#"sh -c 'echo b1; printf "\000\001\002" > /outputs/b.bin'"#).await;
    click(&c, "#run").await;
    until("the old job to leave the screen", || async {
        let hidden = script(&c, "return document.querySelector('#status').hidden").await;
        (hidden == json!(true)).then_some(())
    })
    .await;
    assert_eq!(script(&c, "return window.cq.log.length").await, json!(0));
    script(&c, "window.cq.releaseConnection()").await;
    state_is(&c, "succeeded").await;
    until("the new job's line", || async { (text(&c, "#log-count").await == "1 line").then_some(()) }).await;
    let texts = script(&c, "return window.cq.log.texts").await;
    assert_eq!(texts, json!(["b1\n"]), "only the new job's log");
    let rows = script(&c, "return document.querySelectorAll('#log .log-row').length").await;
    assert_eq!(rows, json!(1), "as many rows as lines counted");

    // A binary output is not previewed as text.
    let preview = until("the preview button", || async { c.find(Locator::Css("#outputs button")).await.ok() }).await;
    preview.click().await.unwrap();
    until("the binary notice", || async { text(&c, "#preview").await.contains("binary file").then_some(()) }).await;
    let jobs: Value = reqwest::get(format!("{url}/q/local/j")).await.unwrap().json().await.unwrap();
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 2, "{jobs}");

    // A job on a queue no worker serves says why it waits.
    script(&c, "document.querySelector('#queue').value = 'nowhere'").await;
    click(&c, "#run").await;
    let details = until("the waiting reason", || async {
        let d = text(&c, "#details").await;
        d.contains("waiting: ").then_some(d)
    })
    .await;
    assert!(details.contains("nowhere"), "{details}");
    assert_eq!(text(&c, "#state").await, "queued");
    click(&c, "#cancel").await;
    state_is(&c, "cancelled").await;
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_embed_is_mostly_log() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &[]);
    let (_driver, c) = browser().await;
    let job = json!({ "image": "cq-test/busybox", "command": ["sh", "-c", "seq 1 50"] });
    enter_small_embed(&c, &format!("{url}/#queue=local&autostart=1&job={}", urlencode(&job.to_string()))).await;
    state_is(&c, "succeeded").await;
    let visible = until("the log drawn", || async {
        let v = script(
            &c,
            "window.cq.log.setFollow(false); window.cq.log.el.scrollTop = 0; \
             const b = window.cq.log.el.getBoundingClientRect(); \
             return [...document.querySelectorAll('#log .log-row')].filter(r => { \
               const a = r.getBoundingClientRect(); return a.top >= b.top - 0.5 && a.bottom <= b.bottom + 0.5; }).length;",
        )
        .await;
        v.as_u64().filter(|n| *n > 0)
    })
    .await;
    assert!(visible >= 10, "{visible} log lines in view at 400×300");
    let form_hidden = script(&c, "return getComputedStyle(document.querySelector('#job-form')).display").await;
    assert_eq!(form_hidden, json!("none"), "the form is folded into its summary");
    assert!(text(&c, "#summary-text").await.contains("cq-test/busybox"));
    click(&c, "#edit-toggle").await;
    let shown = script(&c, "return getComputedStyle(document.querySelector('#job-form')).display").await;
    assert_ne!(shown, json!("none"));
    c.enter_parent_frame().await.unwrap();
    screenshot("ui-small-embed.png", &c.screenshot().await.unwrap());
    c.close().await.unwrap();
}

async fn displayed(c: &Client, css: &str) -> bool {
    let js = format!(
        "const e = document.querySelector('{css}'); return Boolean(e) && e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden'"
    );
    script(c, &js).await == json!(true)
}

async fn hash(c: &Client) -> String {
    script(c, "return location.hash").await.as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_embed_runs_and_cancels_next_to_its_summary() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &[]);
    let (_driver, c) = browser().await;
    let job = json!({ "image": "cq-test/busybox", "command": ["sh", "-c", "echo tick; sleep 60"] });
    enter_small_embed(&c, &format!("{url}/#queue=local&job={}", urlencode(&job.to_string()))).await;
    // Folded: Run is beside the summary, no need to open the form.
    until("the summary's Run", || async { displayed(&c, "#sum-run").await.then_some(()) }).await;
    assert!(!displayed(&c, "#job-form").await, "the form is folded");
    assert!(!displayed(&c, "#sum-cancel").await, "nothing to cancel yet");
    click(&c, "#sum-run").await;
    state_is(&c, "running").await;
    until("the first line", || async { text(&c, "#log").await.contains("tick").then_some(()) }).await;
    // A running job can be cancelled from the folded view, with its log in view.
    assert!(displayed(&c, "#sum-cancel").await, "Cancel beside the summary while the job runs");
    assert!(displayed(&c, "#log").await);
    click(&c, "#sum-cancel").await;
    state_is(&c, "cancelled").await;
    assert_eq!(text(&c, "#sum-run").await, "Re-run");
    assert!(!displayed(&c, "#sum-cancel").await);

    // Run from the open form: the form folds and the job's status and log show.
    click(&c, "#edit-toggle").await;
    assert!(displayed(&c, "#job-form").await);
    assert!(!displayed(&c, "#log").await, "the open form takes the log's place");
    fill(&c, "#command", "sh -c 'echo second; sleep 60'").await;
    click(&c, "#run").await;
    until("the second job's line", || async { text(&c, "#log").await.contains("second").then_some(()) }).await;
    assert!(!displayed(&c, "#job-form").await, "running folds the form");
    assert!(displayed(&c, "#status").await && displayed(&c, "#log").await);
    assert_eq!(text(&c, "#edit-toggle").await, "edit");
    c.enter_parent_frame().await.unwrap();
    screenshot("ui-small-running.png", &c.screenshot().await.unwrap());
    c.enter_frame(0).await.unwrap();
    click(&c, "#sum-cancel").await;
    state_is(&c, "cancelled").await;
    console_is_clean(&c).await;
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_link_keeps_its_queue_and_back_returns_to_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &[]);
    let (_driver, c) = browser().await;
    // No worker serves `nowhere`: the job stays queued there.
    c.goto(&format!("{url}/#queue=nowhere")).await.unwrap();
    fill(&c, "#image", "cq-test/busybox").await;
    fill(&c, "#command", "echo somewhere").await;
    click(&c, "#run").await;
    state_is(&c, "queued").await;
    let id = script(&c, "return window.cq.job.id").await.as_str().unwrap().to_string();
    let h = hash(&c).await;
    assert!(h.contains(&format!("jobId={id}")) && h.contains("queue=nowhere"), "{h}");

    // A link that names only the job: the page takes the queue from the job's record, and Run
    // there leaves the job where it is.
    c.goto("about:blank").await.unwrap();
    c.goto(&format!("{url}/#jobId={id}")).await.unwrap();
    state_is(&c, "queued").await;
    until("the job's queue in the form", || async {
        (script(&c, "return document.querySelector('#queue').value").await == json!("nowhere")).then_some(())
    })
    .await;
    until("the job's queue in the hash", || async { hash(&c).await.contains("queue=nowhere").then_some(()) }).await;
    until("the job's definition in the form", || async {
        (script(&c, "return document.querySelector('#command').value").await == json!("echo somewhere")).then_some(())
    })
    .await;
    click(&c, "#run").await;
    let outcome = until("the run answered", || async {
        let v = script(&c, "return window.cq.job.outcome").await;
        v.as_str().map(str::to_string)
    })
    .await;
    assert_eq!(outcome, "joined");
    assert_eq!(script(&c, "return window.cq.job.id").await, json!(id));
    assert_eq!(job_view(&url, &id).await["queue"], "nowhere", "the job did not move queues");
    let local: Value = reqwest::get(format!("{url}/q/local")).await.unwrap().json().await.unwrap();
    assert_eq!(local["queued"], 0, "{local}");

    // The URL follows the view; Back returns from a job opened from the queue to the queue.
    click(&c, ".tab[data-view=queue]").await;
    assert!(hash(&c).await.contains("view=queue"));
    let link = until("the job's link", || async { c.find(Locator::Css("#jobs tbody a.job-open")).await.ok() }).await;
    let href = link.attr("href").await.unwrap().unwrap();
    assert!(href.contains(&format!("jobId={id}")) && href.contains("queue=nowhere"), "{href}");
    link.click().await.unwrap();
    until("the job view", || async { displayed(&c, "#view-job").await.then_some(()) }).await;
    assert!(!hash(&c).await.contains("view=queue"));
    c.back().await.unwrap();
    until("the queue view after Back", || async {
        (displayed(&c, "#view-queue").await && !displayed(&c, "#view-job").await).then_some(())
    })
    .await;
    assert!(hash(&c).await.contains("view=queue"));
    c.forward().await.unwrap();
    until("the job view after Forward", || async { displayed(&c, "#view-job").await.then_some(()) }).await;
    // A hash change on the open page switches the view.
    script(&c, "location.hash = '#queue=nowhere&view=queue'").await;
    until("the queue view", || async { displayed(&c, "#view-queue").await.then_some(()) }).await;
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_table_follows_worker_load_and_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &[]);
    let (_driver, c) = browser().await;
    c.goto(&format!("{url}/#queue=local&view=queue")).await.unwrap();
    let idle = until("the worker's row", || async {
        let t = text(&c, "#workers tbody").await;
        t.contains("0 / ").then_some(t)
    })
    .await;
    let http = reqwest::Client::new();
    let submitted: Value = http
        .post(format!("{url}/q/local/j"))
        .json(&json!({ "definition": { "image": "cq-test/busybox", "command": ["sh", "-c", "echo go; sleep 120"] } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = submitted["job"]["id"].as_str().unwrap_or_else(|| panic!("{submitted}")).to_string();
    until("a used slot", || async { text(&c, "#workers tbody").await.contains("1 / ").then_some(()) }).await;
    // The row of the running job stays the same element while its duration ticks.
    let before = until("the running row", || async {
        let v = script(
            &c,
            "const tr = document.querySelector('#jobs tbody tr'); if (!tr || !tr.querySelector('td.duration').textContent) return null; \
             window.kept = tr; return tr.querySelector('td.duration').textContent;",
        )
        .await;
        v.as_str().map(str::to_string)
    })
    .await;
    let started = Instant::now();
    while script(&c, "return window.kept.querySelector('td.duration').textContent").await.as_str() == Some(&before) {
        if started.elapsed() >= WAIT {
            // Say whether the row was replaced (the kept one then stops ticking) or the
            // duration stopped, and what the table shows now.
            let rows = script(
                &c,
                "return { keptConnected: window.kept.isConnected, kept: window.kept.textContent, \
                 rows: [...document.querySelectorAll('#jobs tbody tr')].map(r => r.textContent) };",
            )
            .await;
            let shown = page_shows(&c).await;
            panic!("timed out waiting for the duration to tick from {before:?}: {rows}; the page shows {shown}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let same =
        script(&c, "return document.querySelector('#jobs tbody tr') === window.kept && window.kept.isConnected").await;
    assert_eq!(same, json!(true), "the row was updated in place");
    // The job runs until cancelled, so its duration cannot stop ticking before the test looks.
    let r = http.post(format!("{url}/j/{id}/cancel")).json(&json!({})).send().await.unwrap();
    assert!(r.status().is_success(), "cancel: {}", r.status());
    until("the slot freed", || async {
        let t = text(&c, "#workers tbody").await;
        (t == idle && job_view(&url, &id).await["state"] == "finished").then_some(())
    })
    .await;
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_queue_view_fits_and_leads_back_to_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &[]);
    let (_driver, c) = browser().await;
    let http = reqwest::Client::new();
    let submitted: Value = http
        .post(format!("{url}/q/local/j"))
        .json(&json!({ "definition": { "image": "cq-test/busybox", "command": ["sh", "-c", "echo a fairly long command line to describe"] } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = submitted["job"]["id"].as_str().unwrap().to_string();
    enter_small_embed(&c, &format!("{url}/#queue=local&view=queue")).await;
    until("the job's row, described", || async {
        text(&c, "#jobs tbody").await.contains("cq-test/busybox").then_some(())
    })
    .await;
    let width = script(&c, "return document.querySelector('#jobs').getBoundingClientRect().width").await;
    assert!(width.as_f64().unwrap() <= 400.0, "the table fits the frame: {width}");
    assert!(!displayed(&c, "#jobs td:nth-child(6)").await, "the worker column folds away");
    c.enter_parent_frame().await.unwrap();
    screenshot("ui-small-queue.png", &c.screenshot().await.unwrap());
    c.enter_frame(0).await.unwrap();
    click(&c, "#jobs tbody a.job-open").await;
    until("the job", || async { (script(&c, "return window.cq.job.id").await == json!(id)).then_some(()) }).await;
    assert!(displayed(&c, "#to-queue").await, "a way back to the queue");
    click(&c, "#to-queue").await;
    until("the queue again", || async { displayed(&c, "#view-queue").await.then_some(()) }).await;
    // No request for a favicon that is not there.
    assert_eq!(
        script(&c, "return document.querySelector('link[rel=icon]').getAttribute('href')").await,
        json!("data:,")
    );
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_attempt_is_set_apart_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &["--no-worker"]);
    let first =
        cq_worker(&url, &dir.path().join("wa"), &["--worker-id", "wa", "--slots", "1", "--drain-timeout", "1s"]);
    let (_driver, c) = browser().await;
    c.goto(&format!("{url}/#queue=local")).await.unwrap();
    fill(&c, "#image", "cq-test/busybox").await;
    fill(&c, "#command", "sh -c 'for i in $(seq 0 40); do echo beat $i; sleep 0.25; done'").await;
    click(&c, "#run").await;
    until("beat 2", || async { text(&c, "#log").await.contains("beat 2").then_some(()) }).await;
    // The worker stops: after its drain timeout it hands the job back, and another worker runs
    // it again from the start.
    let killed = std::process::Command::new("kill").args(["-TERM", &first.id().to_string()]).status().unwrap();
    assert!(killed.success());
    state_is(&c, "queued").await;
    let _second = cq_worker(&url, &dir.path().join("wb"), &["--worker-id", "wb", "--slots", "1"]);
    let (line, attempt) = until("the second attempt's first line", || async {
        let v = script(&c, "const l = window.cq.log; const m = [...l.attemptAt][0]; return m && l.texts[m[0]] !== undefined ? m : null").await;
        let a = v.as_array()?.clone();
        Some((a[0].as_u64()?, a[1].as_u64()?))
    })
    .await;
    assert_eq!(attempt, 2);
    let texts = script(&c, &format!("return window.cq.log.texts.slice({}, {})", line - 1, line + 1)).await;
    assert_eq!(texts[1], "beat 0\n", "{texts}");
    // The first attempt's log ends with the broker's line saying why it did not finish.
    assert!(texts[0].as_str().unwrap().starts_with("cq: attempt 1 did not finish (released by its worker)"), "{texts}");
    // The separator is drawn on that line.
    script(&c, &format!("window.cq.log.goToLine({})", line + 1)).await;
    let row = until("the separator drawn", || async {
        let v = script(
            &c,
            &format!(
                "const r = document.querySelector('#log .log-row[data-line=\"{}\"]'); return r && [r.className, r.querySelector('.tx').dataset.attempt || '']",
                line + 1
            ),
        )
        .await;
        v.as_array().map(|a| a.to_vec())
    })
    .await;
    assert!(row[0].as_str().unwrap().contains("attempt-start"), "{row:?}");
    assert_eq!(row[1], "attempt 2");
    screenshot("ui-second-attempt.png", &c.screenshot().await.unwrap());
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_show_below_the_log_and_the_form_keeps_its_shape() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &[]);
    let (_driver, c) = browser().await;
    c.goto(&format!("{url}/#queue=local")).await.unwrap();
    // The form: building hides the image; a text input keeps its remove button on its row; the
    // file picker does not say "No file chosen" (the native control is transparent).
    click(&c, "#use-build").await;
    assert!(!displayed(&c, "#image").await, "no image to give when building");
    click(&c, "#use-build").await;
    assert!(displayed(&c, "#image").await);
    click(&c, "#more summary").await;
    click(&c, "#add-text-input").await;
    let one_row = script(
        &c,
        "const r = document.querySelector('.text-input'); const x = r.querySelector('.ti-remove').getBoundingClientRect(); \
         const t = r.querySelector('.ti-value').getBoundingClientRect(); return x.top < t.bottom && x.left >= t.right;",
    )
    .await;
    assert_eq!(one_row, json!(true), "the remove button beside its input");
    assert_eq!(script(&c, "return getComputedStyle(document.querySelector('#file-inputs')).opacity").await, json!("0"));
    script(&c, "document.querySelector('.ti-remove').click(); document.querySelector('#more').open = false;").await;

    fill(&c, "#image", "cq-test/busybox").await;
    fill(&c, "#command", "sh -c 'seq 1 500; echo hello > /outputs/a.txt'").await;
    click(&c, "#run").await;
    until("the first lines", || async {
        (script(&c, "return window.cq.log.length").await.as_u64()? > 0).then_some(())
    })
    .await;
    let search_at =
        script(&c, "const r = document.querySelector('#log-search').getBoundingClientRect(); return [r.left, r.width]")
            .await;
    state_is(&c, "succeeded").await;
    until("every line counted", || async { (text(&c, "#log-count").await == "500 lines").then_some(()) }).await;
    let search_now =
        script(&c, "const r = document.querySelector('#log-search').getBoundingClientRect(); return [r.left, r.width]")
            .await;
    assert_eq!(search_at, search_now, "the search box stays put as the count grows");
    // The outputs are on screen without scrolling, below the log.
    let fits = until("the outputs", || async {
        let v = script(
            &c,
            "const b = document.querySelector('#outputs-box'); if (b.hidden) return null; \
             return b.querySelector('li').getBoundingClientRect().bottom <= window.innerHeight;",
        )
        .await;
        v.as_bool()
    })
    .await;
    assert!(fits, "the outputs' first row is within the window");
    click(&c, "#outputs button").await;
    let shown = until("the preview", || async {
        let v = script(
            &c,
            "const p = document.querySelector('#preview'); const pre = p.querySelector('pre'); if (!pre) return null; \
             const r = pre.getBoundingClientRect(); \
             return [p.querySelector('.preview-title').textContent, pre.textContent, r.top >= 0 && r.bottom <= window.innerHeight];",
        )
        .await;
        v.as_array().map(|a| a.to_vec())
    })
    .await;
    assert_eq!(shown, vec![json!("a.txt"), json!("hello\n"), json!(true)], "the preview names its file and is in view");
    screenshot("ui-outputs.png", &c.screenshot().await.unwrap());
    c.close().await.unwrap();
}

/// The page under load, measured (not asserted): `cargo test -p cq --test ui benchmark --
/// --ignored --nocapture`. Streams 100,000 lines at about 10,000 lines a second from a real
/// job and prints the long tasks (the Long Tasks API), the time to the first drawn line, the
/// latency of clicks while streaming, and the page's memory; then holds 1,000,000 lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it with --ignored --nocapture"]
async fn benchmark_streaming_a_large_log() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &[]);
    let (_driver, c) = browser().await;
    c.goto(&format!("{url}/#queue=local")).await.unwrap();
    fill(&c, "#image", "cq-test/busybox").await;
    let command = "for b in $(seq 0 9); do seq $((b*10000+1)) $((b*10000+10000)); sleep 1; done";
    fill(&c, "#command", &format!("sh -c '{command}'")).await;
    script(
        &c,
        "window.bench = { long: [], clicks: [] };
         new PerformanceObserver((l) => { for (const e of l.getEntries()) window.bench.long.push([e.startTime, e.duration]); })
           .observe({ type: 'longtask', buffered: true });
         document.querySelector('#run').addEventListener('click', () => { window.bench.runAt = performance.now(); });
         document.querySelector('#log-times').addEventListener('click', (e) => {
           const t0 = e.timeStamp;
           requestAnimationFrame(() => setTimeout(() => window.bench.clicks.push(performance.now() - t0)));
         });",
    )
    .await;
    click(&c, "#run").await;
    until("the first line", || async { script(&c, "return window.cq.log.firstLineAt").await.as_f64() }).await;
    let start = script(&c, "return performance.now()").await.as_f64().unwrap();
    // A click on the timestamps toggle (which redraws the rows) every 10,000 lines.
    for k in 1..=9u64 {
        until("more lines", || async {
            let n = script(&c, "return window.cq.log.length").await.as_u64()?;
            (n >= k * 10_000).then_some(())
        })
        .await;
        click(&c, "#log-times").await;
    }
    until("100,000 lines", || async {
        (script(&c, "return window.cq.log.length").await.as_u64()? >= 100_000).then_some(())
    })
    .await;
    let end = script(&c, "return performance.now()").await.as_f64().unwrap();
    let report = script(
        &c,
        "return { long: window.bench.long, clicks: window.bench.clicks, first: window.cq.log.firstLineAt - window.bench.runAt,
                  heap: performance.memory ? performance.memory.usedJSHeapSize : null,
                  nodes: document.getElementsByTagName('*').length };",
    )
    .await;
    let long: Vec<(f64, f64)> = report["long"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_f64().unwrap(), e[1].as_f64().unwrap()))
        .filter(|(t, _)| *t >= start && *t <= end)
        .collect();
    let longest = long.iter().map(|e| e.1).fold(0.0, f64::max);
    let seconds = (end - start) / 1000.0;
    let clicks: Vec<f64> = report["clicks"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let mib = |v: &Value| v.as_f64().map(|b| format!("{:.0} MiB", b / 1048576.0)).unwrap_or("n/a".into());
    eprintln!("streaming 100,000 lines took {seconds:.1} s ({:.0} lines/s)", 100_000.0 / seconds);
    eprintln!(
        "long tasks while streaming: {} ({:.2}/s), longest {longest:.0} ms",
        long.len(),
        long.len() as f64 / seconds
    );
    eprintln!("time from Run to the first drawn line: {:.0} ms", report["first"].as_f64().unwrap());
    eprintln!(
        "click → next frame while streaming: {:?} ms (max {:.0} ms)",
        clicks.iter().map(|c| c.round()).collect::<Vec<_>>(),
        clicks.iter().copied().fold(0.0, f64::max)
    );
    eprintln!("page at 100,000 lines: JS heap {}, {} DOM elements", mib(&report["heap"]), report["nodes"]);

    // 1,000,000 lines of a finished job: appended in pages of 10,000 as the HTTP log gives them.
    let held = script(
        &c,
        "const l = window.cq.log; l.reset(); const t0 = performance.now(); const now = Date.now();
         for (let p = 0; p < 100; p++) {
           const page = [];
           for (let i = 0; i < 10000; i++) page.push({ stream: i % 50 ? 'stdout' : 'stderr', time: now, text: `line ${p * 10000 + i + 1} of a long log\\n` });
           l.append(page);
         }
         l.draw(true);
         const took = performance.now() - t0;
         const s0 = performance.now(); const found = l.search('line 987654 of'); const searched = performance.now() - s0;
         l.goToLine(987654);
         const hl = l.el.querySelector('.log-row.hl'), a = hl.getBoundingClientRect(), b = l.el.getBoundingClientRect();
         return { took, searched, found, shown: hl.dataset.line === '987654' && a.top >= b.top && a.bottom <= b.bottom, heap: performance.memory ? performance.memory.usedJSHeapSize : null,
                  nodes: document.getElementsByTagName('*').length, rows: document.querySelectorAll('#log .log-row').length };",
    )
    .await;
    eprintln!(
        "1,000,000 lines held: appended in {:.0} ms, searched in {:.0} ms ({} match, line 987,654 in view: {}), JS heap {}, \
         {} DOM elements ({} rows)",
        held["took"].as_f64().unwrap(),
        held["searched"].as_f64().unwrap(),
        held["found"],
        held["shown"],
        mib(&held["heap"]),
        held["nodes"],
        held["rows"]
    );
    screenshot("ui-benchmark.png", &c.screenshot().await.unwrap());
    c.close().await.unwrap();
}
