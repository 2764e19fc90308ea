//! [`RelaySession`]: the relay's protocol logic for one connection, sans-IO; and [`Hub`], who
//! gets live changes.
//!
//! The shell (`server.rs`) authenticates the upgrade request, decodes nothing itself, and feeds
//! the session the connection's frames; the session answers with [`Effect`]s, plain values the
//! shell carries out in order: messages to send on this connection, a new subscription, a
//! fan-out of freshly stored changes to the other connections, a compaction to run, a close.
//! It calls the blocking [`RelayStore`] directly (so the shell runs it on the blocking pool) and
//! owns no socket, no task and no clock: idle and handshake timeouts, connection limits and
//! the outgoing queues stay in the shell. That is what lets the seeded simulation
//! (`tests/it/sim.rs`) run the real relay logic with many connections on one thread.
//!
//! Invariant 1 (persist, then announce) lives here: a push's `Ack` and its `FanOut` come only
//! after [`RelayStore::append`] and [`RelayStore::durable`] returned.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use super::auth::{AuthError, Claims};
use super::log::{valid_namespace, PushError};
use super::storage::RelayStore;
use crate::ids::DocId;
use crate::transport::{
    codec, ClientMsg, ErrorCode, FeedCursor, Limits, Presence, RelayMsg, ALL_NAMESPACES,
    PROTOCOL_VERSION,
};

/// What a session needs of the relay's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Announced in the hello and enforced on every request.
    pub limits: Limits,
    /// Pull pages are at most this many bytes unless the client asks for fewer.
    pub page_bytes: u64,
    /// Feed entries per page.
    pub feed_page: usize,
    /// Presence messages one connection may send per second, on average; the excess is
    /// dropped (presence is ephemeral: the next update replaces what was lost).
    pub presence_per_sec: u32,
    /// How many presence messages may come at once before the rate applies.
    pub presence_burst: u32,
}

/// Something the shell does for a session, in the order the session gave.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Send this message on this connection, after everything sent before it.
    Send(RelayMsg),
    /// Replace this connection's live subscription (every namespace here is readable by its
    /// token; see [`Hub::subscribe`]).
    Subscribe {
        namespaces: BTreeSet<String>,
        docs: BTreeSet<DocId>,
    },
    /// New changes of `doc` are durable: send `changes` (a [`RelayMsg::Changes`]) to every
    /// *other* connection subscribed to `doc` in `namespace` ([`Hub::recipients`]). Carry it out
    /// even when this connection has died meanwhile: the others are owed the changes.
    FanOut {
        namespace: String,
        doc: DocId,
        changes: RelayMsg,
    },
    /// `doc`'s log is long enough to fold into a snapshot: run [`RelayStore::compact`] off this
    /// connection's path (it loads the document, which is slow).
    Compact(DocId),
    /// Everything after this waits until the relay log is durable ([`RelayStore::durable`]);
    /// if that fails, the rest is dropped and the connection closed (nothing may be
    /// acknowledged or fanned out that a crash could take back).
    AwaitDurable,
    /// This connection's presence in `doc` of `namespace` is now `state` (`None`: it left):
    /// record it in the [`Hub`] ([`Hub::set_presence`]) and deliver what that returns. Presence
    /// is never stored, and delivering it never waits: a recipient whose queue is full misses
    /// it.
    Presence {
        namespace: String,
        doc: DocId,
        state: Option<Presence>,
    },
    /// End the connection once the messages before this one are sent.
    Close,
}

fn error(
    code: ErrorCode,
    message: impl Into<String>,
    doc: Option<DocId>,
    batch: Option<u64>,
) -> Effect {
    Effect::Send(RelayMsg::Error {
        code,
        message: message.into(),
        doc,
        batch,
    })
}

/// The most bytes a varint takes.
const VARINT_MAX: usize = 9;

/// The bytes bincode's varint takes for `v` (see docs/protocol.md, "Encoding").
fn varint_len(v: u64) -> usize {
    match v {
        0..=250 => 1,
        251..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => VARINT_MAX,
    }
}

/// The size of `msg`'s frame.
fn encoded_len(msg: &RelayMsg) -> usize {
    codec::encode(msg, usize::MAX).map_or(usize::MAX, |b| b.len())
}

/// A fatal error: say why, then close.
fn refuse(code: ErrorCode, message: impl Into<String>) -> Vec<Effect> {
    vec![error(code, message, None, None), Effect::Close]
}

