//! Which shard a queue lives on, and how many shards one broker of a cluster takes.
//!
//! A cluster has a fixed number of shards, set when it is created. A queue lives on the shard
//! `crc32(key) mod shards`, where the key is the queue's name up to its first `:` (so `gpu:a`
//! and `gpu:b` share a shard, and one worker can serve both). Every broker runs a slot for every
//! shard: the owner's serves it, the others wait as standbys and relay to the owner.
//!
//! [`Placement`] spreads the shards. The live brokers (their presence keys, which say how many
//! shards each serves) take turns: the brokers serving fewer shards first, and among equals,
//! by name starting at position `s mod live` for shard `s`, each trying [`TURN`] after the one
//! before ([`Placement::turn`]). A broker holding its fair share
//! (`ceil(shards / live)`) already gives the others a further head start ([`HEAD_START`]), then
//! takes the shard anyway, so a shard is never left without an owner because the count was stale
//! (a dead broker's key outlives it by a lease). A broker that serves two or more shards more
//! than another live broker for longer than a lease (a broker joined, or came back) gives its
//! highest-numbered shard up, as a
//! graceful stop would, and leaves it to the others for [`GIVEN_UP_FOR`].

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How long a broker waits for each broker before it in a shard's order.
pub const TURN: Duration = Duration::from_millis(500);
/// How long a broker already holding its fair share waits before it tries to take one more.
pub const HEAD_START: Duration = Duration::from_secs(2);
/// How long a broker leaves a shard it gave up to the others before it tries to take it again.
pub const GIVEN_UP_FOR: Duration = Duration::from_secs(5);

/// The part of a queue's name that decides its shard: up to the first `:`.
pub fn key(queue: &str) -> &str {
    queue.split(':').next().unwrap_or(queue)
}

/// The shard `queue` lives on, of `shards`.
pub fn shard_of(queue: &str, shards: u32) -> u32 {
    if shards <= 1 {
        return 0;
    }
    crc32fast::hash(key(queue).as_bytes()) % shards
}

/// The one shard all of `queues` live on, or why there is none.
pub fn shard_of_all<'a>(queues: impl IntoIterator<Item = &'a str>, shards: u32) -> Result<Option<u32>, String> {
    let mut found: Option<(u32, &str)> = None;
    for queue in queues {
        let s = shard_of(queue, shards);
        match found {
            Some((t, other)) if t != s => {
                return Err(format!(
                    "queues `{other}` and `{queue}` live on different shards ({t} and {s}) of this cluster; run one \
                     worker per shard, or give the queues a common prefix before `:` (like `group:{}` and \
                     `group:{}`), which puts them on one shard",
                    key(other),
                    key(queue)
                ));
            }
            Some(_) => {}
            None => found = Some((s, queue)),
        }
    }
    Ok(found.map(|(s, _)| s))
}

/// The live brokers (name, shards it serves), sorted by name, and this broker's place among them.
type Order = (Vec<(String, u32)>, Option<usize>);

/// This broker's share of the shards: how many it holds (or is taking) and how many brokers are
/// live. Shared by the slots of one broker.
#[derive(Debug)]
pub struct Placement {
    shards: u32,
    live: AtomicU32,
    held: AtomicU32,
    /// The live brokers' names and loads, sorted, and this broker's place among them (`None`
    /// until it has seen itself announced).
    order: Mutex<Order>,
    settled: watch::Sender<bool>,
    /// The shards this broker serves now.
    serving: Mutex<BTreeSet<u32>>,
    /// The shard this broker is asked to give up, if any ([`Placement::give_up`]).
    give_up: watch::Sender<Option<u32>>,
    /// Shards given up, and until when this broker leaves them to the others.
    given_up: Mutex<HashMap<u32, Instant>>,
}

impl Placement {
    pub fn new(shards: u32) -> Placement {
        Placement {
            shards: shards.max(1),
            live: AtomicU32::new(1),
            held: AtomicU32::new(0),
            order: Mutex::new((Vec::new(), None)),
            settled: watch::channel(false).0,
            serving: Mutex::new(BTreeSet::new()),
            give_up: watch::channel(None).0,
            given_up: Mutex::new(HashMap::new()),
        }
    }

    /// Notes that this broker serves `shard` from now on, or no longer.
    pub fn set_serving(&self, shard: u32, serving: bool) {
        let mut set = self.serving.lock().expect("placement lock");
        if serving {
            set.insert(shard);
        } else {
            set.remove(&shard);
        }
    }

    /// How many shards this broker serves.
    pub fn serving(&self) -> usize {
        self.serving.lock().expect("placement lock").len()
    }

