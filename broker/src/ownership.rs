//! Who owns a shard's log, as a state machine without I/O: [`Ownership`] says what to ask the
//! lease store next ([`Step`]) and learns from the answers; [`crate::lease`] carries the steps to
//! a NATS KV bucket, and the tests below to a simulated store with lost answers and paused nodes.
//!
//! The lease is a key with a time to live on the store's clock. A node believes it owns the
//! shard until `sent + ttl - margin`, where `sent` is when it *sent* its last successful write:
//! the store wrote it no earlier, so its copy expires no earlier. Two nodes therefore never
//! believe at once, whatever the delays, as long as their clocks run at the same rate within
//! `margin / ttl` (they need not agree on the time). A node that cannot renew in time steps down
//! on its own. The lease only decides who *should* write; the log's fence
//! (`Nats-Expected-Last-Sequence`, see [`crate::jetstream`]) decides who *can*, so a node that
//! was paused past its lease and wakes up still cannot acknowledge anything.

use std::time::Duration;

use tokio::time::Instant;

/// How long a lease lasts and how often it is renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimes {
    /// Lifetime of a write on the store's clock.
    pub ttl: Duration,
    /// Time between renewals.
    pub renew_every: Duration,
    /// Taken off the lifetime on the node's side, for clock rate differences.
    pub margin: Duration,
    /// Time between attempts of a standby to take the lease.
    pub retry_every: Duration,
}

impl Default for LeaseTimes {
    /// A 15 s lease renewed every 1.5 s: a dead owner is replaced after about 15 s, and the
    /// owner rides out the lease store being away while NATS elects a new leader for it (its
    /// Raft election timeout is 4 to 9 s), which happens whenever a NATS server restarts.
    fn default() -> LeaseTimes {
        LeaseTimes::for_ttl(Duration::from_secs(15))
    }
}

impl LeaseTimes {
    /// A lease of `ttl`, renewed every tenth of it, a tenth of it as the margin, and standbys
    /// trying every tenth of it (at most every second).
    pub fn for_ttl(ttl: Duration) -> LeaseTimes {
        LeaseTimes { ttl, renew_every: ttl / 10, margin: ttl / 10, retry_every: (ttl / 10).min(Duration::from_secs(1)) }
    }

    /// Checks that renewals fit inside the lease.
    pub fn validate(&self) -> Result<(), String> {
        if self.margin >= self.ttl || self.renew_every * 2 > self.ttl - self.margin {
            return Err(format!(
                "a lease of {:?} with a margin of {:?} must leave room for two renewals every {:?}",
                self.ttl, self.margin, self.renew_every
            ));
        }
        Ok(())
    }
}

/// What the node should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Create the key (it must not exist); answer with [`Ownership::created`].
    Create,
    /// Update the key expecting `revision`; answer with [`Ownership::renewed`].
    Renew { revision: u64 },
    /// Nothing until this instant (or until the store says the key went away).
    Wait(Instant),
    /// The lease is lost or was never renewed in time: stop acting as the owner.
    StepDown,
}

/// How a create was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Created at this revision, which is the owner's epoch.
    Yes(u64),
    /// Someone holds the key.
    Taken,
    /// No answer: the key may or may not be ours (if it is, it expires unrenewed).
    Unknown,
}

/// How a renewal was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewed {
    /// Written at this revision.
    Yes(u64),
    /// The key holds an earlier write of this node at this revision (a renewal whose answer was
    /// lost did land): renew again from there, without extending the lease.
    Behind(u64),
    /// The key is gone or holds someone else's write.
    Lost,
    /// No answer.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Standby { next_try: Instant },
    Owner { epoch: u64, revision: u64, valid_until: Instant, next_renew: Instant },
    Deposed,
}

/// One node's view of one lease.
#[derive(Debug, Clone)]
pub struct Ownership {
    times: LeaseTimes,
    state: State,
    /// When the write now awaiting its answer was sent.
    sent: Option<Instant>,
}

/// After an unanswered renewal, the next one goes out this soon.
const RENEW_RETRY: Duration = Duration::from_millis(200);

impl Ownership {
    pub fn new(times: LeaseTimes, now: Instant) -> Ownership {
        Ownership { times, state: State::Standby { next_try: now }, sent: None }
    }