/// The relay's side of one connection, from the client's hello on. See the module docs.
///
/// ```
/// use std::time::Instant;
/// use tandem::relay::log::RelayLog;
/// use tandem::relay::session::{Effect, RelaySession, SessionConfig};
/// use tandem::transport::{ClientMsg, Limits, RelayMsg, PROTOCOL_VERSION};
///
/// let log = RelayLog::in_memory();
/// let cfg = SessionConfig {
///     limits: Limits {
///         max_frame_bytes: 1 << 20,
///         max_changes_per_push: 100,
///         max_change_bytes: 1 << 20,
///         max_docs_per_connection: 100,
///     },
///     page_bytes: 1 << 16,
///     feed_page: 100,
///     presence_per_sec: 20,
///     presence_burst: 40,
/// };
/// let hello = ClientMsg::Hello { version: PROTOCOL_VERSION, device: [7; 16], feeds: vec![] };
/// // No token check here: `None` claims means "anyone may read and write everything".
/// let mut session = RelaySession::accept(cfg, Some(hello), || Ok(None)).unwrap();
/// let effects = session.greet(&log);
/// assert!(matches!(effects[0], Effect::Send(RelayMsg::Hello { .. })));
/// let effects = session.handle_message(&log, Instant::now(), ClientMsg::Ping { nonce: 3 });
/// assert_eq!(effects, vec![Effect::Send(RelayMsg::Pong { nonce: 3 })]);
/// ```
pub struct RelaySession {
    cfg: SessionConfig,
    /// `None`: the relay runs without auth and everyone may read and write everything.
    claims: Option<Claims>,
    device: [u8; 16],
    /// The hello's feed cursors, answered by [`greet`](Self::greet).
    hello_feeds: Vec<FeedCursor>,
    /// Presence rate limit: a token bucket, filled at `presence_per_sec` up to
    /// `presence_burst`, as of `presence_at`.
    presence_tokens: f64,
    presence_at: Option<Instant>,
    /// Presence messages dropped by the rate limit.
    presence_dropped: u64,
}

impl RelaySession {
    /// Check a connection's first message. `first` is `None` when the first frame was missing,
    /// not binary, or did not decode. The checks run in the order `docs/protocol.md` gives: a
    /// hello, a version this relay speaks, then the token: `authenticate` is asked only when
    /// the first two pass, and returns the claims (`None` for a relay without auth). A refusal
    /// is the effects to carry out: an `Error`, then `Close`.
    pub fn accept(
        cfg: SessionConfig,
        first: Option<ClientMsg>,
        authenticate: impl FnOnce() -> Result<Option<Claims>, AuthError>,
    ) -> Result<RelaySession, Vec<Effect>> {
        let Some(ClientMsg::Hello {
            version,
            device,
            feeds,
        }) = first
        else {
            return Err(refuse(ErrorCode::BadFrame, "expected a hello first"));
        };
        if version != PROTOCOL_VERSION {
            return Err(refuse(
                ErrorCode::UnsupportedVersion,
                format!("this relay speaks tandem/{PROTOCOL_VERSION}, not tandem/{version}"),
            ));
        }
        let claims = authenticate().map_err(|e| refuse(e.code(), e.to_string()))?;
        Ok(RelaySession {
            presence_tokens: f64::from(cfg.presence_burst),
            presence_at: None,
            presence_dropped: 0,
            cfg,
            claims,
            device,
            hello_feeds: feeds,
        })
    }

    /// The token's claims (`None` on a relay without auth): what the [`Hub`] needs to know.
    pub fn claims(&self) -> Option<&Claims> {
        self.claims.as_ref()
    }

    /// The device id the client's hello gave (for logs; never for authorization).
    pub fn device(&self) -> [u8; 16] {
        self.device
    }

    /// The relay's hello, then one feed page per cursor of the client's hello, in that order.
    /// Call it once, after registering the connection in the [`Hub`]: a change landing during
    /// catch-up is then in a page, delivered live, or both; never neither.
    pub fn greet(&mut self, log: &dyn RelayStore) -> Vec<Effect> {
        let (read, write) = match &self.claims {
            Some(c) => (c.readable(), c.write.clone()),
            None => {
                let mut all = log.namespaces().unwrap_or_default();
                if !all.iter().any(|n| n == crate::repo::DEFAULT_NAMESPACE) {
                    all.push(crate::repo::DEFAULT_NAMESPACE.to_string());
                }
                // The namespaces listed are the ones whose feeds there is something to read
                // in; `*` says the rest are open too. Without it a client refused to push a
                // document of a namespace the relay had not seen yet (found by the
                // simulation: its first push could never happen).
                all.push(ALL_NAMESPACES.to_string());
                (all.clone(), all)
            }
        };
        let subject = self
            .claims
            .as_ref()
            .map(|c| c.sub.clone())
            .unwrap_or_else(|| "anonymous".into());
        let mut out = vec![Effect::Send(RelayMsg::Hello {
            version: PROTOCOL_VERSION,
            relay_id: log.relay_id(),
            subject,
            read,
            write,
            limits: self.cfg.limits.clone(),
        })];
        for FeedCursor { namespace, cursor } in std::mem::take(&mut self.hello_feeds) {
            self.feed(log, namespace, cursor, &mut out);
        }
        out
    }

    /// Presence messages dropped by the rate limit so far.
    pub fn presence_dropped(&self) -> u64 {
        self.presence_dropped
    }

    /// One binary frame from the client (after the hello), arrived at `now`. An undecodable
    /// frame is fatal.
    pub fn handle_frame(
        &mut self,
        log: &dyn RelayStore,
        now: Instant,
        frame: &[u8],
    ) -> Vec<Effect> {
        let limit = usize::try_from(self.cfg.limits.max_frame_bytes).unwrap_or(usize::MAX);
        match codec::decode::<ClientMsg>(frame, limit) {
            Ok(msg) => self.handle_message(log, now, msg),
            Err(e) => refuse(ErrorCode::BadFrame, e.to_string()),
        }
    }