    /// The shard to give up when this broker serves two or more shards more than another live
    /// broker, if it does: its highest-numbered.
    pub fn to_hand_over(&self) -> Option<u32> {
        // The fewest shards another live broker announced serving (one lock at a time).
        let least = {
            let order = self.order.lock().expect("placement lock");
            let (nodes, place) = &*order;
            nodes.iter().enumerate().filter(|(i, _)| Some(*i) != *place).map(|(_, (_, load))| *load).min()
        };
        let set = self.serving.lock().expect("placement lock");
        let serving = set.len() as u32;
        // Only when another broker serves two or more fewer: moving a shard from 2 to a broker
        // with 1 would just swap them. So the brokers end within one shard of each other.
        let uneven = least.is_some_and(|least| serving > least + 1);
        uneven.then(|| set.last().copied()).flatten()
    }

    /// Asks the core of `shard` to give it up (a graceful hand-over, as on a stop).
    pub fn give_up(&self, shard: u32) {
        self.give_up.send_replace(Some(shard));
    }

    /// Resolves once this broker is asked to give `shard` up.
    pub async fn asked_to_give_up(&self, shard: u32) {
        let mut rx = self.give_up.subscribe();
        let _ = rx.wait_for(|s| *s == Some(shard)).await;
    }

    /// Notes that `shard` was given up: no longer asked, no longer held, and left to the others
    /// for [`GIVEN_UP_FOR`].
    pub fn gave_up(&self, shard: u32) {
        self.give_up.send_if_modified(|s| {
            let asked = *s == Some(shard);
            if asked {
                *s = None;
            }
            asked
        });
        self.give_back();
        self.given_up.lock().expect("placement lock").insert(shard, Instant::now() + GIVEN_UP_FOR);
    }

    /// Until when this broker leaves `shard` to the others, if it gave it up lately.
    pub fn left_until(&self, shard: u32) -> Option<Instant> {
        let mut given_up = self.given_up.lock().expect("placement lock");
        match given_up.get(&shard) {
            Some(until) if *until > Instant::now() => Some(*until),
            Some(_) => {
                given_up.remove(&shard);
                None
            }
            None => None,
        }
    }

    /// Notes the live brokers' names (this one's is `me`).
    pub fn set_nodes(&self, mut nodes: Vec<(String, u32)>, me: &str) {
        nodes.sort();
        nodes.dedup_by(|a, b| a.0 == b.0);
        self.set_live(nodes.len() as u32);
        let place = nodes.iter().position(|(n, _)| n == me);
        *self.order.lock().expect("placement lock") = (nodes, place);
    }

    /// How long this broker lets the brokers before it in `shard`'s order try first. The order:
    /// the brokers serving fewer shards first (as they announced it; this one's own count as it
    /// is now), and among those serving as many, by name, starting at `shard mod live`.
    pub fn turn(&self, shard: u32) -> Duration {
        let serving = self.serving() as u32;
        let order = self.order.lock().expect("placement lock");
        let (nodes, place) = &*order;
        let n = nodes.len().max(1);
        let Some(me) = *place else { return TURN * n as u32 };
        let key = |i: usize| {
            let load = if i == me { serving } else { nodes[i].1 };
            (load, (i + n - shard as usize % n) % n)
        };
        let mine = key(me);
        let rank = (0..nodes.len()).filter(|&i| i != me && key(i) < mine).count();
        TURN * rank as u32
    }

    /// The most shards this broker takes without giving the others a head start.
    pub fn share(&self) -> u32 {
        self.shards.div_ceil(self.live.load(Ordering::Acquire).max(1))
    }

    /// Notes how many brokers announced themselves (this one included).
    pub fn set_live(&self, live: u32) {
        self.live.store(live.max(1), Ordering::Release);
    }