    /// The owner's epoch (the revision of the write that took the lease) while this node
    /// believes it owns the lease at `now`.
    pub fn owner_epoch(&self, now: Instant) -> Option<u64> {
        match self.state {
            State::Owner { epoch, valid_until, .. } if now < valid_until => Some(epoch),
            _ => None,
        }
    }

    /// True if a standby's next [`Ownership::poll`] at `now` asks to create the key.
    pub fn create_due(&self, now: Instant) -> bool {
        matches!(self.state, State::Standby { next_try } if now >= next_try)
    }

    /// Whether the node gave the lease up or lost it; it never takes it again.
    pub fn is_deposed(&self) -> bool {
        self.state == State::Deposed
    }

    /// What to do at `now`. A step that writes must be answered before the next call.
    pub fn poll(&mut self, now: Instant) -> Step {
        debug_assert!(self.sent.is_none(), "a write is still awaiting its answer");
        match self.state {
            State::Standby { next_try } if now >= next_try => {
                self.sent = Some(now);
                Step::Create
            }
            State::Standby { next_try } => Step::Wait(next_try),
            State::Owner { valid_until, .. } if now >= valid_until => {
                self.state = State::Deposed;
                Step::StepDown
            }
            State::Owner { revision, next_renew, .. } if now >= next_renew => {
                self.sent = Some(now);
                Step::Renew { revision }
            }
            State::Owner { valid_until, next_renew, .. } => Step::Wait(next_renew.min(valid_until)),
            State::Deposed => Step::StepDown,
        }
    }

    /// The store answered the create sent by the last [`Step::Create`]; `now` is when the
    /// answer arrived.
    pub fn created(&mut self, answer: Created, now: Instant) {
        let sent = self.sent.take().expect("a create was sent");
        if self.state == State::Deposed {
            return;
        }
        self.state = match answer {
            Created::Yes(revision) => State::Owner {
                epoch: revision,
                revision,
                valid_until: sent + self.times.ttl - self.times.margin,
                next_renew: sent + self.times.renew_every,
            },
            Created::Taken | Created::Unknown => State::Standby { next_try: now + self.times.retry_every },
        };
    }

    /// The store answered the renewal sent by the last [`Step::Renew`].
    pub fn renewed(&mut self, answer: Renewed, now: Instant) {
        let sent = self.sent.take().expect("a renewal was sent");
        let State::Owner { epoch, valid_until, .. } = self.state else { return };
        self.state = match answer {
            Renewed::Yes(revision) => State::Owner {
                epoch,
                revision,
                valid_until: sent + self.times.ttl - self.times.margin,
                next_renew: sent + self.times.renew_every,
            },
            Renewed::Behind(revision) => State::Owner { epoch, revision, valid_until, next_renew: now },
            Renewed::Lost => State::Deposed,
            Renewed::Unknown => {
                let State::Owner { revision, .. } = self.state else { unreachable!() };
                State::Owner { epoch, revision, valid_until, next_renew: now + RENEW_RETRY }
            }
        };
    }

    /// A standby learned that the key went away (a release): try at once.
    pub fn key_freed(&mut self, now: Instant) {
        if let State::Standby { .. } = self.state {
            self.state = State::Standby { next_try: now };
        }
    }

    /// Gives the lease up (a graceful stop); returns the revision to delete, if it is held.
    pub fn release(&mut self, now: Instant) -> Option<u64> {
        let held = match self.state {
            State::Owner { revision, valid_until, .. } if now < valid_until => Some(revision),
            _ => None,
        };
        self.state = State::Deposed;
        held
    }
}

#[cfg(test)]
mod tests {
    //! A deterministic simulation: three nodes, one store with a clock of its own, requests and
    //! answers delayed or lost at random, nodes paused for up to three leases (a SIGSTOP). At
    //! every millisecond of virtual time, a node that believes it owns the lease must hold the
    //! store's unexpired key.

    use super::*;

    /// A small deterministic generator (xorshift64*), so a failing seed replays exactly.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    #[derive(Debug, Clone, Copy)]
    struct Key {
        node: usize,
        revision: u64,
        expires: Instant,
    }

    /// The lease store: one key, a revision counter, and expiry on its own clock.
    struct Store {
        key: Option<Key>,
        revision: u64,
        ttl: Duration,
    }