    /// A text frame from the client: not part of the protocol, so fatal.
    pub fn handle_text_frame(&mut self) -> Vec<Effect> {
        refuse(ErrorCode::BadFrame, "text frames are not part of tandem/1")
    }

    /// One decoded message from the client (after the hello), arrived at `now` (only the
    /// presence rate limit looks at the time).
    pub fn handle_message(
        &mut self,
        log: &dyn RelayStore,
        now: Instant,
        msg: ClientMsg,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        match msg {
            ClientMsg::Hello { .. } => return refuse(ErrorCode::BadFrame, "a second hello"),
            ClientMsg::Ping { nonce } => out.push(Effect::Send(RelayMsg::Pong { nonce })),
            ClientMsg::Pong { .. } => {}
            ClientMsg::FeedMore { namespace, after } => self.feed(log, namespace, after, &mut out),
            ClientMsg::Subscribe { namespaces, docs } => self.subscribe(namespaces, docs, &mut out),
            ClientMsg::Pull {
                doc,
                after,
                max_bytes,
            } => self.pull(log, doc, after, max_bytes, &mut out),
            ClientMsg::Push {
                namespace,
                doc,
                batch,
                changes,
            } => self.push(log, namespace, doc, batch, changes, &mut out),
            ClientMsg::Presence {
                namespace,
                doc,
                state,
            } => self.presence(now, namespace, doc, state, &mut out),
        }
        out
    }

    /// Take one token from the presence bucket, if there is one.
    fn presence_allowed(&mut self, now: Instant) -> bool {
        let burst = f64::from(self.cfg.presence_burst);
        if let Some(at) = self.presence_at {
            let refill = now.saturating_duration_since(at).as_secs_f64()
                * f64::from(self.cfg.presence_per_sec);
            self.presence_tokens = (self.presence_tokens + refill).min(burst);
        }
        self.presence_at = Some(now);
        if self.presence_tokens >= 1.0 {
            self.presence_tokens -= 1.0;
            true
        } else {
            self.presence_dropped += 1;
            false
        }
    }

    fn presence(
        &mut self,
        now: Instant,
        namespace: String,
        doc: DocId,
        state: Option<Presence>,
        out: &mut Vec<Effect>,
    ) {
        // Leaving is always let through: it frees state and is at most one per document.
        if state.is_some() && !self.presence_allowed(now) {
            return;
        }
        // Errors about presence name no document: a client takes an error with a document and
        // no batch for a refused pull, and must not stop syncing a document over its presence.
        if !self.can_read(&namespace) || !valid_namespace(&namespace) {
            let m = format!("presence: this token cannot read namespace '{namespace}'");
            out.push(error(ErrorCode::Forbidden, m, None, None));
            return;
        }
        if let Some(Err(m)) = state.as_ref().map(Presence::check) {
            out.push(error(
                ErrorCode::TooLarge,
                format!("presence: {m}"),
                None,
                None,
            ));
            return;
        }
        out.push(Effect::Presence {
            namespace,
            doc,
            state,
        });
    }

    fn can_read(&self, ns: &str) -> bool {
        self.claims.as_ref().is_none_or(|c| c.can_read(ns))
    }

    fn can_write(&self, ns: &str) -> bool {
        self.claims.as_ref().is_none_or(|c| c.can_write(ns))
    }

    fn feed(&self, log: &dyn RelayStore, namespace: String, after: u64, out: &mut Vec<Effect>) {
        if !self.can_read(&namespace) {
            let m = format!("this token cannot read namespace '{namespace}'");
            out.push(error(ErrorCode::Forbidden, m, None, None));
            return;
        }
        match log.feed(&namespace, after, self.cfg.feed_page) {
            Ok((entries, next_cursor, more)) => out.push(Effect::Send(RelayMsg::Feed {
                namespace,
                entries,
                next_cursor,
                more,
            })),
            Err(e) => {
                tracing::error!(%namespace, error = %e, "could not read a feed");
                out.push(error(
                    ErrorCode::Internal,
                    "could not read the feed",
                    None,
                    None,
                ));
            }
        }
    }

    fn subscribe(&self, namespaces: Vec<String>, docs: Vec<DocId>, out: &mut Vec<Effect>) {
        let max = self.cfg.limits.max_docs_per_connection as usize;
        if docs.len() > max {
            let m = format!(
                "{} documents is more than the {max} a connection may subscribe to",
                docs.len()
            );
            out.push(error(ErrorCode::TooLarge, m, None, None));
            return;
        }
        let (ok, refused): (Vec<String>, Vec<String>) =
            namespaces.into_iter().partition(|n| self.can_read(n));
        out.push(Effect::Subscribe {
            namespaces: ok.into_iter().collect(),
            docs: docs.into_iter().collect(),
        });
        for ns in refused {
            let m = format!("this token cannot read namespace '{ns}'");
            out.push(error(ErrorCode::Forbidden, m, None, None));
        }
    }

