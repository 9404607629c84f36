//! An environment's state as the server holds it: the current flags, the selector, and a bounded
//! window of recent changes from which a client at an older version is brought current with one
//! merged delta. Without I/O, so the server's hub and the deterministic client tests use the same
//! catch-up rules.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use vane_proto::v1 as pb;

use crate::model::Flag;
use crate::state::Selector;

/// A flag as stored in memory: the model and its wire form, converted once per change.
#[derive(Debug)]
pub struct Entry {
    /// The flag.
    pub flag: Flag,
    /// The same flag as sent to rules-mode clients.
    pub wire: pb::Flag,
}

impl Entry {
    /// Wraps `flag`, converting it to its wire form.
    pub fn new(flag: Flag) -> Arc<Entry> {
        let wire = pb::Flag::from(&flag);
        Arc::new(Entry { flag, wire })
    }
}

/// One committed change: version `version` set `key` to `entry` (`None`: deleted).
#[derive(Debug, Clone)]
pub struct Change {
    /// The environment version this change produced.
    pub version: u64,
    /// The flag key.
    pub key: String,
    /// The flag after the change; `None` when it was deleted.
    pub entry: Option<Arc<Entry>>,
}

/// An environment's flags and recent history.
#[derive(Debug, Clone)]
pub struct EnvHistory {
    selector: Selector,
    flags: BTreeMap<String, Arc<Entry>>,
    /// Changes in version order, the last one at `selector.version`; at most `window` of them.
    changes: VecDeque<Change>,
    window: usize,
}

impl EnvHistory {
    /// An environment at `selector` holding `flags`, with `changes` (oldest first) as its
    /// resumable history, of which the newest `window` are kept.
    pub fn new(
        selector: Selector,
        flags: impl IntoIterator<Item = Flag>,
        changes: impl IntoIterator<Item = Change>,
        window: usize,
    ) -> Self {
        let mut history = EnvHistory {
            selector,
            flags: flags
                .into_iter()
                .map(|f| (f.key.clone(), Entry::new(f)))
                .collect(),
            changes: changes.into_iter().collect(),
            window: window.max(1),
        };
        history.trim();
        history
    }

    /// Where the environment stands.
    pub fn selector(&self) -> Selector {
        self.selector
    }

    /// The current flag with this key.
    pub fn get(&self, key: &str) -> Option<&Arc<Entry>> {
        self.flags.get(key)
    }

    /// The current flags, by key.
    pub fn flags(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.flags.values()
    }

    /// The oldest version from which a delta can still be built.
    pub fn oldest_resumable(&self) -> u64 {
        self.changes
            .front()
            .map_or(self.selector.version, |c| c.version - 1)
    }

    /// Records the change committed as the next version, and returns the delta a client at
    /// the previous version needs.
    pub fn apply(&mut self, key: String, flag: Option<Flag>) -> pb::Delta {
        let version = self.selector.version + 1;
        let entry = flag.map(|mut f| {
            f.version = version;
            Entry::new(f)
        });
        match &entry {
            Some(e) => self.flags.insert(key.clone(), e.clone()),
            None => self.flags.remove(&key),
        };
        self.selector.version = version;
        self.changes.push_back(Change {
            version,
            key,
            entry,
        });
        self.trim();
        self.delta_since(version - 1)
            .expect("the change just recorded is in the window")
    }

    fn trim(&mut self) {
        while self.changes.len() > self.window {
            self.changes.pop_front();
        }
    }

    /// The frame that brings a client at `client` current: `UpToDate`, one merged `Delta`, or a
    /// `Snapshot` with the reason a delta is impossible.
    pub fn catch_up(&self, client: Option<Selector>) -> pb::Frame {
        use pb::SnapshotReason as R;
        let Some(client) = client else {
            return self.snapshot(R::NoSelector).into();
        };
        if client.epoch != self.selector.epoch {
            return self.snapshot(R::EpochChanged).into();
        }
        if client.version == self.selector.version {
            return pb::UpToDate {
                selector: Some(self.selector.into()),
            }
            .into();
        }
        if client.version > self.selector.version {
            return self.snapshot(R::ClientAhead).into();
        }
        match self.delta_since(client.version) {
            Some(delta) => delta.into(),
            None => self.snapshot(R::HistoryGone).into(),
        }
    }

