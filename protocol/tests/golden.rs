//! Golden tests: the JSON of every message variant and the job ids of fixed definitions are
//! pinned, so any change to a serde attribute or to the id algorithm shows up as a diff.
//! Run with `UPDATE_EXPECT=1` to accept an intended change.

use expect_test::{expect, expect_file};
use protocol::definition::{JobDefinition, parse_json};
use protocol::job::{
    FinishReason, JobState, JobView, LogLine, OutputFile, Phase, Progress, QueueSummary, Stream, WorkerView,
};
use protocol::messages::*;
use protocol::{JobId, WorkerId};
use serde_json::value::RawValue;

fn id(n: u8) -> JobId {
    JobId([n; 32])
}

fn view() -> JobView {
    JobView {
        id: id(1),
        queue: "q".into(),
        state: JobState::Finished,
        reason: Some(FinishReason::Failed),
        exit_code: Some(3),
        message: None,
        attempt: 2,
        worker: Some(WorkerId("w1".into())),
        namespaces: vec!["doc-1".into()],
        priority: 0,
        submitted_at: 1_700_000_000_000,
        started_at: Some(1_700_000_000_100),
        finished_at: Some(1_700_000_000_200),
        progress: Some(Progress { phase: Phase::Uploading, message: None, current: Some(1), total: Some(2) }),
        log_lines: 2,
        log_truncated: false,
        waiting: None,
        outputs: vec![OutputFile { path: "a.txt".into(), size: 3, sha256: "ab".repeat(32) }],
        version: 7,
    }
}

fn definition() -> JobDefinition {
    parse_json::<JobDefinition>(br#"{"image":"busybox","command":["echo","hi"]}"#).unwrap().normalize().unwrap()
}

fn render<T: serde::Serialize>(messages: &[T]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str(&serde_json::to_string(m).unwrap());
        out.push('\n');
    }
    out
}

#[test]
fn client_to_broker() {
    let all = vec![
        ClientToBroker::Hello(ClientHello { protocol: 1, token: Some("t".into()), agent: Some("cq-cli/0.1.0".into()) }),
        ClientToBroker::Submit(Box::new(SubmitMessage {
            request: Some(1),
            queue: "q".into(),
            definition: definition(),
            namespace: Some("doc-1".into()),
            priority: Some(5),
            force: true,
            retries: Some(2),
        })),
        ClientToBroker::Cancel { request: Some(2), job_id: id(1), namespace: None },
        ClientToBroker::WatchQueue { queue: "q".into() },
        ClientToBroker::UnwatchQueue { queue: "q".into() },
        ClientToBroker::WatchJob { job_id: id(1), since: 10 },
        ClientToBroker::UnwatchJob { job_id: id(1) },
    ];
    let text = render(&all);
    for line in text.lines() {
        let back: ClientToBroker = serde_json::from_str(line).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), line);
    }
    expect_file!["golden/client_to_broker.jsonl"].assert_eq(&text);
}

#[test]
fn broker_to_client() {
    let worker = WorkerView {
        id: WorkerId("w1".into()),
        queues: vec!["q".into()],
        slots: 2,
        busy: 1,
        gpus: 0,
        tags: vec!["linux".into()],
        connected: true,
        draining: false,
    };
    let all = vec![
        BrokerToClient::Welcome { protocol: 1, broker: "cq/0.1.0".into() },
        BrokerToClient::Submitted { request: Some(1), outcome: SubmitOutcome::Created, job: view() },
        BrokerToClient::Cancelled { request: Some(2), job: view() },
        BrokerToClient::Error(ErrorBody {
            code: ErrorCode::InvalidDefinition,
            message: "`image`: bad".into(),
            request: Some(3),
            job_id: None,
        }),
        BrokerToClient::QueueSnapshot {
            queue: "q".into(),
            seq: 0,
            summary: QueueSummary { queue: "q".into(), ..Default::default() },
            jobs: vec![view()],
            workers: vec![worker.clone()],
        },
        BrokerToClient::QueueJob { queue: "q".into(), seq: 1, job: view() },
        BrokerToClient::QueueWorkers { queue: "q".into(), seq: 2, workers: vec![worker] },
        BrokerToClient::Job { job: view() },
        BrokerToClient::Logs {
            job_id: id(1),
            offset: 0,
            lines: vec![LogLine { stream: Stream::Stdout, time: 5, text: "hi\n".into() }],
        },
    ];
    let text = render(&all);
    for line in text.lines() {
        let back: BrokerToClient = serde_json::from_str(line).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), line);
    }
    expect_file!["golden/broker_to_client.jsonl"].assert_eq(&text);
}

#[test]
fn worker_to_broker() {
    let all = vec![
        WorkerToBroker::Hello(WorkerHello {
            protocol: 1,
            token: None,
            worker_id: WorkerId("w1".into()),
            queues: vec!["q".into()],
            slots: 2,
            gpus: 1,
            tags: vec!["gpu".into()],
            held: vec![HeldJob { job_id: id(1), attempt: 1 }],
            agent: None,
        }),
        WorkerToBroker::Accept { job_id: id(1), attempt: 1 },
        WorkerToBroker::Release { job_id: id(1), attempt: 1, reason: Some("draining".into()) },
        WorkerToBroker::Progress {
            job_id: id(1),
            attempt: 1,
            phase: Phase::Pulling,
            message: Some("busybox".into()),
            current: Some(10),
            total: Some(100),
        },
        WorkerToBroker::Logs {
            job_id: id(1),
            attempt: 1,
            lines: vec![LogLine { stream: Stream::Stderr, time: 5, text: "oops\n".into() }],
        },
        WorkerToBroker::Finish {
            job_id: id(1),
            attempt: 1,
            status: ExitStatus::Exited { exit_code: 0 },
            outputs: vec![],
        },
        WorkerToBroker::Finish {
            job_id: id(1),
            attempt: 1,
            status: ExitStatus::TimedOut { exit_code: Some(137) },
            outputs: vec![],
        },
        WorkerToBroker::Finish {
            job_id: id(1),
            attempt: 1,
            status: ExitStatus::Error { message: "pull failed".into(), retryable: true },
            outputs: vec![],
        },
        WorkerToBroker::Finish { job_id: id(1), attempt: 1, status: ExitStatus::Cancelled, outputs: vec![] },
        WorkerToBroker::Heartbeat,
        WorkerToBroker::Drain,
    ];
    let text = render(&all);
    for line in text.lines() {
        let back: WorkerToBroker = serde_json::from_str(line).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), line);
    }
    expect_file!["golden/worker_to_broker.jsonl"].assert_eq(&text);
}