    fn pull(
        &self,
        log: &dyn RelayStore,
        doc: DocId,
        after: u64,
        max_bytes: u64,
        out: &mut Vec<Effect>,
    ) {
        let page_bytes = match max_bytes {
            0 => self.cfg.page_bytes,
            n => n.min(self.cfg.page_bytes),
        };
        let mut page = match log.pull(&doc, after, page_bytes) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(%doc, error = %e, "could not read a log");
                out.push(error(
                    ErrorCode::Internal,
                    "could not read the log",
                    Some(doc),
                    None,
                ));
                return;
            }
        };
        if !page.namespace.is_empty() && !self.can_read(&page.namespace) {
            let m = format!("this token cannot read namespace '{}'", page.namespace);
            out.push(error(ErrorCode::Forbidden, m, Some(doc), None));
            return;
        }
        let max_frame = usize::try_from(self.cfg.limits.max_frame_bytes).unwrap_or(usize::MAX);
        if let Some((upto, bytes)) = &page.snapshot {
            // Chunks well under the frame limit, leaving room for the message around them;
            // and never over it, however small the frames are configured (the floor of 1 KiB
            // alone made frames of a relay with `--max-frame-bytes 1024` too large to send).
            let around = encoded_len(&RelayMsg::Snapshot {
                doc,
                namespace: page.namespace.clone(),
                upto: *upto,
                chunk: u32::MAX,
                chunks: u32::MAX,
                bytes: Vec::new(),
            })
            .saturating_add(VARINT_MAX - 1);
            let size = (max_frame / 2)
                .max(1024)
                .min(max_frame.saturating_sub(around))
                .max(1);
            let chunks: Vec<&[u8]> = bytes.chunks(size).collect();
            let n = chunks.len().max(1) as u32;
            for (i, c) in chunks.iter().enumerate() {
                out.push(Effect::Send(RelayMsg::Snapshot {
                    doc,
                    namespace: page.namespace.clone(),
                    upto: *upto,
                    chunk: i as u32,
                    chunks: n,
                    bytes: c.to_vec(),
                }));
            }
        }
        // `page_bytes` counts change bytes only, and an operator may configure frames smaller
        // than pages: drop changes from the page's end until its frame fits, as the protocol
        // promises. Found by the simulation: such a page was never sent, and the pull never
        // answered. One change always stays, so a pull always makes progress.
        let around = encoded_len(&RelayMsg::Changes {
            doc,
            namespace: page.namespace.clone(),
            from: page.from,
            to: page.to,
            changes: Vec::new(),
            more: true,
            remaining_bytes: u64::MAX,
        })
        .saturating_sub(1)
        .saturating_add(varint_len(page.changes.len() as u64));
        let mut size = around.saturating_add(
            page.changes
                .iter()
                .map(|c| c.len() + varint_len(c.len() as u64))
                .sum::<usize>(),
        );
        while size > max_frame && page.changes.len() > 1 {
            let Some(last) = page.changes.pop() else {
                break;
            };
            size = size.saturating_sub(last.len() + varint_len(last.len() as u64));
            page.to -= 1;
            page.more = true;
            page.remaining_bytes += last.len() as u64;
        }
        out.push(Effect::Send(RelayMsg::Changes {
            doc,
            namespace: page.namespace,
            from: page.from,
            to: page.to,
            changes: page.changes,
            more: page.more,
            remaining_bytes: page.remaining_bytes,
        }));
    }

    fn push(
        &self,
        log: &dyn RelayStore,
        namespace: String,
        doc: DocId,
        batch: u64,
        changes: Vec<Vec<u8>>,
        out: &mut Vec<Effect>,
    ) {
        let err = |code, m: String| error(code, m, Some(doc), Some(batch));
        if !valid_namespace(&namespace) {
            let m = format!("'{namespace}' is not a valid namespace");
            out.push(err(ErrorCode::BadFrame, m));
            return;
        }
        if !self.can_write(&namespace) {
            let m = format!("this token cannot write namespace '{namespace}'");
            out.push(err(ErrorCode::Forbidden, m));
            return;
        }
        let limits = &self.cfg.limits;
        if changes.len() > limits.max_changes_per_push as usize {
            let m = format!(
                "{} changes is more than the {} a push may carry",
                changes.len(),
                limits.max_changes_per_push
            );
            out.push(err(ErrorCode::TooLarge, m));
            return;
        }
        if let Some(big) = changes
            .iter()
            .find(|c| c.len() as u64 > limits.max_change_bytes)
        {
            let m = format!(
                "a change of {} bytes is over the {}-byte limit",
                big.len(),
                limits.max_change_bytes
            );
            out.push(err(ErrorCode::TooLarge, m));
            return;
        }
        let pushed = match log.append(&namespace, &doc, &changes) {
            Ok(p) => p,
            Err(PushError::NeedHistory { .. }) => {
                out.push(Effect::Send(RelayMsg::NeedHistory { doc, batch }));
                return;
            }
            Err(e) => {
                let code = match &e {
                    PushError::BadChange { .. } => ErrorCode::BadChange,
                    PushError::HashMismatch { .. } => ErrorCode::HashMismatch,
                    PushError::WrongNamespace(_) => ErrorCode::WrongNamespace,
                    PushError::NeedHistory { .. } | PushError::Storage(_) => ErrorCode::Internal,
                };
                out.push(err(code, e.to_string()));
                return;
            }
        };
        // Acknowledge and fan out only once durable; the shell lets later requests of this
        // connection proceed meanwhile, so pushes share flushes.
        out.push(Effect::AwaitDurable);
        out.push(Effect::Send(RelayMsg::Ack {
            doc,
            batch,
            seqs: pushed.seqs,
        }));
        if !pushed.new_changes.is_empty() {
            let to = pushed.new_from + pushed.new_changes.len() as u64 - 1;
            out.push(Effect::FanOut {
                namespace: namespace.clone(),
                doc,
                changes: RelayMsg::Changes {
                    doc,
                    namespace,
                    from: pushed.new_from,
                    to,
                    changes: pushed.new_changes,
                    more: false,
                    remaining_bytes: 0,
                },
            });
            if log.wants_compaction(&doc) {
                out.push(Effect::Compact(doc));
            }
        }
    }
}

