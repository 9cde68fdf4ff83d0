//! Delivery of messages to connections. Every connection (websocket or event stream) has a
//! bounded queue here; a connection whose queue is full is dropped with
//! [`close::LAGGING`](protocol::close::LAGGING), never buffered for.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use protocol::close;
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::core::{ConnId, Effect};

/// Messages queued toward one connection before it counts as lagging.
pub const OUTBOUND_QUEUE: usize = 1024;
/// Most bytes queued toward one connection; a peer that lets more pile up is dropped too.
pub const OUTBOUND_BYTES: usize = 16 << 20;

/// Why and how a connection must be closed, set by the broker, read by the connection's task.
#[derive(Debug, Default)]
pub struct CloseSignal {
    reason: Mutex<Option<(u16, &'static str)>>,
    notify: Notify,
}

impl CloseSignal {
    pub fn close(&self, code: u16, reason: &'static str) {
        let mut r = self.reason.lock().expect("close signal lock");
        if r.is_none() {
            *r = Some((code, reason));
        }
        drop(r);
        self.notify.notify_one();
    }

    /// The close code and reason, once set.
    pub fn get(&self) -> Option<(u16, &'static str)> {
        *self.reason.lock().expect("close signal lock")
    }

    /// Resolves once [`CloseSignal::close`] was called.
    pub async fn wait(&self) {
        loop {
            if self.get().is_some() {
                return;
            }
            self.notify.notified().await;
        }
    }
}

#[derive(Debug)]
struct Peer {
    tx: mpsc::Sender<Utf8Bytes>,
    close: Arc<CloseSignal>,
    queued: Arc<AtomicUsize>,
}

/// The registry of connections and their outbound queues.
#[derive(Debug, Default)]
pub struct Outbox {
    peers: DashMap<ConnId, Peer>,
    next: AtomicU64,
}

/// A registered connection: its id, its queue of serialised messages and its close signal.
#[derive(Debug)]
pub struct Registration {
    pub conn: ConnId,
    rx: mpsc::Receiver<Utf8Bytes>,
    pub close: Arc<CloseSignal>,
    queued: Arc<AtomicUsize>,
}

impl Registration {
    /// The next queued message; `None` once the outbox has dropped this connection.
    pub async fn recv(&mut self) -> Option<Utf8Bytes> {
        let text = self.rx.recv().await?;
        self.queued.fetch_sub(text.len(), Ordering::Relaxed);
        Some(text)
    }

    /// The next queued message, if one is waiting.
    pub fn try_recv(&mut self) -> Option<Utf8Bytes> {
        let text = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(text.len(), Ordering::Relaxed);
        Some(text)
    }
}

impl Outbox {
    pub fn register(&self) -> Registration {
        let conn = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let close = Arc::new(CloseSignal::default());
        let queued = Arc::new(AtomicUsize::new(0));
        self.peers.insert(conn, Peer { tx, close: close.clone(), queued: queued.clone() });
        Registration { conn, rx, close, queued }
    }

    pub fn unregister(&self, conn: ConnId) {
        self.peers.remove(&conn);
    }

    pub fn connections(&self) -> usize {
        self.peers.len()
    }

    /// Closes every connection with `code` (e.g. going away at shutdown).
    pub fn close_all(&self, code: u16, reason: &'static str) {
        let conns: Vec<ConnId> = self.peers.iter().map(|p| *p.key()).collect();
        for conn in conns {
            if let Some((_, peer)) = self.peers.remove(&conn) {
                peer.close.close(code, reason);
            }
        }
    }

    /// Delivers one effect. Serialises each message once, however many receive it.
    pub fn deliver(&self, effect: Effect) {
        match effect {
            Effect::Client { to, msg } => {
                // One allocation; every receiver shares it.
                let text: Utf8Bytes = serde_json::to_string(&*msg).expect("messages serialise").into();
                for conn in to {
                    self.push(conn, text.clone());
                }
            }
            Effect::Worker { to, msg } => {
                let text: Utf8Bytes = serde_json::to_string(&msg).expect("messages serialise").into();
                self.push(to, text);
            }
            Effect::Close { conn, code, reason } => {
                if let Some((_, peer)) = self.peers.remove(&conn) {
                    peer.close.close(code, reason);
                }
            }
        }
    }

    /// Queues a serialised message for one connection.
    pub fn push(&self, conn: ConnId, text: Utf8Bytes) {
        let Some(peer) = self.peers.get(&conn) else { return };
        let len = text.len();
        let over = peer.queued.load(Ordering::Relaxed) + len > OUTBOUND_BYTES;
        match if over { Err(mpsc::error::TrySendError::Full(text)) } else { peer.tx.try_send(text) } {
            Ok(()) => {
                peer.queued.fetch_add(len, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                let close = peer.close.clone();
                drop(peer);
                self.peers.remove(&conn);
                tracing::info!(conn, "dropping a connection that stopped reading");
                close.close(close::LAGGING, "too slow: outbound queue full");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                drop(peer);
                self.peers.remove(&conn);
            }
        }
    }
}