    impl Store {
        fn current(&mut self, now: Instant) -> Option<Key> {
            if self.key.is_some_and(|k| now >= k.expires) {
                self.key = None;
            }
            self.key
        }
        fn create(&mut self, node: usize, now: Instant) -> Created {
            if self.current(now).is_some() {
                return Created::Taken;
            }
            self.revision += 1;
            self.key = Some(Key { node, revision: self.revision, expires: now + self.ttl });
            Created::Yes(self.revision)
        }
        fn update(&mut self, node: usize, expected: u64, now: Instant) -> Renewed {
            match self.current(now) {
                Some(k) if k.revision == expected => {
                    self.revision += 1;
                    self.key = Some(Key { node, revision: self.revision, expires: now + self.ttl });
                    Renewed::Yes(self.revision)
                }
                // What the driver reads back after a refused update.
                Some(k) if k.node == node => Renewed::Behind(k.revision),
                _ => Renewed::Lost,
            }
        }
        fn delete(&mut self, expected: u64, now: Instant) {
            if self.current(now).is_some_and(|k| k.revision == expected) {
                self.key = None;
            }
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Write {
        Create,
        Renew(u64),
    }

    #[derive(Debug, Clone, Copy)]
    enum Answer {
        Created(Created),
        Renewed(Renewed),
    }

    /// A write on its way: when it reaches the store, how long its answer takes back (`None`:
    /// lost), and the answer once the store took it.
    #[derive(Debug, Clone, Copy)]
    struct Flight {
        write: Write,
        arrives: Instant,
        back: Option<Duration>,
        answer: Option<Answer>,
    }

    struct Node {
        ownership: Ownership,
        flight: Option<Flight>,
        paused_until: Instant,
        wait_until: Instant,
    }

    /// The lease the simulation runs: 5 s renewed every second (shorter than the default, so
    /// pauses of up to 15 s outlast it often).
    const SIM: LeaseTimes = LeaseTimes {
        ttl: Duration::from_secs(5),
        renew_every: Duration::from_secs(1),
        margin: Duration::from_millis(500),
        retry_every: Duration::from_secs(1),
    };

    /// Runs `seed` for ten minutes of virtual time; returns how long some node owned the lease.
    fn simulate(seed: u64) -> Duration {
        let times = SIM;
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let start = Instant::now();
        let mut store = Store { key: None, revision: 0, ttl: times.ttl };
        let mut nodes: Vec<Node> = (0..3)
            .map(|_| Node {
                ownership: Ownership::new(times, start),
                flight: None,
                paused_until: start,
                wait_until: start,
            })
            .collect();
        let ms = Duration::from_millis(1);
        let mut owned = Duration::ZERO;
        let mut freed = false;
        for tick in 0..600_000u64 {
            let now = start + ms * tick as u32;
            let mut believers = 0;
            for (i, node) in nodes.iter_mut().enumerate() {
                if node.ownership.owner_epoch(now).is_some() && now >= node.paused_until {
                    believers += 1;
                    let key = store.current(now);
                    assert!(
                        key.is_some_and(|k| k.node == i),
                        "seed {seed}: node {i} believes it owns at {tick} ms but the store holds {key:?}"
                    );
                }
            }
            assert!(believers <= 1, "seed {seed}: {believers} owners at {tick} ms");
            if believers == 1 {
                owned += ms;
            }
            for (i, node) in nodes.iter_mut().enumerate() {
                // The store takes a write when it arrives, even from a paused node (it was sent).
                if let Some(flight @ Flight { answer: None, .. }) = &mut node.flight
                    && now >= flight.arrives
                {
                    flight.answer = Some(match flight.write {
                        Write::Create => Answer::Created(store.create(i, now)),
                        Write::Renew(rev) => Answer::Renewed(store.update(i, rev, now)),
                    });
                }
                if now < node.paused_until {
                    continue;
                }
                if tick % 1000 == 0 && rng.below(100) == 0 {
                    // A pause of up to three leases (a SIGSTOP, a long GC, a frozen VM).
                    node.paused_until = now + ms * rng.below(15_000) as u32;
                    continue;
                }
                // The answer comes back (or is lost on the way).
                if let Some(Flight { write, arrives, back, answer }) = node.flight {
                    let answered_at = back.map(|d| arrives + d);
                    let lost_at = arrives + Duration::from_secs(2);
                    if answer.is_some() && answered_at.is_some_and(|t| now >= t) {
                        match answer {
                            Some(Answer::Created(c)) => node.ownership.created(c, now),
                            Some(Answer::Renewed(r)) => node.ownership.renewed(r, now),
                            None => unreachable!(),
                        }
                        node.flight = None;
                    } else if now >= lost_at && answered_at.is_none() {
                        match write {
                            Write::Create => node.ownership.created(Created::Unknown, now),
                            Write::Renew(_) => node.ownership.renewed(Renewed::Unknown, now),
                        }
                        node.flight = None;
                    } else {
                        continue;
                    }
                }
                if now < node.wait_until {
                    continue;
                }
                let delay = |rng: &mut Rng| ms * (if rng.chance(5) { rng.below(1500) } else { rng.below(20) }) as u32;
                match node.ownership.poll(now) {
                    Step::Wait(until) => node.wait_until = until,
                    Step::StepDown => {
                        // The broker stops; a supervisor starts it again as a standby.
                        node.ownership = Ownership::new(times, now + Duration::from_secs(1));
                        node.wait_until = now + Duration::from_secs(1);
                    }
                    step => {
                        let write = match step {
                            Step::Create => Write::Create,
                            Step::Renew { revision } => Write::Renew(revision),
                            _ => unreachable!(),
                        };
                        let there = delay(&mut rng);
                        let back = if rng.chance(3) { None } else { Some(delay(&mut rng)) };
                        node.flight = Some(Flight { write, arrives: now + there, back, answer: None });
                    }
                }
                // Now and then the owner stops gracefully and hands the lease over.
                if tick % 1000 == 0
                    && node.flight.is_none()
                    && rng.below(200) == 0
                    && let Some(rev) = node.ownership.release(now)
                {
                    store.delete(rev, now);
                    node.ownership = Ownership::new(times, now + Duration::from_secs(1));
                    node.wait_until = now + Duration::from_secs(1);
                    freed = true;
                }
            }
            if freed {
                for node in nodes.iter_mut() {
                    node.ownership.key_freed(now);
                    node.wait_until = node.wait_until.min(now);
                }
                freed = false;
            }
        }
        owned
    }

    #[test]
    fn at_most_one_node_believes_it_owns_the_lease_whatever_the_delays_and_pauses() {
        let mut owned = Duration::ZERO;
        for seed in 0..40 {
            owned += simulate(seed);
        }
        // Liveness: despite pauses and lost answers, the lease is held most of the time.
        let share = owned.as_secs_f64() / (40.0 * 600.0);
        assert!(share > 0.6, "the lease was held only {:.0}% of the time", share * 100.0);
    }

    #[test]
    fn an_owner_that_cannot_renew_steps_down_before_its_lease_ends_in_the_store() {
        let times = LeaseTimes::default();
        assert!(times.validate().is_ok());
        let t0 = Instant::now();
        let mut o = Ownership::new(times, t0);
        assert_eq!(o.poll(t0), Step::Create);
        o.created(Created::Yes(7), t0 + Duration::from_millis(10));
        assert_eq!(o.owner_epoch(t0), Some(7));
        let mut now = t0 + times.renew_every;
        // Every renewal goes unanswered from here on.
        loop {
            match o.poll(now) {
                Step::Renew { revision } => {
                    assert_eq!(revision, 7);
                    o.renewed(Renewed::Unknown, now + Duration::from_millis(100));
                }
                Step::Wait(until) => now = until,
                Step::StepDown => break,
                Step::Create => panic!("an owner does not create"),
            }
        }
        assert!(now <= t0 + times.ttl - times.margin, "stepped down at {:?}", now - t0);
        assert!(o.is_deposed());
        assert_eq!(o.poll(now + times.ttl), Step::StepDown, "a deposed node never takes the lease again");
    }

    #[test]
    fn a_renewal_that_landed_unanswered_is_picked_up_not_mistaken_for_a_loss() {
        let times = SIM;
        let t0 = Instant::now();
        let mut o = Ownership::new(times, t0);
        o.poll(t0);
        o.created(Created::Yes(3), t0);
        let t1 = t0 + times.renew_every;
        assert_eq!(o.poll(t1), Step::Renew { revision: 3 });
        o.renewed(Renewed::Behind(4), t1);
        assert_eq!(o.poll(t1), Step::Renew { revision: 4 });
        o.renewed(Renewed::Yes(5), t1);
        assert_eq!(o.owner_epoch(t1 + times.ttl - times.margin - Duration::from_millis(1)), Some(3));
        assert!(times.validate().is_ok());
        assert!(LeaseTimes { renew_every: Duration::from_secs(3), ..times }.validate().is_err());
    }
}