/// Who gets live changes: every open connection's token and subscription, sans-IO. `T` is
/// whatever the shell keeps per connection (its outgoing queue, say). Connections are kept in
/// id order, so a fan-out visits them in the same order every time (the simulation replays).
pub struct Hub<T> {
    conns: BTreeMap<u64, Member<T>>,
    next: u64,
    /// Who is present in each document, and as what: in memory only, gone with the
    /// connection.
    rooms: BTreeMap<(String, DocId), BTreeMap<u64, Presence>>,
}

/// Documents one connection may be present in at once; presence in more is dropped.
pub const MAX_PRESENCE_ROOMS: usize = 256;

struct Member<T> {
    claims: Option<Claims>,
    /// The documents this connection is present in.
    rooms: BTreeSet<(String, DocId)>,
    /// `None`: every namespace the token can read (the default until `Subscribe`).
    namespaces: Option<BTreeSet<String>>,
    docs: BTreeSet<DocId>,
    conn: T,
}

impl<T> Member<T> {
    fn wants(&self, ns: &str, doc: &DocId) -> bool {
        self.claims.as_ref().is_none_or(|c| c.can_read(ns))
            && (self.namespaces.as_ref().is_none_or(|n| n.contains(ns)) || self.docs.contains(doc))
    }
}

impl<T> Default for Hub<T> {
    fn default() -> Self {
        Hub {
            conns: BTreeMap::new(),
            next: 1,
            rooms: BTreeMap::new(),
        }
    }
}

impl<T> Hub<T> {
    /// Register a connection (with its token's claims) and get its id. Subscribed to every
    /// namespace the token can read until it says otherwise.
    pub fn join(&mut self, claims: Option<Claims>, conn: T) -> u64 {
        let id = self.next;
        self.next += 1;
        self.conns.insert(
            id,
            Member {
                claims,
                rooms: BTreeSet::new(),
                namespaces: None,
                docs: BTreeSet::new(),
                conn,
            },
        );
        id
    }

    /// Forget a connection; returns what the shell kept for it. Call
    /// [`leave_presence`](Self::leave_presence) first to tell the others it is gone.
    pub fn leave(&mut self, id: u64) -> Option<T> {
        let _ = self.leave_presence(id);
        self.conns.remove(&id).map(|m| m.conn)
    }

    /// Carry out [`Effect::Presence`] for connection `id`: the messages to deliver, by
    /// recipient. The others present in the document hear of the change; a connection that
    /// just arrived in the document hears who is already there.
    pub fn set_presence(
        &mut self,
        id: u64,
        namespace: String,
        doc: DocId,
        state: Option<Presence>,
    ) -> Vec<(u64, RelayMsg)> {
        let Some(member) = self.conns.get_mut(&id) else {
            return Vec::new();
        };
        let room = (namespace, doc);
        let arrived = !member.rooms.contains(&room);
        let mut out = Vec::new();
        match state {
            Some(state) => {
                if arrived && member.rooms.len() >= MAX_PRESENCE_ROOMS {
                    return out;
                }
                member.rooms.insert(room.clone());
                let present = self.rooms.entry(room).or_default();
                for (&peer, other) in present.iter() {
                    if peer == id {
                        continue;
                    }
                    out.push((
                        peer,
                        RelayMsg::Presence {
                            doc,
                            peer: id,
                            state: Some(state.clone()),
                        },
                    ));
                    if arrived {
                        out.push((
                            id,
                            RelayMsg::Presence {
                                doc,
                                peer,
                                state: Some(other.clone()),
                            },
                        ));
                    }
                }
                present.insert(id, state);
            }
            None => {
                if !member.rooms.remove(&room) {
                    return out;
                }
                self.left(id, room, &mut out);
            }
        }
        out
    }

    fn left(&mut self, id: u64, room: (String, DocId), out: &mut Vec<(u64, RelayMsg)>) {
        let doc = room.1;
        if let Some(present) = self.rooms.get_mut(&room) {
            present.remove(&id);
            for &peer in present.keys() {
                out.push((
                    peer,
                    RelayMsg::Presence {
                        doc,
                        peer: id,
                        state: None,
                    },
                ));
            }
            if present.is_empty() {
                self.rooms.remove(&room);
            }
        }
    }