    /// The changes after `from`, merged so each flag appears once; `None` if the window no longer
    /// reaches back to `from`.
    pub fn delta_since(&self, from: u64) -> Option<pb::Delta> {
        if from < self.oldest_resumable() || from > self.selector.version {
            return None;
        }
        // Changes are in version order, so skip the ones the client has.
        let skip = self.changes.len() - (self.selector.version - from) as usize;
        let mut latest: BTreeMap<&str, &Option<Arc<Entry>>> = BTreeMap::new();
        for change in self.changes.iter().skip(skip) {
            latest.insert(&change.key, &change.entry);
        }
        let mut delta = pb::Delta {
            epoch: self.selector.epoch,
            from_version: from,
            to_version: self.selector.version,
            upserts: Vec::new(),
            deletes: Vec::new(),
        };
        for (key, entry) in latest {
            match entry {
                Some(e) => delta.upserts.push(e.wire.clone()),
                None => delta.deletes.push(key.to_owned()),
            }
        }
        Some(delta)
    }

    /// The whole environment.
    pub fn snapshot(&self, reason: pb::SnapshotReason) -> pb::Snapshot {
        pb::Snapshot {
            selector: Some(self.selector.into()),
            flags: self.flags.values().map(|e| e.wire.clone()).collect(),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::frame::Kind;

    fn env(window: usize) -> EnvHistory {
        EnvHistory::new(
            Selector {
                epoch: 9,
                version: 0,
            },
            [],
            [],
            window,
        )
    }

    #[test]
    fn merged_delta_keeps_the_latest_state_per_flag() {
        let mut h = env(100);
        h.apply("a".into(), Some(Flag::boolean("a", true, true)));
        h.apply("b".into(), Some(Flag::boolean("b", true, true)));
        h.apply("a".into(), Some(Flag::boolean("a", false, true)));
        h.apply("b".into(), None);
        let d = h.delta_since(0).unwrap();
        assert_eq!((d.from_version, d.to_version), (0, 4));
        assert_eq!(d.upserts.len(), 1);
        assert!(!d.upserts[0].on);
        assert_eq!(d.upserts[0].version, 3);
        assert_eq!(d.deletes, vec!["b".to_owned()]);
        let d = h.delta_since(3).unwrap();
        assert!(d.upserts.is_empty());
        assert_eq!(d.deletes, vec!["b".to_owned()]);
    }

    #[test]
    fn catch_up_chooses_the_cheapest_correct_frame() {
        let mut h = env(2);
        for i in 0..5 {
            h.apply("a".into(), Some(Flag::boolean("a", i % 2 == 0, true)));
        }
        let at = |version| Some(Selector { epoch: 9, version });
        let reason = |f: pb::Frame| match f.kind {
            Some(Kind::Snapshot(s)) => s.reason(),
            other => panic!("expected a snapshot, got {other:?}"),
        };
        assert!(matches!(h.catch_up(at(5)).kind, Some(Kind::UpToDate(_))));
        assert!(matches!(h.catch_up(at(3)).kind, Some(Kind::Delta(_))));
        assert_eq!(reason(h.catch_up(at(2))), pb::SnapshotReason::HistoryGone);
        assert_eq!(reason(h.catch_up(at(6))), pb::SnapshotReason::ClientAhead);
        assert_eq!(reason(h.catch_up(None)), pb::SnapshotReason::NoSelector);
        let other_epoch = Some(Selector {
            epoch: 1,
            version: 5,
        });
        assert_eq!(
            reason(h.catch_up(other_epoch)),
            pb::SnapshotReason::EpochChanged
        );
    }
}
