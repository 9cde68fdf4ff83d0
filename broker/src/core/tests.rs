//! Data-driven tests of the queue core: a script of timed commands in, the rendered events,
//! effects and replies out. Run with `UPDATE_EXPECT=1` to accept an intended change.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;

use expect_test::{Expect, expect};
use protocol::definition::{JobDefinition, parse_json};
use protocol::job::{LogLine, Stream};
use protocol::messages::{BrokerToClient, BrokerToWorker, ExitStatus, HeldJob, WorkerHello, WorkerToBroker};
use protocol::{JobId, WorkerId};

use super::*;

struct Script {
    core: Core,
    now: u64,
    names: HashMap<JobId, String>,
    out: String,
}

fn script() -> Script {
    let config = CoreConfig {
        lease_grace_ms: 1000,
        retention_ms: 60_000,
        default_retries: 1,
        max_log_bytes: 1000,
        heartbeat_ms: 500,
        accept_timeout_ms: 1_000_000,
    };
    Script { core: Core::new(config), now: 0, names: HashMap::new(), out: String::new() }
}

fn def(name: &str, extra: &str) -> JobDefinition {
    let json = format!(r#"{{"image":"busybox","command":["echo","{name}"]{extra}}}"#);
    parse_json::<JobDefinition>(json.as_bytes()).unwrap().normalize().unwrap()
}

impl Script {
    fn at(&mut self, t: u64) -> &mut Self {
        self.now = t;
        self
    }

    fn id(&mut self, name: &str) -> JobId {
        if let Some((id, _)) = self.names.iter().find(|(_, n)| *n == name) {
            return *id;
        }
        let id = def(name, "").job_id();
        self.names.insert(id, name.to_string());
        id
    }

    fn submit_with(&mut self, queue: &str, name: &str, extra: &str, ns: Option<&str>, force: bool) -> &mut Self {
        let d = def(name, extra);
        let id = d.job_id();
        self.names.insert(id, name.to_string());
        let submit = Submit {
            queue: queue.into(),
            job: id,
            definition: Arc::from(serde_json::to_string(&d).unwrap()),
            gpus: d.gpus(),
            tags: d.tags.clone(),
            namespace: ns.map(str::to_string),
            priority: if extra.contains("prio") { 5 } else { 0 },
            force,
            retries: None,
        };
        let label = format!(
            "submit {name} to {queue}{}{}",
            ns.map(|n| format!(" ns={n}")).unwrap_or_default(),
            if force { " force" } else { "" }
        );
        self.run(&label, Command::Submit(submit))
    }

    fn submit(&mut self, queue: &str, name: &str) -> &mut Self {
        self.submit_with(queue, name, "", None, false)
    }

    fn worker(
        &mut self,
        conn: ConnId,
        id: &str,
        slots: u32,
        gpus: u32,
        tags: &[&str],
        held: &[(&str, u32)],
    ) -> &mut Self {
        let held = held.iter().map(|(n, a)| HeldJob { job_id: self.id(n), attempt: *a }).collect();
        let hello = WorkerHello {
            protocol: 1,
            token: None,
            worker_id: WorkerId(id.into()),
            queues: vec!["q".into()],
            slots,
            gpus,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            held,
            agent: None,
        };
        self.run(
            &format!("hello {id} on c{conn} slots={slots} gpus={gpus} tags={tags:?}"),
            Command::WorkerHello { conn, hello },
        )
    }

    fn msg(&mut self, conn: ConnId, label: &str, msg: WorkerToBroker) -> &mut Self {
        self.run(&format!("c{conn} {label}"), Command::Worker { conn, msg })
    }

    fn accept(&mut self, conn: ConnId, name: &str, attempt: u32) -> &mut Self {
        let job_id = self.id(name);
        self.msg(conn, &format!("accept {name}#{attempt}"), WorkerToBroker::Accept { job_id, attempt })
    }

    fn finish(&mut self, conn: ConnId, name: &str, attempt: u32, status: ExitStatus) -> &mut Self {
        let job_id = self.id(name);
        self.msg(
            conn,
            &format!("finish {name}#{attempt} {status:?}"),
            WorkerToBroker::Finish { job_id, attempt, status, outputs: vec![] },
        )
    }

    fn run(&mut self, label: &str, command: Command) -> &mut Self {
        let reply = self.core.apply(self.now, command);
        let (events, effects) = self.core.take_output();
        writeln!(self.out, "t={} {label}", self.now).unwrap();
        for e in &events {
            writeln!(self.out, "  event {}", self.event(e)).unwrap();
        }
        for e in &effects {
            writeln!(self.out, "  send {}", self.effect(e)).unwrap();
        }
        match reply {
            Reply::Done => {}
            r => writeln!(self.out, "  reply {}", self.reply(&r)).unwrap(),
        }
        self
    }

    fn name(&self, id: &JobId) -> String {
        self.names.get(id).cloned().unwrap_or_else(|| id.short())
    }

    fn event(&self, e: &Event) -> String {
        let n = |id: &[u8; 32]| self.name(&JobId(*id));
        match e {
            Event::Submitted { job, queue, namespace, priority, .. } => {
                format!("submitted {} queue={queue} ns={namespace:?} prio={priority}", n(job))
            }
            Event::Joined { job, namespace } => format!("joined {} ns={namespace:?}", n(job)),
            Event::NamespaceLeft { job, namespace } => format!("left {} ns={namespace}", n(job)),
            Event::Assigned { job, worker, attempt, .. } => format!("assigned {}#{attempt} to {worker}", n(job)),
            Event::Started { job, attempt, .. } => format!("started {}#{attempt}", n(job)),
            Event::Logged { job, lines, truncated } => format!(
                "logged {} {:?} truncated={truncated}",
                n(job),
                lines.iter().map(|l| l.text.as_str()).collect::<Vec<_>>()
            ),
            Event::Requeued { job, lost } => format!("requeued {} lost={lost}", n(job)),
            Event::Finished { job, reason, exit_code, message, .. } => {
                format!("finished {} {reason:?} exit={exit_code:?} {}", n(job), message.as_deref().unwrap_or(""))
            }
            Event::Forgotten { job } => format!("forgotten {}", n(job)),
        }
    }

    fn effect(&self, e: &Effect) -> String {
        match e {
            Effect::Worker { to, msg } => {
                let m = match msg {
                    BrokerToWorker::Welcome { .. } => "welcome".to_string(),
                    BrokerToWorker::Assign { job_id, attempt, .. } => format!("assign {}#{attempt}", self.name(job_id)),
                    BrokerToWorker::Cancel { job_id, attempt, reason } => {
                        format!("cancel {}#{attempt} ({reason})", self.name(job_id))
                    }
                    BrokerToWorker::FinishAck { job_id, attempt } => {
                        format!("finishAck {}#{attempt}", self.name(job_id))
                    }
                    BrokerToWorker::Error(e) => format!("error {:?}", e.code),
                };
                format!("c{to}: {m}")
            }
            Effect::Client { to, msg } => {
                let m = match &**msg {
                    BrokerToClient::QueueSnapshot { seq, jobs, workers, .. } => {
                        format!("queueSnapshot seq={seq} jobs={} workers={}", jobs.len(), workers.len())
                    }
                    BrokerToClient::QueueJob { seq, job, .. } => {
                        format!("queueJob seq={seq} {} {:?}", self.name(&job.id), job.state)
                    }
                    BrokerToClient::QueueWorkers { seq, workers, .. } => {
                        format!("queueWorkers seq={seq} n={}", workers.len())
                    }
                    BrokerToClient::Job { job } => {
                        let waiting = job.waiting.as_ref().map(|w| format!(" waiting: {w}")).unwrap_or_default();
                        format!("job {} {:?} v{}{waiting}", self.name(&job.id), job.state, job.version)
                    }
                    BrokerToClient::Logs { job_id, offset, lines } => {
                        format!("logs {} @{offset} n={}", self.name(job_id), lines.len())
                    }
                    BrokerToClient::Error(e) => format!("error {:?}", e.code),
                    other => format!("{other:?}"),
                };
                format!("{}: {m}", to.iter().map(|c| format!("c{c}")).collect::<Vec<_>>().join(","))
            }
            Effect::Close { conn, code, reason } => format!("close c{conn} {code} ({reason})"),
        }
    }

    fn reply(&self, r: &Reply) -> String {
        match r {
            Reply::Submitted { outcome, job } => format!("{outcome:?} {} {:?}", self.name(&job.id), job.state),
            Reply::Cancelled(job) | Reply::Job(job) => {
                let waiting = job.waiting.as_ref().map(|w| format!(" waiting: {w}")).unwrap_or_default();
                format!("{} {:?} {:?} attempt={}{waiting}", self.name(&job.id), job.state, job.reason, job.attempt)
            }
            Reply::Error(e) => format!("error {:?}: {}", e.code, e.message),
            other => format!("{other:?}"),
        }
    }

    /// Replaces job ids in rendered text by the names the script gave them.
    fn named(&self, text: &str) -> String {
        let mut text = text.to_string();
        for (id, name) in &self.names {
            text = text.replace(&id.to_string(), name);
        }
        text
    }

    fn check(&mut self, expect: Expect) {
        let out = std::mem::take(&mut self.out);
        expect.assert_eq(&self.named(&out));
    }
}

#[test]
fn jobs_are_pushed_on_enqueue_to_the_least_loaded_fitting_worker() {
    let mut s = script();
    s.worker(1, "w1", 2, 0, &[], &[]).worker(2, "w2", 1, 1, &["gpu"], &[]);
    s.submit("q", "a")
        .submit("q", "b")
        .submit_with("q", "g", r#","resources":{"gpus":1},"tags":["gpu"]"#, None, false)
        .submit("q", "c");
    s.check(expect![[r#"
        t=0 hello w1 on c1 slots=2 gpus=0 tags=[]
          send c1: welcome
        t=0 hello w2 on c2 slots=1 gpus=1 tags=["gpu"]
          send c2: welcome
        t=0 submit a to q
          event submitted a queue=q ns=None prio=0
          event assigned a#1 to w1
          send c1: assign a#1
          reply Created a Assigned
        t=0 submit b to q
          event submitted b queue=q ns=None prio=0
          event assigned b#1 to w1
          send c1: assign b#1
          reply Created b Assigned
        t=0 submit g to q
          event submitted g queue=q ns=None prio=0
          event assigned g#1 to w2
          send c2: assign g#1
          reply Created g Assigned
        t=0 submit c to q
          event submitted c queue=q ns=None prio=0
          reply Created c Queued
    "#]]);
}

#[test]
fn a_freed_slot_takes_the_next_job_fifo_within_priority() {
    let mut s = script();
    s.worker(1, "w1", 1, 0, &[], &[]).submit("q", "a").submit("q", "b").submit_with(
        "q",
        "p",
        r#","env":{"prio":"1"}"#,
        None,
        false,
    );
    s.out.clear();
    s.accept(1, "a", 1).finish(1, "a", 1, ExitStatus::Exited { exit_code: 0 }).accept(1, "p", 1).finish(
        1,
        "p",
        1,
        ExitStatus::Exited { exit_code: 2 },
    );
    s.check(expect![[r#"
        t=0 c1 accept a#1
          event started a#1
        t=0 c1 finish a#1 Exited { exit_code: 0 }
          event finished a Succeeded exit=Some(0) 
          event assigned p#1 to w1
          send c1: finishAck a#1
          send c1: assign p#1
        t=0 c1 accept p#1
          event started p#1
        t=0 c1 finish p#1 Exited { exit_code: 2 }
          event finished p Failed exit=Some(2) exited with code 2
          event assigned b#1 to w1
          send c1: finishAck p#1
          send c1: assign b#1
    "#]]);
}

#[test]
fn a_lost_worker_requeues_after_grace_and_stale_attempts_are_fenced() {
    let mut s = script();
    s.worker(1, "w1", 1, 0, &[], &[]).submit("q", "a").accept(1, "a", 1);
    s.out.clear();
    s.at(10).run("c1 disconnects", Command::Disconnected { conn: 1 });
    assert_eq!(s.core.next_deadline(), Some(1010));
    s.at(500).worker(2, "w2", 1, 0, &[], &[]);
    s.at(1010).run("tick", Command::Tick);
    s.at(1020).worker(3, "w1", 1, 0, &[], &[("a", 1)]);
    s.finish(3, "a", 1, ExitStatus::Exited { exit_code: 0 });
    s.accept(2, "a", 2).finish(2, "a", 2, ExitStatus::Exited { exit_code: 0 });
    s.check(expect![[r#"
        t=10 c1 disconnects
        t=500 hello w2 on c2 slots=1 gpus=0 tags=[]
          send c2: welcome
        t=1010 tick
          event logged a ["cq: attempt 1 did not finish (worker gone: w1 did not come back within 1000 ms); the job is queued again\n"] truncated=false
          event requeued a lost=true
          event assigned a#2 to w2
          send c2: assign a#2
        t=1020 hello w1 on c3 slots=1 gpus=0 tags=[]
          send c3: welcome
          send c3: cancel a#1 (this attempt is no longer assigned to this worker)
        t=1020 c3 finish a#1 Exited { exit_code: 0 }
          send c3: error StaleAttempt
          send c3: cancel a#1 (stale attempt)
        t=1020 c2 accept a#2
          event started a#2
        t=1020 c2 finish a#2 Exited { exit_code: 0 }
          event finished a Succeeded exit=Some(0) 
          send c2: finishAck a#2
    "#]]);
}

#[test]
fn a_worker_back_within_grace_keeps_its_jobs_and_a_spent_budget_ends_as_worker_lost() {
    let mut s = script();
    s.worker(1, "w1", 2, 0, &[], &[]).submit("q", "a").submit("q", "b").accept(1, "a", 1).accept(1, "b", 1);
    s.out.clear();
    s.at(10).run("c1 disconnects", Command::Disconnected { conn: 1 });
    s.at(20).worker(2, "w1", 2, 0, &[], &[("a", 1)]);
    s.at(30).run("c2 disconnects", Command::Disconnected { conn: 2 });
    s.at(2000).run("tick", Command::Tick);
    s.check(expect![[r#"
        t=10 c1 disconnects
        t=20 hello w1 on c2 slots=2 gpus=0 tags=[]
          event logged b ["cq: attempt 1 did not finish (the worker came back without it); the job is queued again\n"] truncated=false
          event requeued b lost=true
          event assigned b#2 to w1
          send c2: welcome
          send c2: assign b#2
        t=30 c2 disconnects
        t=2000 tick
          event finished b WorkerLost exit=None worker gone: w1 did not come back within 1000 ms; retry budget of 1 spent
          event logged a ["cq: attempt 1 did not finish (worker gone: w1 did not come back within 1000 ms); the job is queued again\n"] truncated=false
          event requeued a lost=true
    "#]]);
}

#[test]
fn dedup_cache_and_force() {
    let mut s = script();
    s.submit("q", "a").submit("q", "a").submit("other", "a");
    s.worker(1, "w1", 1, 0, &[], &[]).accept(1, "a", 1).finish(1, "a", 1, ExitStatus::Exited { exit_code: 1 });
    s.out.clear();
    s.submit("q", "a").submit_with("q", "a", "", None, true);
    s.accept(1, "a", 2).finish(1, "a", 2, ExitStatus::Error { message: "pull failed".into(), retryable: false });
    s.submit("q", "a");
    s.check(expect![[r#"
        t=0 submit a to q
          reply Cached a Finished
        t=0 submit a to q force
          event submitted a queue=q ns=None prio=0
          event assigned a#2 to w1
          send c1: assign a#2
          reply Rerun a Assigned
        t=0 c1 accept a#2
          event started a#2
        t=0 c1 finish a#2 Error { message: "pull failed", retryable: false }
          event finished a Error exit=None pull failed
          send c1: finishAck a#2
        t=0 submit a to q
          event submitted a queue=q ns=None prio=0
          event assigned a#3 to w1
          send c1: assign a#3
          reply Rerun a Assigned
    "#]]);
    let mut s = script();
    s.submit("q", "a").submit("q", "a").submit("other", "a");
    let out = std::mem::take(&mut s.out);
    assert!(out.contains("reply Joined a Queued"), "{out}");
    assert!(out.contains("reply error Conflict"), "{out}");
}

#[test]
fn a_newer_submission_supersedes_the_namespace_and_the_worker_is_told() {
    let mut s = script();
    s.worker(1, "w1", 1, 0, &[], &[]);
    s.submit_with("q", "a", "", Some("doc"), false).accept(1, "a", 1);
    s.submit_with("q", "shared", "", Some("doc2"), false).submit_with("q", "shared", "", Some("doc3"), false);
    s.out.clear();
    s.submit_with("q", "b", "", Some("doc"), false);
    s.submit_with("q", "c", "", Some("doc2"), false);
    s.submit_with("q", "d", "", Some("doc3"), false);
    s.check(expect![[r#"
        t=0 submit b to q ns=doc
          event left a ns=doc
          event finished a Superseded exit=None superseded by job b in namespace `doc`
          event submitted b queue=q ns=Some("doc") prio=0
          send c1: cancel a#1 (superseded by job b in namespace `doc`)
          reply Created b Queued
        t=0 submit c to q ns=doc2
          event left shared ns=doc2
          event submitted c queue=q ns=Some("doc2") prio=0
          reply Created c Queued
        t=0 submit d to q ns=doc3
          event left shared ns=doc3
          event finished shared Superseded exit=None superseded by job d in namespace `doc3`
          event submitted d queue=q ns=Some("doc3") prio=0
          reply Created d Queued
    "#]]);
}

#[test]
fn cancel_queued_running_and_by_namespace() {
    let mut s = script();
    s.worker(1, "w1", 1, 0, &[], &[]);
    s.submit("q", "a").accept(1, "a", 1).submit("q", "b");
    s.submit_with("q", "n", "", Some("x"), false).submit_with("q", "n", "", Some("y"), false);
    s.out.clear();
    let (a, b, n) = (s.id("a"), s.id("b"), s.id("n"));
    s.run("cancel b", Command::Cancel { job: b, namespace: None });
    s.run("cancel a", Command::Cancel { job: a, namespace: None });
    s.run("cancel n ns=x", Command::Cancel { job: n, namespace: Some("x".into()) });
    s.run("cancel n ns=zz", Command::Cancel { job: n, namespace: Some("zz".into()) });
    s.finish(1, "a", 1, ExitStatus::Exited { exit_code: 137 });
    s.accept(1, "n", 1);
    s.run("cancel n ns=y", Command::Cancel { job: n, namespace: Some("y".into()) });
    s.check(expect![[r#"
        t=0 cancel b
          event finished b Cancelled exit=None cancelled by a client
          reply b Finished Some(Cancelled) attempt=0
        t=0 cancel a
          event finished a Cancelled exit=None cancelled by a client
          send c1: cancel a#1 (cancelled by a client)
          reply a Finished Some(Cancelled) attempt=1
        t=0 cancel n ns=x
          event left n ns=x
          reply n Queued None attempt=0
        t=0 cancel n ns=zz
          reply error NotFound: job n does not belong to namespace `zz`
        t=0 c1 finish a#1 Exited { exit_code: 137 }
          event assigned n#1 to w1
          send c1: finishAck a#1
          send c1: assign n#1
        t=0 c1 accept n#1
          event started n#1
        t=0 cancel n ns=y
          event left n ns=y
          event finished n Cancelled exit=None cancelled by namespace `y`
          send c1: cancel n#1 (cancelled by namespace `y`)
          reply n Finished Some(Cancelled) attempt=1
    "#]]);
}

#[test]
fn watchers_get_snapshots_then_numbered_updates_and_logs() {
    let mut s = script();
    s.core.config.max_log_bytes = 20;
    s.run("c9 watches q", Command::WatchQueue { conn: 9, queue: "q".into() });
    s.worker(1, "w1", 1, 0, &[], &[]).submit("q", "a");
    let a = s.id("a");
    s.run("c8 follows a", Command::WatchJob { conn: 8, job: a, since: 0, follow: true });
    s.accept(1, "a", 1);
    let line = |t: &str| LogLine { stream: Stream::Stdout, time: 1, text: t.into() };
    s.msg(
        1,
        "logs",
        WorkerToBroker::Logs { job_id: a, attempt: 1, lines: vec![line("0123456789"), line("abcdefghij"), line("x")] },
    );
    s.msg(1, "logs again", WorkerToBroker::Logs { job_id: a, attempt: 1, lines: vec![line("more")] });
    s.finish(1, "a", 1, ExitStatus::Exited { exit_code: 0 });
    s.run("c7 watches a from 1", Command::WatchJob { conn: 7, job: a, since: 1, follow: false });
    s.run("logs", Command::GetLogs { job: a, since: 1, limit: 1 });
    s.check(expect![[r#"
        t=0 c9 watches q
          send c9: queueSnapshot seq=0 jobs=0 workers=0
        t=0 hello w1 on c1 slots=1 gpus=0 tags=[]
          send c1: welcome
          send c9: queueWorkers seq=1 n=1
        t=0 submit a to q
          event submitted a queue=q ns=None prio=0
          event assigned a#1 to w1
          send c1: assign a#1
          send c9: queueJob seq=2 a Assigned
          send c9: queueWorkers seq=3 n=1
          reply Created a Assigned
        t=0 c8 follows a
          send c8: job a Assigned v2
        t=0 c1 accept a#1
          event started a#1
          send c9: queueJob seq=4 a Running
          send c8: job a Running v3
        t=0 c1 logs
          event logged a ["0123456789", "abcdefghij", "cq: log truncated at 20 bytes; further output is dropped\n"] truncated=true
          send c8: logs a @0 n=3
        t=0 c1 logs again
        t=0 c1 finish a#1 Exited { exit_code: 0 }
          event finished a Succeeded exit=Some(0) 
          send c1: finishAck a#1
          send c9: queueJob seq=5 a Finished
          send c8: job a Finished v4
          send close c8 1000 (job finished)
          send c9: queueWorkers seq=6 n=1
        t=0 c7 watches a from 1
          send c7: job a Finished v4
          send c7: logs a @1 n=2
        t=0 logs
          reply Logs { offset: 1, lines: [LogLine { stream: Stdout, time: 1, text: "abcdefghij" }], total: 3, finished: true }
    "#]]);
}

#[test]
fn retention_forgets_finished_jobs_and_forget_refuses_live_ones() {
    let mut s = script();
    s.worker(1, "w1", 1, 0, &[], &[]).submit("q", "a").submit("q", "b").accept(1, "a", 1);
    s.at(100).finish(1, "a", 1, ExitStatus::Exited { exit_code: 0 });
    s.out.clear();
    let b = s.id("b");
    s.run("forget b", Command::Forget { job: b });
    assert_eq!(s.core.next_deadline(), Some(60_100));
    s.at(60_100).run("tick", Command::Tick);
    s.check(expect![[r#"
        t=100 forget b
          reply error Conflict: job b is assigned; cancel it before deleting its result
        t=60100 tick
          event forgotten a
    "#]]);
}

/// Replaying the emitted events into a fresh core gives the same durable state, and a
/// snapshot restores it exactly.
#[test]
fn replay_and_snapshot_reproduce_the_state() {
    let mut s = script();
    s.worker(1, "w1", 1, 0, &[], &[]);
    s.submit_with("q", "a", "", Some("doc"), false).accept(1, "a", 1);
    let a = s.id("a");
    s.msg(
        1,
        "logs",
        WorkerToBroker::Logs {
            job_id: a,
            attempt: 1,
            lines: vec![LogLine { stream: Stream::Stderr, time: 3, text: "hi".into() }],
        },
    );
    s.submit_with("q", "b", "", Some("doc"), false).submit("q", "c").finish(
        1,
        "a",
        1,
        ExitStatus::Exited { exit_code: 0 },
    );
    let mut all = Vec::new();
    // Rerun the same script, keeping the events this time.
    let mut live = Core::new(s.core.config().clone());
    let mut replayed = Core::new(s.core.config().clone());
    let d = |n: &str, ns: Option<&str>| {
        let d = def(n, "");
        Command::Submit(Submit {
            queue: "q".into(),
            job: d.job_id(),
            definition: Arc::from(serde_json::to_string(&d).unwrap()),
            gpus: 0,
            tags: vec![],
            namespace: ns.map(str::to_string),
            priority: 0,
            force: false,
            retries: None,
        })
    };
    let hello = WorkerHello {
        protocol: 1,
        token: None,
        worker_id: WorkerId("w1".into()),
        queues: vec!["q".into()],
        slots: 1,
        gpus: 0,
        tags: vec![],
        held: vec![],
        agent: None,
    };
    for cmd in [
        Command::WorkerHello { conn: 1, hello },
        d("a", Some("doc")),
        Command::Worker { conn: 1, msg: WorkerToBroker::Accept { job_id: a, attempt: 1 } },
        d("b", Some("doc")),
        d("c", None),
        Command::Worker {
            conn: 1,
            msg: WorkerToBroker::Finish {
                job_id: a,
                attempt: 1,
                status: ExitStatus::Exited { exit_code: 0 },
                outputs: vec![],
            },
        },
    ] {
        live.apply(5, cmd);
        all.extend(live.take_output().0);
    }
    for e in &all {
        replayed.replay(e);
    }
    assert_eq!(live.snapshot(), replayed.snapshot());
    let mut restored = Core::new(s.core.config().clone());
    restored.restore(live.snapshot());
    assert_eq!(live.snapshot(), restored.snapshot());
    // Workers are volatile: compare the durable counts only.
    let durable = |c: &Core| {
        c.summary(&Some("q".into()))
            .into_iter()
            .map(|s| (s.queued, s.assigned, s.running, s.finished))
            .collect::<Vec<_>>()
    };
    assert_eq!(durable(&live), durable(&restored));
}

#[test]
fn progress_reaches_watchers_and_a_draining_worker_hands_work_back() {
    let mut s = script();
    s.worker(1, "w1", 2, 0, &[], &[]).submit("q", "a").accept(1, "a", 1);
    let a = s.id("a");
    s.run("c9 watches a", Command::WatchJob { conn: 9, job: a, since: 0, follow: false });
    s.out.clear();
    s.msg(
        1,
        "progress a#1 pulling",
        WorkerToBroker::Progress {
            job_id: a,
            attempt: 1,
            phase: protocol::job::Phase::Pulling,
            message: None,
            current: Some(1),
            total: Some(2),
        },
    );
    s.msg(1, "drain", WorkerToBroker::Drain);
    s.submit("q", "b");
    s.msg(1, "release a#1", WorkerToBroker::Release { job_id: a, attempt: 1, reason: Some("stopping".into()) });
    s.worker(2, "w2", 1, 0, &[], &[]);
    s.check(expect![[r#"
        t=0 c1 progress a#1 pulling
          send c9: job a Running v4
        t=0 c1 drain
        t=0 submit b to q
          event submitted b queue=q ns=None prio=0
          reply Created b Queued
        t=0 c1 release a#1
          event logged a ["cq: attempt 1 did not finish (released by its worker); the job is queued again\n"] truncated=false
          event requeued a lost=false
          send c9: logs a @0 n=1
          send c9: job a Queued v6 waiting: no connected worker serves queue `q`
        t=0 hello w2 on c2 slots=1 gpus=0 tags=[]
          event assigned a#2 to w2
          send c2: welcome
          send c2: assign a#2
          send c9: job a Assigned v8
    "#]]);
}

#[test]
fn an_assignment_not_accepted_in_time_is_taken_back() {
    let mut s = script();
    s.core.config.accept_timeout_ms = 100;
    s.worker(1, "w1", 1, 0, &[], &[]).submit("q", "a");
    s.out.clear();
    assert_eq!(s.core.next_deadline(), Some(100));
    s.at(100).run("tick", Command::Tick);
    s.accept(1, "a", 1).accept(1, "a", 2);
    assert_eq!(s.core.next_deadline(), Some(200));
    s.at(200).run("tick after acceptance", Command::Tick);
    s.check(expect![[r#"
        t=100 tick
          event requeued a lost=false
          event assigned a#2 to w1
          send c1: cancel a#1 (not accepted within 100 ms)
          send c1: assign a#2
        t=100 c1 accept a#1
          send c1: error StaleAttempt
          send c1: cancel a#1 (stale attempt)
        t=100 c1 accept a#2
          event started a#2
        t=200 tick after acceptance
    "#]]);
}

/// Reproduction 1 of the lifecycle issue: a cancelled (or superseded) running attempt keeps its
/// slot until the worker acknowledges the cancel with a `cancelled` finish, and frees it then.
#[test]
fn a_cancel_frees_the_slot_when_the_worker_acknowledges_it() {
    let mut s = script();
    s.worker(1, "w1", 1, 0, &[], &[]).submit("q", "a").accept(1, "a", 1);
    let a = s.id("a");
    s.out.clear();
    s.run("cancel a", Command::Cancel { job: a, namespace: None });
    s.submit_with("q", "b", "", Some("doc"), false);
    s.finish(1, "a", 1, ExitStatus::Cancelled).accept(1, "b", 1);
    s.submit_with("q", "c", "", Some("doc"), false);
    s.finish(1, "b", 1, ExitStatus::Cancelled);
    s.run("summary", Command::Summary { queue: Some("q".into()) });
    s.check(expect![[r#"
        t=0 cancel a
          event finished a Cancelled exit=None cancelled by a client
          send c1: cancel a#1 (cancelled by a client)
          reply a Finished Some(Cancelled) attempt=1
        t=0 submit b to q ns=doc
          event submitted b queue=q ns=Some("doc") prio=0
          reply Created b Queued
        t=0 c1 finish a#1 Cancelled
          event assigned b#1 to w1
          send c1: finishAck a#1
          send c1: assign b#1
        t=0 c1 accept b#1
          event started b#1
        t=0 submit c to q ns=doc
          event left b ns=doc
          event finished b Superseded exit=None superseded by job c in namespace `doc`
          event submitted c queue=q ns=Some("doc") prio=0
          send c1: cancel b#1 (superseded by job c in namespace `doc`)
          reply Created c Queued
        t=0 c1 finish b#1 Cancelled
          event assigned c#1 to w1
          send c1: finishAck b#1
          send c1: assign c#1
        t=0 summary
          reply Summary([QueueSummary { queue: "q", queued: 0, assigned: 1, running: 0, finished: 2, oldest_queued_ms: None, workers: 1, slots: 1, free_slots: 0 }])
    "#]]);
}

/// Reproduction 5: a transient error is retried after a backoff, and the job says why it waits;
/// a permanent one ends the job at once.
#[test]
fn a_transient_error_is_retried_after_a_backoff_and_a_permanent_one_ends_the_job() {
    let mut s = script();
    s.worker(1, "w1", 1, 0, &[], &[]).submit("q", "a").accept(1, "a", 1);
    let a = s.id("a");
    s.run("watch a", Command::WatchJob { conn: 9, job: a, since: 0, follow: false });
    s.out.clear();
    s.finish(1, "a", 1, ExitStatus::Error { message: "Docker does not answer".into(), retryable: true });
    s.at(500).run("tick", Command::Tick);
    s.at(1000).run("tick", Command::Tick);
    s.accept(1, "a", 2).finish(1, "a", 2, ExitStatus::Error { message: "image not found".into(), retryable: false });
    s.check(expect![[r#"
        t=0 c1 finish a#1 Error { message: "Docker does not answer", retryable: true }
          event logged a ["cq: attempt 1 did not finish (Docker does not answer); the job is queued again\n"] truncated=false
          event requeued a lost=true
          send c9: logs a @0 n=1
          send c1: finishAck a#1
          send c9: job a Queued v5 waiting: attempt 1 failed: Docker does not answer; retry 1 of 1 in 1 s
        t=500 tick
        t=1000 tick
          event assigned a#2 to w1
          send c1: assign a#2
          send c9: job a Assigned v7
        t=1000 c1 accept a#2
          event started a#2
          send c9: job a Running v8
        t=1000 c1 finish a#2 Error { message: "image not found", retryable: false }
          event finished a Error exit=None image not found
          send c1: finishAck a#2
          send c9: job a Finished v9
    "#]]);
}

/// Reproduction 6: a job no connected worker could ever take says why it waits, and the reason
/// goes away when a worker that fits connects.
#[test]
fn unservable_jobs_say_why_they_wait() {
    let mut s = script();
    s.submit("q", "plain");
    s.submit_with("q", "g", r#","resources":{"gpus":2},"tags":["gpu"]"#, None, false);
    let (plain, gpu) = (s.id("plain"), s.id("g"));
    s.out.clear();
    s.run("get plain", Command::GetJob { job: plain });
    s.run("watch g", Command::WatchJob { conn: 8, job: gpu, since: 0, follow: false });
    s.worker(1, "w1", 1, 0, &["gpu"], &[]);
    s.worker(2, "w2", 1, 4, &[], &[]);
    s.worker(3, "w3", 1, 4, &["gpu"], &[]);
    s.check(expect![[r#"
        t=0 get plain
          reply plain Queued None attempt=0 waiting: no connected worker serves queue `q`
        t=0 watch g
          send c8: job g Queued v2 waiting: no connected worker serves queue `q`
        t=0 hello w1 on c1 slots=1 gpus=0 tags=["gpu"]
          event assigned plain#1 to w1
          send c1: welcome
          send c1: assign plain#1
          send c8: job g Queued v3 waiting: the job needs 2 GPUs; the connected workers that fit have at most 0
        t=0 hello w2 on c2 slots=1 gpus=4 tags=[]
          send c2: welcome
        t=0 hello w3 on c3 slots=1 gpus=4 tags=["gpu"]
          event assigned g#1 to w3
          send c3: welcome
          send c3: assign g#1
          send c8: job g Assigned v5
    "#]]);
}

/// Reproduction 7: a hello names a bounded number of queues, queues nobody uses are dropped,
/// and slot sums saturate instead of wrapping.
#[test]
fn worker_input_is_bounded_and_unused_queues_go_away() {
    let mut s = script();
    let many: Vec<String> = (0..=MAX_HELLO_QUEUES).map(|i| format!("q{i}")).collect();
    let mut hello = WorkerHello {
        protocol: 1,
        token: None,
        worker_id: WorkerId("w0".into()),
        queues: many,
        slots: 1,
        gpus: 0,
        tags: Vec::new(),
        held: Vec::new(),
        agent: None,
    };
    s.run("hello naming 65 queues", Command::WorkerHello { conn: 5, hello: hello.clone() });
    hello.queues = vec!["a".into(), "b".into()];
    hello.slots = u32::MAX;
    s.run("hello w0 on a, b", Command::WorkerHello { conn: 5, hello: hello.clone() });
    hello.worker_id = WorkerId("w1".into());
    s.run("hello w1 on a, b", Command::WorkerHello { conn: 6, hello });
    s.run("summary a", Command::Summary { queue: Some("a".into()) });
    s.run("w0 leaves", Command::Disconnected { conn: 5 });
    s.run("w1 leaves", Command::Disconnected { conn: 6 });
    s.run("overview", Command::Overview);
    s.check(expect![[r#"
        t=0 hello naming 65 queues
          reply error BadMessage: a worker serves at most 64 queues; this one named 65
        t=0 hello w0 on a, b
          send c5: welcome
        t=0 hello w1 on a, b
          send c6: welcome
        t=0 summary a
          reply Summary([QueueSummary { queue: "a", queued: 0, assigned: 0, running: 0, finished: 0, oldest_queued_ms: None, workers: 2, slots: 4294967295, free_slots: 4294967295 }])
        t=0 w0 leaves
        t=0 w1 leaves
        t=0 overview
          reply Overview(Overview { queues: [], finished: [], dispatched: 0, jobs: 0, workers: 0, connections: 0 })
    "#]]);
}

#[test]
fn a_worker_s_system_lines_name_the_worker() {
    let mut s = script();
    s.core.config.max_log_bytes = 1000;
    s.worker(1, "w1", 1, 0, &[], &[]).submit("q", "a");
    let a = s.id("a");
    s.accept(1, "a", 1);
    let line = |stream: Stream, t: &str| LogLine { stream, time: 1, text: t.into() };
    let lines = vec![
        line(Stream::Stdout, "cq: from the job\n"),
        line(Stream::System, "cq: the worker's note\n"),
        line(Stream::System, "one\ncq: log truncated at 1 bytes; further output is dropped\n"),
    ];
    s.msg(1, "logs", WorkerToBroker::Logs { job_id: a, attempt: 1, lines });
    s.check(expect![[r#"
        t=0 hello w1 on c1 slots=1 gpus=0 tags=[]
          send c1: welcome
        t=0 submit a to q
          event submitted a queue=q ns=None prio=0
          event assigned a#1 to w1
          send c1: assign a#1
          reply Created a Assigned
        t=0 c1 accept a#1
          event started a#1
        t=0 c1 logs
          event logged a ["cq: from the job\n", "cq worker w1: the worker's note\n", "cq worker w1: one\ncq worker w1: log truncated at 1 bytes; further output is dropped\n"] truncated=false
    "#]]);
}

/// A job cancelled and submitted again while its worker still stops the old attempt waits for
/// that attempt's end (or goes to another worker): a worker holds one attempt of a job, and each
/// end report frees exactly one slot.
#[test]
fn a_job_submitted_again_waits_for_its_old_attempt_to_end() {
    let mut s = script();
    s.worker(1, "w1", 2, 0, &[], &[]).submit("q", "a").accept(1, "a", 1);
    let a = s.id("a");
    s.out.clear();
    s.run("cancel a", Command::Cancel { job: a, namespace: None });
    s.submit_with("q", "a", "", None, false);
    s.run("summary", Command::Summary { queue: Some("q".into()) });
    s.finish(1, "a", 1, ExitStatus::Cancelled);
    s.run("summary", Command::Summary { queue: Some("q".into()) });
    s.check(expect![[r#"
        t=0 cancel a
          event finished a Cancelled exit=None cancelled by a client
          send c1: cancel a#1 (cancelled by a client)
          reply a Finished Some(Cancelled) attempt=1
        t=0 submit a to q
          event submitted a queue=q ns=None prio=0
          reply Rerun a Queued
        t=0 summary
          reply Summary([QueueSummary { queue: "q", queued: 1, assigned: 0, running: 0, finished: 0, oldest_queued_ms: Some(0), workers: 1, slots: 2, free_slots: 1 }])
        t=0 c1 finish a#1 Cancelled
          event assigned a#2 to w1
          send c1: finishAck a#1
          send c1: assign a#2
        t=0 summary
          reply Summary([QueueSummary { queue: "q", queued: 0, assigned: 1, running: 0, finished: 0, oldest_queued_ms: None, workers: 1, slots: 2, free_slots: 1 }])
    "#]]);
}
