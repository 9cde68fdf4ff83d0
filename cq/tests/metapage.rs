//! cq as the reference system's users use it, against `cq dev` with its real worker and Docker:
//! the page embedded in a metapage host page that speaks the metapage library's protocol (both
//! versions "1" and "2"), in a real headless Chromium; URL hashes written the way the
//! reference's hash-query library writes them; and reference-format definitions submitted to
//! `POST /q/{queue}`.

mod support;
use support::{browser, cq_dev_with};

use std::time::{Duration, Instant};

use base64::Engine as _;
use fantoccini::Client;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest wait for anything. Generous: two Chromiums, two brokers and their containers share
/// the machine with whatever else runs, and a bound that is hit only proves the machine slow.
const WAIT: Duration = Duration::from_secs(120);

/// Polls `f` until it returns `Some`, up to [`WAIT`]. WebDriver cannot push a change of the page
/// to the test, so asking again is the only way to wait for one. On a timeout the host page's
/// record of messages is part of the failure.
async fn until<T, F, Fut>(c: &Client, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if started.elapsed() > WAIT {
            let seen = script(c, "return [window.received, window.outputs, window.errors]").await;
            panic!("timed out waiting for {what}; the host page saw {seen}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn script(c: &Client, js: &str) -> Value {
    c.execute(js, vec![]).await.unwrap()
}

/// The host page: a minimal metapage written from the library's behaviour. It names the frame,
/// fetches `metaframe.json` first (as the library does, from its own origin), answers the
/// frame's setup request with its id, its version and the initial inputs, and then sends
/// `InputsUpdate` and records `OutputsUpdate` and `HashParamsUpdate`. Binary inputs are sent the
/// way its version's library sends them.
const HOST_PAGE: &str = r#"<!doctype html><meta charset="utf-8"><title>metapage</title><body><script>
const q = new URLSearchParams(location.search);
const VERSION = q.get('v'), PARENT = 'metapage-1', ID = 'cq';
const frameUrl = q.get('frame');
const frameOrigin = new URL(frameUrl).origin;
window.received = []; window.outputs = []; window.hashes = []; window.errors = [];
const bin = btoa('bin\n');
const binary = VERSION === '1'
  ? { _s: true, _c: 'Blob', value: bin, size: 4, fileType: 'application/octet-stream' }
  : `data:application/octet-stream;blob=true;base64,${bin}`;
let inputs = { 'in.txt': 'first\n', 'bin.dat': binary, 'delay.txt': '300' };
const iframe = document.createElement('iframe');
iframe.name = ID;
iframe.style = 'width: 100%; height: 600px';
function send(method, params) {
  iframe.contentWindow.postMessage({ jsonrpc: '2.0', id: '_', method, params, iframeId: ID, parentId: PARENT }, frameOrigin);
}
window.addEventListener('message', (ev) => {
  if (ev.source !== iframe.contentWindow || ev.origin !== frameOrigin) return;
  const m = ev.data;
  window.received.push(m);
  if (!m || m.jsonrpc !== '2.0' || m.iframeId !== ID) return;
  if (m.method !== 'SetupIframeClientRequest' && m.parentId !== PARENT) return;
  if (m.method === 'SetupIframeClientRequest') {
    window.frameAsked = m.params.version;
    send('SetupIframeServerResponse', { iframeId: ID, parentId: PARENT, state: { inputs }, version: VERSION });
  } else if (m.method === 'SetupIframeServerResponseAck') {
    window.frameVersion = m.params.version;
  } else if (m.method === 'OutputsUpdate') {
    window.outputs.push(m.params);
  } else if (m.method === 'HashParamsUpdate') {
    window.hashes.push(m.params);
  }
});
window.setInputs = (more) => { inputs = { ...inputs, ...more }; send('InputsUpdate', { inputs: more, parentId: PARENT }); };
fetch(new URL('/metaframe.json', frameUrl)).then((r) => r.json()).then((d) => {
  window.definition = d;
  iframe.src = frameUrl;
  document.body.append(iframe);
}, (e) => window.errors.push(String(e)));
</script></body>"#;

/// Serves [`HOST_PAGE`] on its own port, so the host and the page are different origins.
async fn host_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 << 10];
                let mut read = 0;
                while !buf[..read].windows(4).any(|w| w == b"\r\n\r\n") && read < buf.len() {
                    match stream.read(&mut buf[read..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read += n,
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    HOST_PAGE.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(HOST_PAGE.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}

/// A JSON value as the reference's hash-query library (before 2025) wrote it:
/// `btoa(encodeURIComponent(stable JSON))`.
fn hash_query_json_old(value: &Value) -> String {
    base64::engine::general_purpose::STANDARD.encode(uri_component(&stable(value)))
}

/// A JSON value as hash-query writes it today: `btoa(stable JSON)`.
fn hash_query_json(value: &Value) -> String {
    base64::engine::general_purpose::STANDARD.encode(stable(value))
}

/// serde_json's `Value` keeps keys sorted, as fast-json-stable-stringify writes them.
fn stable(value: &Value) -> String {
    value.to_string()
}

/// JavaScript's `encodeURIComponent`.
fn uri_component(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A hash as hash-query writes it: `#?k=v&…`, keys sorted, values that look like base64 as
/// they are and every other value through `encodeURIComponent`.
fn hash_query(params: &[(&str, String)]) -> String {
    let mut params = params.to_vec();
    params.sort_by(|a, b| a.0.cmp(b.0));
    let parts: Vec<String> = params
        .iter()
        .map(|(k, v)| {
            let base64_like = !v.is_empty()
                && v.len() % 4 == 0
                && v.trim_end_matches('=').bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
            format!("{k}={}", if base64_like { v.clone() } else { uri_component(v) })
        })
        .collect();
    format!("#?{}", parts.join("&"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashes_written_by_hash_query_decode_to_the_expected_definitions() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &[]);
    let (_driver, c) = browser().await;
    c.goto(&format!("{url}/")).await.unwrap();

    let greet = json!({"image": "cq-test/busybox", "command": "echo ${GREETING}"});
    let build = json!({"build": {"context": "https://github.com/org/tool/tree/${REF}"}, "command": "run"});
    // (hash, expected page settings, expected cq definition)
    let cases: Vec<(String, Value, Value)> = vec![
        (
            hash_query(&[
                ("autostart", "true".into()),
                ("job", hash_query_json_old(&greet)),
                ("queue", "local".into()),
                ("GREETING", "hello world".into()),
                ("mp_debug", "true".into()),
                ("terminal", "true".into()),
            ]),
            json!({"format": "reference", "queue": "local", "autostart": true, "namespace": null}),
            json!({"image": "cq-test/busybox", "command": ["echo", "hello", "world"], "env": {"GREETING": "hello world"}}),
        ),
        (
            hash_query(&[
                ("job", hash_query_json(&json!({"image": "busybox", "command": "cat /inputs/a.txt"}))),
                ("inputs", hash_query_json(&json!({"a.txt": "hi there"}))),
                ("control", hash_query_json(&json!({"namespace": "doc-7"}))),
                ("queue", "local".into()),
                ("queueOverride", "other".into()),
                ("autostart", "1".into()),
                ("resolverefs", "true".into()),
            ]),
            json!({"format": "reference", "queue": "other", "autostart": false, "namespace": "doc-7", "resolveRefs": true}),
            json!({"image": "busybox", "command": ["cat", "/inputs/a.txt"],
                "inputs": {"a.txt": {"type": "text", "value": "hi there"}}}),
        ),
        (
            hash_query(&[
                ("job", hash_query_json_old(&build)),
                ("queue", "local".into()),
                ("queueOverride", "other".into()),
                ("ignoreQueueOverride", "true".into()),
                ("REF", "v3".into()),
                ("maxJobDuration", "10m".into()),
                ("allowsetjob", "true".into()),
            ]),
            json!({"format": "reference", "queue": "local", "allowSetJob": true}),
            json!({"build": {"git": {"url": "https://github.com/org/tool.git", "ref": "v3"}}, "command": ["run"],
                "env": {"REF": "v3"}, "maxDuration": 600}),
        ),
        (
            // Older hash-query versions URL-encoded the base64 padding.
            format!("#?job={}", hash_query_json_old(&json!({"image": "busybox", "shmSize": "1g"})).replace('=', "%3D")),
            json!({"format": "reference", "queue": "local"}),
            json!({"image": "busybox", "resources": {"shmSize": 1u64 << 30}}),
        ),
        (
            // cq's own format keeps working: plain JSON, `autostart=1`.
            format!(
                "#queue=q1&autostart=1&namespace=n1&job={}",
                uri_component(r#"{"image":"busybox","command":["echo","hi"]}"#)
            ),
            json!({"format": "cq", "queue": "q1", "autostart": true, "namespace": "n1"}),
            json!({"image": "busybox", "command": ["echo", "hi"]}),
        ),
    ];
    let hashes: Vec<Value> = cases.iter().map(|(h, _, _)| json!(h)).collect();
    let decoded = c
        .execute_async(
            r#"const [hashes, done] = arguments;
            import('/ui/hashparams.js').then((m) => done(hashes.map((h) => {
              const c = m.readHash(h);
              return { format: c.format, queue: c.queue, autostart: c.autostart, namespace: c.namespace,
                resolveRefs: c.resolveRefs, allowSetJob: c.allowSetJob, jobFormat: c.jobFormat,
                definition: c.jobFormat === 'reference' ? m.referenceDefinition(c) : c.job };
            })));"#,
            vec![json!(hashes)],
        )
        .await
        .unwrap();
    let http = reqwest::Client::new();
    for ((hash, settings, expected), got) in cases.iter().zip(decoded.as_array().unwrap()) {
        for (k, v) in settings.as_object().unwrap() {
            assert_eq!(&got[k], v, "{k} of {hash}: {got}");
        }
        let definition = if got["jobFormat"] == "reference" {
            let res = http
                .post(format!("{url}/reference/translate"))
                .json(&json!({"definition": got["definition"]}))
                .send()
                .await
                .unwrap();
            assert!(res.status().is_success(), "{hash}: {}", res.text().await.unwrap());
            res.json::<Value>().await.unwrap()["definition"].clone()
        } else {
            got["definition"].clone()
        };
        assert_eq!(&definition, expected, "{hash}");
    }
    c.close().await.unwrap();
}

/// Follows a job's events until it finishes; returns its final view.
async fn finished(url: &str, job: &str) -> Value {
    let mut res = reqwest::get(format!("{url}/j/{job}/events")).await.unwrap();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let chunk = tokio::time::timeout_at(deadline, res.chunk()).await.expect("the job finishes").unwrap();
        let Some(chunk) = chunk else { break };
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            let data: String = event.lines().filter_map(|l| l.strip_prefix("data:")).collect();
            let Ok(msg) = serde_json::from_str::<Value>(data.trim()) else { continue };
            if msg["type"] == "job" && msg["data"]["job"]["state"] == "finished" {
                return msg["data"]["job"].clone();
            }
        }
    }
    panic!("the event stream of {job} ended before it finished")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_definitions_run_through_post_q() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, url) = cq_dev_with(dir.path(), &[]);
    let http = reqwest::Client::new();
    // (submission in the reference's format, output file, its expected content)
    let cases = [
        (
            json!({"definition": {"image": "cq-test/busybox", "command": "cp /inputs/in.txt /outputs/out.txt",
                "inputs": {"in.txt": {"value": "hello\n"}}}}),
            "out.txt",
            "hello\n".to_string(),
        ),
        (
            json!({"definition": {"image": "cq-test/busybox", "entrypoint": "sh -c",
                "command": "cat /inputs/conf/a.yml /inputs/b.txt > /outputs/all.txt",
                "inputs": {"b.txt": {"type": "base64", "value": "Ymlu"}},
                "configFiles": {"conf/a.yml": {"type": "utf8", "value": "a: 1\n"}}},
                "control": {"namespace": "doc-1"}}),
            "all.txt",
            "a: 1\nbin".to_string(),
        ),
        (
            json!({"definition": {"image": "cq-test/busybox", "env": {"WHO": "cq"}, "shmSize": "64m",
                "command": "sh -c 'echo $WHO $JOB_URL_PREFIX $JOB_OUTPUTS_URL_PREFIX > /outputs/env.txt; ls -d /job-cache >> /outputs/env.txt'"}}),
            "env.txt",
            String::new(),
        ),
    ];
    for (submission, path, expected) in cases {
        let res = http.post(format!("{url}/q/local")).json(&submission).send().await.unwrap();
        assert_eq!(res.status(), 201, "{submission}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["success"], true, "{body}");
        let job = body["jobId"].as_str().unwrap().to_string();
        let view = finished(&url, &job).await;
        assert_eq!(view["reason"], "succeeded", "{view}");
        let output = reqwest::get(format!("{url}/j/{job}/outputs/{path}")).await.unwrap().text().await.unwrap();
        if expected.is_empty() {
            // The env case: the reference's variables and its cache path.
            let prefix = format!("{url}/j/{job}");
            assert_eq!(output, format!("cq {prefix} {prefix}/outputs/\n/job-cache\n"));
        } else {
            assert_eq!(output, expected);
        }
    }
    let refused = http
        .post(format!("{url}/q/local"))
        .json(&json!({"definition": {"image": "busybox", "configFiles": {"/etc/x": {"value": "1"}}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("`definition.configFiles./etc/x`"), "{body}");
}

/// The page in a metapage of version `version`: the initial inputs run a job whose output
/// arrives as `OutputsUpdate`; a new input supersedes the running job and its output follows.
async fn page_in_a_metapage(version: &str) {
    let dir = tempfile::tempdir().unwrap();
    let host = host_server().await;
    // The metapage is on another origin, which the broker must allow.
    let (_dev, url) = cq_dev_with(dir.path(), &["--allow-origin", &host]);
    let (_driver, c) = browser().await;
    let job = json!({"image": "cq-test/busybox",
        "command": "sh -c 'sleep $(cat /inputs/delay.txt); cat /inputs/in.txt /inputs/bin.dat | tr a-z A-Z > /outputs/out.txt'"});
    // Version "2" sends URLs and asks for job/result.json; version "1" asks for the contents.
    let flag = if version == "1" { ("resolverefs", "true".to_string()) } else { ("allowsetjob", "true".to_string()) };
    let frame = format!(
        "{url}/{}",
        hash_query(&[
            ("autostart", "true".into()),
            ("job", hash_query_json_old(&job)),
            ("queue", "local".into()),
            flag
        ])
    );
    c.goto(&format!("{host}/?v={version}&frame={}", uri_component(&frame))).await.unwrap();

    let first = until(&c, "the first job running", || async {
        let received = script(&c, "return window.received").await;
        received.as_array()?.iter().find(|m| m["type"] == "cq:state" && m["state"] == "running").cloned()
    })
    .await;
    assert_eq!(script(&c, "return window.frameAsked").await, json!("2"), "the frame asks with its newest version");
    assert_eq!(script(&c, "return window.frameVersion").await, json!(version), "and speaks the parent's");
    assert_eq!(script(&c, "return window.definition.version").await, json!("2"), "metaframe.json is readable");
    // The first job sleeps for minutes: only the new inputs can end it, by superseding it.
    script(&c, "window.setInputs({'in.txt': 'second\\n', 'delay.txt': '0'})").await;

    let outputs = until(&c, "the outputs", || async {
        let outputs = script(&c, "return window.outputs").await;
        outputs.as_array()?.iter().find(|o| o.get("out.txt").is_some()).cloned()
    })
    .await;
    let out = &outputs["out.txt"];
    let content = if version == "1" {
        out.as_str().unwrap().to_string()
    } else {
        assert_eq!(out["type"], "url", "{out}");
        // A read link: a downstream metaframe on another origin may fetch it.
        assert!(out["value"].as_str().unwrap().contains("sig="), "{out}");
        let result = &outputs["job/result.json"];
        assert_eq!(result["statusCode"], 0, "{result}");
        assert_eq!(result["isTimedOut"], false, "{result}");
        reqwest::get(out["value"].as_str().unwrap()).await.unwrap().text().await.unwrap()
    };
    assert_eq!(content, "SECOND\nBIN\n", "the output of the newer inputs");
    let older: Value =
        reqwest::get(format!("{url}/j/{}", first["jobId"].as_str().unwrap())).await.unwrap().json().await.unwrap();
    assert_eq!(older["reason"], "superseded", "{older}");
    let sent = script(&c, "return window.outputs.length").await;
    assert_eq!(sent, json!(1), "only the newer job's outputs were sent");

    if version == "2" {
        // Editing the job in the page saves it in the metapage.
        c.enter_frame(0).await.unwrap();
        script(&c, "const e = document.querySelector('#command'); e.value = 'echo edited'; e.dispatchEvent(new Event('change', {bubbles: true}));").await;
        c.enter_parent_frame().await.unwrap();
        let hash = until(&c, "the hash update", || async {
            let hashes = script(&c, "return window.hashes").await;
            hashes.as_array()?.first().map(|h| h["hash"].as_str().unwrap().to_string())
        })
        .await;
        assert!(hash.contains("jobformat=cq"), "{hash}");
        let job_param = hash.split(['?', '&']).find_map(|p| p.strip_prefix("job=")).unwrap();
        let text = base64::engine::general_purpose::STANDARD.decode(job_param).unwrap();
        let saved: Value =
            serde_json::from_str(&percent_encoding::percent_decode(&text).decode_utf8().unwrap()).unwrap();
        assert_eq!(saved["command"], "echo edited", "{saved}");
        assert!(saved.get("inputs").is_none(), "inputs from the metapage are not saved in the job: {saved}");
    }
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_a_metapage_of_version_2() {
    page_in_a_metapage("2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_a_metapage_of_version_1() {
    page_in_a_metapage("1").await;
}