    /// Connection `id` is going away: it leaves every document it was present in; returns
    /// the messages telling the others, by recipient.
    pub fn leave_presence(&mut self, id: u64) -> Vec<(u64, RelayMsg)> {
        let mut out = Vec::new();
        let rooms = match self.conns.get_mut(&id) {
            Some(m) => std::mem::take(&mut m.rooms),
            None => return out,
        };
        for room in rooms {
            self.left(id, room, &mut out);
        }
        out
    }

    /// Carry out [`Effect::Subscribe`] for connection `id`.
    pub fn subscribe(&mut self, id: u64, namespaces: BTreeSet<String>, docs: BTreeSet<DocId>) {
        if let Some(m) = self.conns.get_mut(&id) {
            m.namespaces = Some(namespaces);
            m.docs = docs;
        }
    }

    /// The connections an [`Effect::FanOut`] of `doc` in `namespace` from connection `except`
    /// goes to, in id order.
    pub fn recipients<'a>(
        &'a self,
        namespace: &'a str,
        doc: &'a DocId,
        except: u64,
    ) -> impl Iterator<Item = (u64, &'a T)> + 'a {
        self.conns
            .iter()
            .filter(move |(id, m)| **id != except && m.wants(namespace, doc))
            .map(|(id, m)| (*id, &m.conn))
    }

    /// What the shell keeps for connection `id`.
    pub fn get(&self, id: u64) -> Option<&T> {
        self.conns.get(&id).map(|m| &m.conn)
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::log::RelayLog;

    fn cfg() -> SessionConfig {
        SessionConfig {
            limits: Limits {
                max_frame_bytes: 1 << 20,
                max_changes_per_push: 3,
                max_change_bytes: 1 << 20,
                max_docs_per_connection: 2,
            },
            page_bytes: 1 << 16,
            feed_page: 100,
            presence_per_sec: 10,
            presence_burst: 5,
        }
    }

    fn hello(feeds: Vec<FeedCursor>) -> Option<ClientMsg> {
        Some(ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            device: [1; 16],
            feeds,
        })
    }

    fn claims(read: &[&str], write: &[&str]) -> Claims {
        Claims {
            sub: "ada".into(),
            exp: u64::MAX,
            read: read.iter().map(|s| s.to_string()).collect(),
            write: write.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn open(log: &RelayLog, c: Option<Claims>) -> RelaySession {
        let mut s = RelaySession::accept(cfg(), hello(Vec::new()), || Ok(c)).unwrap();
        s.greet(log);
        s
    }

    fn changes(n: usize) -> Vec<Vec<u8>> {
        let mut doc = automerge::AutoCommit::new();
        for i in 0..n {
            automerge::transaction::Transactable::put(&mut doc, automerge::ROOT, "k", i as i64)
                .unwrap();
            doc.commit();
        }
        doc.get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect()
    }

    /// `n` changes that each put 60 letters Automerge cannot compress away.
    fn noisy_changes(n: usize) -> Vec<Vec<u8>> {
        let mut doc = automerge::AutoCommit::new();
        let mut x: u64 = 1;
        for i in 0..n {
            let text: String = (0..60)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (b'a' + (x >> 59) as u8 % 26) as char
                })
                .collect();
            automerge::transaction::Transactable::put(
                &mut doc,
                automerge::ROOT,
                format!("k{i}"),
                text,
            )
            .unwrap();
            doc.commit();
        }
        doc.get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect()
    }

    fn code(e: &Effect) -> Option<ErrorCode> {
        match e {
            Effect::Send(RelayMsg::Error { code, .. }) => Some(*code),
            _ => None,
        }
    }

    #[test]
    fn the_handshake_checks_hello_then_version_then_token() {
        let asked = std::cell::Cell::new(false);
        let no_hello = RelaySession::accept(cfg(), Some(ClientMsg::Ping { nonce: 1 }), || {
            asked.set(true);
            Ok(None)
        });
        let e = no_hello.err().unwrap();
        assert_eq!(
            (code(&e[0]), &e[1]),
            (Some(ErrorCode::BadFrame), &Effect::Close)
        );
        let old = Some(ClientMsg::Hello {
            version: 0,
            device: [1; 16],
            feeds: Vec::new(),
        });
        let e = RelaySession::accept(cfg(), old, || {
            asked.set(true);
            Ok(None)
        })
        .err()
        .unwrap();
        assert_eq!(code(&e[0]), Some(ErrorCode::UnsupportedVersion));
        assert!(
            !asked.get(),
            "the token is checked only after the hello and version"
        );
        let e = RelaySession::accept(cfg(), hello(Vec::new()), || Err(AuthError::Expired))
            .err()
            .unwrap();
        assert_eq!(
            (code(&e[0]), &e[1]),
            (Some(ErrorCode::Unauthorized), &Effect::Close)
        );
    }

    #[test]
    fn a_push_is_acked_then_fanned_out_and_a_replay_is_only_acked() {
        let log = RelayLog::in_memory();
        let mut s = open(&log, None);
        let doc = DocId([5; 16]);
        let cs = changes(2);
        let push = |batch| ClientMsg::Push {
            namespace: "notes".into(),
            doc,
            batch,
            changes: cs.clone(),
        };
        let e = s.handle_message(&log, Instant::now(), push(1));
        // Nothing is acknowledged or fanned out before the log is durable.
        assert_eq!(e[0], Effect::AwaitDurable);
        assert_eq!(
            e[1],
            Effect::Send(RelayMsg::Ack {
                doc,
                batch: 1,
                seqs: vec![1, 2]
            })
        );
        assert!(matches!(
            &e[2],
            Effect::FanOut { namespace, changes: RelayMsg::Changes { from: 1, to: 2, .. }, .. }
                if namespace == "notes"
        ));
        assert_eq!(e.len(), 3);
        // Replaying is harmless: same seqs, nothing new to fan out.
        let e = s.handle_message(&log, Instant::now(), push(2));
        assert_eq!(
            e,
            vec![
                Effect::AwaitDurable,
                Effect::Send(RelayMsg::Ack {
                    doc,
                    batch: 2,
                    seqs: vec![1, 2]
                })
            ]
        );
    }

    #[test]
    fn refusals_are_errors_that_keep_the_connection() {
        let log = RelayLog::in_memory();
        let mut s = open(&log, Some(claims(&["notes"], &[])));
        let doc = DocId([6; 16]);
        let e = s.handle_message(
            &log,
            Instant::now(),
            ClientMsg::Push {
                namespace: "notes".into(),
                doc,
                batch: 4,
                changes: changes(1),
            },
        );
        assert_eq!(e.len(), 1);
        assert_eq!(code(&e[0]), Some(ErrorCode::Forbidden));
        let e = s.handle_message(
            &log,
            Instant::now(),
            ClientMsg::Subscribe {
                namespaces: vec!["notes".into(), "secret".into()],
                docs: vec![doc],
            },
        );
        assert_eq!(
            e[0],
            Effect::Subscribe {
                namespaces: ["notes".to_string()].into(),
                docs: [doc].into()
            }
        );
        assert_eq!(code(&e[1]), Some(ErrorCode::Forbidden));
        let e = s.handle_message(
            &log,
            Instant::now(),
            ClientMsg::Subscribe {
                namespaces: Vec::new(),
                docs: vec![DocId([1; 16]), DocId([2; 16]), DocId([3; 16])],
            },
        );
        assert_eq!(e.len(), 1);
        assert_eq!(code(&e[0]), Some(ErrorCode::TooLarge));
        let e = s.handle_message(&log, Instant::now(), hello(Vec::new()).unwrap());
        assert_eq!(
            (code(&e[0]), &e[1]),
            (Some(ErrorCode::BadFrame), &Effect::Close)
        );
    }

    #[test]
    fn pages_and_snapshot_chunks_fit_frames_smaller_than_pages() {
        let mut log = RelayLog::in_memory();
        log.compact_after = 1_000_000;
        let mut cfg = cfg();
        cfg.limits.max_frame_bytes = 1024;
        cfg.limits.max_changes_per_push = 1000;
        let mut s = RelaySession::accept(cfg, hello(Vec::new()), || Ok(None)).unwrap();
        s.greet(&log);
        let doc = DocId([7; 16]);
        let cs = noisy_changes(40);
        let e = s.handle_message(
            &log,
            Instant::now(),
            ClientMsg::Push {
                namespace: "notes".into(),
                doc,
                batch: 1,
                changes: cs.clone(),
            },
        );
        assert_eq!(e[0], Effect::AwaitDurable);
        assert!(matches!(e[1], Effect::Send(RelayMsg::Ack { .. })));
        let frames = |e: Vec<Effect>| -> Vec<(usize, RelayMsg)> {
            e.into_iter()
                .map(|e| match e {
                    Effect::Send(m) => (codec::encode(&m, usize::MAX).unwrap().len(), m),
                    other => panic!("expected a send, got {other:?}"),
                })
                .collect()
        };
        // Pages of all 40 changes would be over 1 KiB: trimmed, and read to the end.
        let mut after = 0;
        loop {
            let pull = ClientMsg::Pull {
                doc,
                after,
                max_bytes: 0,
            };
            let [(len, RelayMsg::Changes { to, more, .. })] =
                &frames(s.handle_message(&log, Instant::now(), pull))[..]
            else {
                panic!("expected one page");
            };
            assert!(*len <= 1024, "a page frame of {len} bytes");
            after = *to;
            if !more {
                break;
            }
        }
        assert_eq!(after, 40);
        // A compacted log is sent as a snapshot: every chunk fits too.
        log.compact(&doc).unwrap();
        let pull = ClientMsg::Pull {
            doc,
            after: 0,
            max_bytes: 0,
        };
        let sent = frames(s.handle_message(&log, Instant::now(), pull));
        assert!(sent.len() > 2, "a snapshot in several chunks, then a page");
        assert!(sent.iter().all(|(len, _)| *len <= 1024));
    }

    #[test]
    fn a_relay_without_auth_lets_every_namespace_be_written() {
        let log = RelayLog::in_memory();
        let mut s = RelaySession::accept(cfg(), hello(Vec::new()), || Ok(None)).unwrap();
        let Effect::Send(RelayMsg::Hello { read, write, .. }) = &s.greet(&log)[0] else {
            panic!("expected the hello first");
        };
        assert!(read.iter().any(|n| n == ALL_NAMESPACES));
        assert!(write.iter().any(|n| n == ALL_NAMESPACES));
        // ... and `*` itself is never a namespace.
        let e = s.handle_message(
            &log,
            Instant::now(),
            ClientMsg::Push {
                namespace: ALL_NAMESPACES.into(),
                doc: DocId([8; 16]),
                batch: 1,
                changes: changes(1),
            },
        );
        assert_eq!(code(&e[0]), Some(ErrorCode::BadFrame));
    }

    fn here(name: &str) -> Option<Presence> {
        Some(Presence {
            name: name.into(),
            color: 0xff0000,
            selection: None,
        })
    }

    #[test]
    fn presence_is_rate_limited_and_checked() {
        let log = RelayLog::in_memory();
        let mut s = open(&log, Some(claims(&["notes"], &[])));
        let doc = DocId([3; 16]);
        let t0 = Instant::now();
        let msg = |ns: &str, state| ClientMsg::Presence {
            namespace: ns.into(),
            doc,
            state,
        };
        // A burst of 5, then 10 per second.
        let passed = (0..50)
            .filter(|_| {
                !s.handle_message(&log, t0, msg("notes", here("ada")))
                    .is_empty()
            })
            .count();
        assert_eq!(passed, 5);
        assert_eq!(s.presence_dropped(), 45);
        let later = t0 + std::time::Duration::from_millis(300);
        let passed = (0..50)
            .filter(|_| {
                !s.handle_message(&log, later, msg("notes", here("ada")))
                    .is_empty()
            })
            .count();
        assert_eq!(passed, 3, "300 ms at 10/s");
        // Leaving always passes; a namespace the token cannot read and an oversized name do not.
        assert!(matches!(
            &s.handle_message(&log, later, msg("notes", None))[..],
            [Effect::Presence { state: None, .. }]
        ));
        let much_later = t0 + std::time::Duration::from_secs(10);
        let e = s.handle_message(&log, much_later, msg("secret", here("ada")));
        assert_eq!(code(&e[0]), Some(ErrorCode::Forbidden));
        let e = s.handle_message(&log, much_later, msg("notes", here(&"x".repeat(65))));
        assert_eq!(code(&e[0]), Some(ErrorCode::TooLarge));
    }

    #[test]
    fn the_hub_tells_who_is_present_and_who_left() {
        let mut hub: Hub<()> = Hub::default();
        let (a, b, c) = (hub.join(None, ()), hub.join(None, ()), hub.join(None, ()));
        let doc = DocId([4; 16]);
        let ns = || "notes".to_string();
        assert!(hub.set_presence(a, ns(), doc, here("ada")).is_empty());
        // Bob arrives: Ada hears of him, he hears of Ada.
        let out = hub.set_presence(b, ns(), doc, here("bob"));
        assert_eq!(
            out,
            vec![
                (
                    a,
                    RelayMsg::Presence {
                        doc,
                        peer: b,
                        state: here("bob")
                    }
                ),
                (
                    b,
                    RelayMsg::Presence {
                        doc,
                        peer: a,
                        state: here("ada")
                    }
                ),
            ]
        );
        // Someone in another document hears nothing.
        assert!(hub
            .set_presence(c, ns(), DocId([5; 16]), here("cy"))
            .is_empty());
        // Bob's connection ends: Ada hears that he left.
        assert_eq!(
            hub.leave_presence(b),
            vec![(
                a,
                RelayMsg::Presence {
                    doc,
                    peer: b,
                    state: None
                }
            )]
        );
        hub.leave(b);
        assert!(hub.set_presence(a, ns(), doc, None).is_empty());
        assert!(
            hub.rooms.keys().all(|(_, d)| *d != doc),
            "an empty room is forgotten"
        );
    }

    #[test]
    fn the_hub_fans_out_to_readers_of_the_namespace_except_the_pusher() {
        let mut hub: Hub<&str> = Hub::default();
        let a = hub.join(None, "a");
        let b = hub.join(Some(claims(&["notes"], &[])), "b");
        let c = hub.join(Some(claims(&["other"], &[])), "c");
        let d = hub.join(None, "d");
        let doc = DocId([9; 16]);
        hub.subscribe(d, BTreeSet::new(), BTreeSet::new());
        let to: Vec<&str> = hub.recipients("notes", &doc, a).map(|(_, t)| *t).collect();
        assert_eq!(to, vec!["b"]);
        hub.subscribe(d, BTreeSet::new(), [doc].into());
        let to: Vec<u64> = hub.recipients("notes", &doc, b).map(|(id, _)| id).collect();
        assert_eq!(to, vec![a, d]);
        assert_eq!(hub.leave(c), Some("c"));
        assert_eq!(hub.len(), 3);
    }
}