    /// Counts one more shard held, if that stays within the share; false otherwise.
    pub fn try_take(&self) -> bool {
        let share = self.share();
        self.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| (h < share).then_some(h + 1)).is_ok()
    }

    /// Counts one more shard held, whatever the share (after the head start).
    pub fn take(&self) {
        self.held.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts one shard fewer: a take that failed, or a shard given up.
    pub fn give_back(&self) {
        let _ = self.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| h.checked_sub(1));
    }

    /// Shards held or being taken.
    pub fn held(&self) -> u32 {
        self.held.load(Ordering::Acquire)
    }

    /// Says that this broker has announced itself and seen the others (the slots wait for it
    /// before taking anything, so brokers started together share the shards).
    pub fn set_settled(&self) {
        self.settled.send_replace(true);
    }

    /// Resolves once [`Placement::set_settled`] was called.
    pub async fn settled(&self) {
        let mut rx = self.settled.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_s_shard_is_stable_and_follows_its_prefix() {
        // Fixed by the hash: a change would move every queue of a running cluster.
        assert_eq!(shard_of("q", 16), crc32fast::hash(b"q") % 16);
        assert_eq!(shard_of("anything", 1), 0);
        assert_eq!(shard_of("gpu:a", 16), shard_of("gpu:b", 16));
        assert_eq!(shard_of("gpu:a", 16), shard_of("gpu", 16));
        let spread: std::collections::BTreeSet<u32> = (0..64).map(|i| shard_of(&format!("queue-{i}"), 4)).collect();
        assert_eq!(spread.len(), 4, "64 queues cover 4 shards");
    }

    #[test]
    fn queues_on_several_shards_are_refused_with_the_way_out() {
        assert_eq!(shard_of_all(["gpu:a", "gpu:b"], 16), Ok(Some(shard_of("gpu", 16))));
        assert_eq!(shard_of_all([], 16), Ok(None));
        let (a, b) = (0..)
            .map(|i| format!("q{i}"))
            .find_map(|q| (shard_of(&q, 4) != shard_of("q", 4)).then_some(("q".to_string(), q)))
            .unwrap();
        let e = shard_of_all([a.as_str(), b.as_str()], 4).unwrap_err();
        assert!(e.contains("different shards") && e.contains("before `:`"), "{e}");
    }

    #[test]
    fn the_live_brokers_take_turns_shard_by_shard() {
        let names = || vec![("c".to_string(), 0), ("a".into(), 0), ("b".into(), 0)];
        let turns = |me: &str| {
            let p = Placement::new(4);
            p.set_nodes(names(), me);
            (0..4).map(|s| p.turn(s)).collect::<Vec<_>>()
        };
        let z = Duration::ZERO;
        // Shards 0 and 3 prefer a, 1 prefers b, 2 prefers c: 2, 1 and 1 shards.
        assert_eq!(turns("a"), [z, TURN * 2, TURN, z]);
        assert_eq!(turns("b"), [TURN, z, TURN * 2, TURN]);
        assert_eq!(turns("c"), [TURN * 2, TURN, z, TURN * 2]);
        // A broker serving fewer shards goes first, whatever the name order says.
        let p = Placement::new(4);
        p.set_nodes(vec![("a".into(), 2), ("b".into(), 0), ("c".into(), 1)], "b");
        assert_eq!((0..4).map(|s| p.turn(s)).collect::<Vec<_>>(), [z; 4]);
        let p = Placement::new(4);
        p.set_nodes(vec![("a".into(), 2), ("b".into(), 0), ("c".into(), 1)], "a");
        assert_eq!(p.turn(0), z, "a serves none yet by its own count, and comes first for shard 0");
        // Not yet announced: after every other broker.
        let p = Placement::new(4);
        p.set_nodes(names(), "d");
        assert_eq!(p.turn(0), TURN * 3);
    }

    #[test]
    fn a_broker_over_its_share_gives_up_its_last_shard_and_leaves_it_a_while() {
        let p = Placement::new(4);
        for s in [0, 1, 3] {
            assert!(p.try_take());
            p.set_serving(s, true);
        }
        assert_eq!(p.to_hand_over(), None, "alone, there is nobody to give a shard to");
        p.set_nodes(vec![("a".into(), 3), ("b".into(), 2)], "a");
        assert_eq!(p.to_hand_over(), None, "nobody serves 2 fewer");
        p.set_nodes(vec![("a".into(), 3), ("b".into(), 1)], "a");
        assert_eq!(p.to_hand_over(), Some(3), "2 of 4 each for two brokers");
        p.give_up(3);
        let mut asked = Box::pin(p.asked_to_give_up(3));
        assert!(futures_util::FutureExt::now_or_never(asked.as_mut()).is_some());
        p.set_serving(3, false);
        p.gave_up(3);
        assert_eq!((p.held(), p.serving(), p.to_hand_over()), (2, 2, None));
        assert!(p.left_until(3).is_some() && p.left_until(1).is_none());
        assert!(futures_util::FutureExt::now_or_never(Box::pin(p.asked_to_give_up(3))).is_none());
    }

    #[test]
    fn a_broker_takes_its_fair_share_then_waits() {
        let p = Placement::new(4);
        p.set_live(3);
        assert_eq!(p.share(), 2);
        assert!(p.try_take() && p.try_take());
        assert!(!p.try_take(), "a third shard is over the share of 4 over 3 brokers");
        p.give_back();
        assert!(p.try_take());
        p.take();
        assert_eq!(p.held(), 3);
        // Alone, a broker may take every shard.
        p.set_live(1);
        assert!(p.try_take());
        assert!(!p.try_take());
        p.set_live(0);
        assert_eq!(p.share(), 4);
    }
}
