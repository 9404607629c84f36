//! What evaluated mode remembers per session: the context, and a hash of what the session was
//! told about each flag, so a change is pushed only to the sessions whose values it alters.
//! Pure logic over the environment's history; [`super::Session`] calls it.

use std::collections::{BTreeSet, HashMap};

use vane_core::eval::Context;
use vane_core::history::EnvHistory;
use vane_core::protocol::Selector;
use vane_proto::v1 as pb;

/// An evaluated-mode session's state: its context, and a hash of what it was told per flag,
/// so a change is pushed only to the sessions whose values it alters.
#[derive(Debug)]
pub(super) struct Evaluated {
    ctx: Context,
    told: HashMap<String, u64>,
}

impl Evaluated {
    pub(super) fn new(ctx: Context) -> Evaluated {
        Evaluated {
            ctx,
            told: HashMap::new(),
        }
    }

    /// Evaluates `key` and records it as told; `None` if the flag does not exist.
    fn tell(&mut self, h: &EnvHistory, key: &str) -> Option<(pb::EvaluatedFlag, u64)> {
        let (wire, hash) = h.evaluated(h.flag(key)?, &self.ctx);
        self.told.insert(key.to_owned(), hash);
        Some((wire, hash))
    }

    /// Every flag's value, and the selector it is at.
    fn snapshot(&mut self, h: &EnvHistory, reason: pb::SnapshotReason) -> (pb::Frame, Selector) {
        self.told.clear();
        let mut values = Vec::new();
        for e in h.flags() {
            let (wire, hash) = h.evaluated(e, &self.ctx);
            self.told.insert(e.wire.key.clone(), hash);
            values.push(wire);
        }
        let snapshot = pb::Snapshot {
            selector: Some(h.selector().into()),
            reason: reason.into(),
            values,
            ..Default::default()
        };
        (snapshot.into(), h.selector())
    }

    /// Brings a client that holds values for this context at `client` current.
    pub(super) fn catch_up(
        &mut self,
        h: &EnvHistory,
        client: Option<Selector>,
    ) -> (pb::Frame, Selector) {
        let from = match h.resumable(client) {
            Ok(from) => from,
            Err(reason) => return self.snapshot(h, reason),
        };
        let current = h.selector();
        let affected = h
            .changed_since(from)
            .map(|changed| h.affected_flags(&changed))
            .expect("resumable() checked the window");
        // Flags untouched since `from` evaluate now as they did then: what the client holds.
        // One evaluation per flag: its hash is recorded, its value sent if it may have changed.
        self.told.clear();
        let mut values = Vec::new();
        for e in h.flags() {
            let (wire, hash) = h.evaluated(e, &self.ctx);
            self.told.insert(e.wire.key.clone(), hash);
            if affected.contains(&e.wire.key) {
                values.push(wire);
            }
        }
        if from == current.version {
            return (
                pb::UpToDate {
                    selector: Some(current.into()),
                }
                .into(),
                current,
            );
        }
        let delta = pb::Delta {
            epoch: current.epoch,
            from_version: from,
            to_version: current.version,
            values,
            deletes: affected
                .into_iter()
                .filter(|k| h.flag(k).is_none())
                .collect(),
            ..Default::default()
        };
        (delta.into(), current)
    }

    /// The values that differ from what the client was told, among `keys` (all flags, and all
    /// told, when `None`), recorded as told; and the told flags that no longer exist.
    fn diff(
        &mut self,
        h: &EnvHistory,
        keys: Option<BTreeSet<String>>,
    ) -> (Vec<pb::EvaluatedFlag>, Vec<String>) {
        let keys = keys.unwrap_or_else(|| {
            h.flags()
                .map(|e| e.wire.key.clone())
                .chain(self.told.keys().cloned())
                .collect()
        });
        let (mut values, mut deletes) = (Vec::new(), Vec::new());
        for key in keys {
            let before = self.told.get(&key).copied();
            match self.tell(h, &key) {
                Some((wire, hash)) if before != Some(hash) => values.push(wire),
                Some(_) => {}
                None => {
                    if self.told.remove(&key).is_some() {
                        deletes.push(key);
                    }
                }
            }
        }
        (values, deletes)
    }

    /// After a change: the delta of this context's values since `sent`, if any differ.
    pub(super) fn push(&mut self, h: &EnvHistory, sent: Selector) -> Option<(pb::Frame, Selector)> {
        let current = h.selector();
        if current == sent {
            return None;
        }
        let affected = h
            .changed_since(sent.version)
            .filter(|_| sent.epoch == current.epoch)
            .map(|c| h.affected_flags(&c));
        let (values, deletes) = self.diff(h, affected);
        if values.is_empty() && deletes.is_empty() {
            return None;
        }
        Some((delta(sent, current, values, deletes, 0), current))
    }

    /// Switches to `ctx`: the delta of values that differ, always sent, answering `seq`.
    pub(super) fn identify(
        &mut self,
        h: &EnvHistory,
        ctx: Context,
        sent: Selector,
        seq: u32,
    ) -> (pb::Frame, Selector) {
        self.ctx = ctx;
        let (values, deletes) = self.diff(h, None);
        let current = h.selector();
        (delta(sent, current, values, deletes, seq), current)
    }
}

/// An evaluated-mode Delta from `sent` to `current`, answering Identify `seq` (0: none).
fn delta(
    sent: Selector,
    current: Selector,
    values: Vec<pb::EvaluatedFlag>,
    deletes: Vec<String>,
    seq: u32,
) -> pb::Frame {
    pb::Delta {
        epoch: current.epoch,
        from_version: sent.version,
        to_version: current.version,
        values,
        deletes,
        identify_seq: seq,
        ..Default::default()
    }
    .into()
}