#[test]
fn broker_to_worker() {
    let raw = RawValue::from_string(serde_json::to_string(&definition()).unwrap()).unwrap();
    let all = vec![
        BrokerToWorker::Welcome { protocol: 1, broker: "cq/0.1.0".into(), heartbeat_ms: 5000, lease_grace_ms: 30000 },
        BrokerToWorker::Assign { job_id: id(1), attempt: 1, queue: "q".into(), definition: raw },
        BrokerToWorker::Cancel { job_id: id(1), attempt: 1, reason: "cancelled".into() },
        BrokerToWorker::FinishAck { job_id: id(1), attempt: 1 },
        BrokerToWorker::Error(ErrorBody {
            code: ErrorCode::StaleAttempt,
            message: "attempt 1 is not current".into(),
            request: None,
            job_id: Some(id(1)),
        }),
    ];
    let text = render(&all);
    for line in text.lines() {
        let back: BrokerToWorker = serde_json::from_str(line).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), line);
    }
    expect_file!["golden/broker_to_worker.jsonl"].assert_eq(&text);
}

#[test]
fn unknown_message_types_and_fields_are_rejected() {
    let cases = [
        r#"{"type":"hello","data":{"protocol":1,"extra":true}}"#,
        r#"{"type":"finish","data":{"jobId":"00","attempt":1}}"#,
        r#"{"type":"watchQueue","data":{"queue":"q","x":1}}"#,
        r#"{"type":"watchQueue","data":{"queue":"q"},"more":1}"#,
    ];
    for c in cases {
        assert!(serde_json::from_str::<ClientToBroker>(c).is_err(), "{c}");
    }
    // A client socket cannot carry worker messages: they are not client message types.
    let finish = r#"{"type":"finish","data":{"jobId":"0101010101010101010101010101010101010101010101010101010101010101","attempt":1,"status":{"kind":"exited","exitCode":0}}}"#;
    assert!(serde_json::from_str::<WorkerToBroker>(finish).is_ok());
    assert!(serde_json::from_str::<ClientToBroker>(finish).is_err());
}

/// The job id algorithm, pinned: changing it orphans every cached result.
#[test]
fn job_id_vectors() {
    let ids: Vec<String> = [
        r#"{"image":"busybox"}"#,
        r#"{"image":"busybox","command":"echo hi"}"#,
        r#"{"command":["echo","hi"],"image":"busybox"}"#,
        r#"{"image":"busybox","env":{"B":"2","A":"1"},"maxDuration":"1m","resources":{"memory":"64m","cpus":0.5},"tags":["x"]}"#,
        r#"{"image":"busybox","inputs":{"in/a.txt":{"type":"text","value":"hello"}}}"#,
        r#"{"image":"busybox","inputs":{"in/a.txt":{"type":"json","value":{"b":1,"a":[true,null]}}}}"#,
        r#"{"build":{"dockerfile":"FROM busybox\n","buildArgs":{"V":"1"}}}"#,
    ]
    .iter()
    .map(|json| {
        let d = parse_json::<JobDefinition>(json.as_bytes()).unwrap().normalize().unwrap();
        format!("{} {}", d.job_id(), String::from_utf8(d.canonical_identity()).unwrap())
    })
    .collect();
    expect![[r#"
        86f4436baf5570f69349bc6cfad53e024834285e866a0ca1e4865942747fcf6a {"image":"busybox"}
        f06afc56184bc2785a079b04f7e0a57404feda5d041435445b2e9842242a8827 {"command":["echo","hi"],"image":"busybox"}
        f06afc56184bc2785a079b04f7e0a57404feda5d041435445b2e9842242a8827 {"command":["echo","hi"],"image":"busybox"}
        9c585f8d02d2fc8d26812b8d51fb5aa0da0247f61776d25338af6cd5376e39b1 {"env":{"A":"1","B":"2"},"image":"busybox","maxDuration":60,"resources":{"cpus":0.5,"memory":67108864},"tags":["x"]}
        c5be593e4262e6bdcbcc539cfe5e53ec619a139feb1caefb641e94888ab2d887 {"image":"busybox","inputs":{"in/a.txt":{"sha256":"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824","size":5}}}
        115ae19c2730daeeec42ba58a0ad6b28a870a0016ef9b7d0ed1935afac977fc3 {"image":"busybox","inputs":{"in/a.txt":{"sha256":"51705a2c9eb3e7e410a58f696a770c3ac3885a0cf43eb7fc88f5e47c11d4d30d","size":23}}}
        c9a8908de04f1bd531ed11da5022fa67ee10d4e239232e18b41df66177deaa66 {"build":{"buildArgs":{"V":"1"},"dockerfile":"FROM busybox\n"}}"#]].assert_eq(&ids.join("\n"));
}
