//! An environment's state as the server holds it: the current flags and segments (compiled, and
//! in wire form, each converted once per change), the selector, and a bounded window of recent
//! changes from which a client at an older version is brought current with one merged delta.
//! Without I/O: the server's hub and its session machine use it, in production and in the
//! deterministic protocol tests alike.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use vane_proto::v1 as pb;

use crate::eval::{CompiledFlag, CompiledSegment, Context, Evaluation, SegmentSource};
use crate::model::{Flag, Segment, ValidationError};
use crate::protocol::Selector;

/// A flag in memory: compiled for evaluation, and as sent to rules-mode clients.
#[derive(Debug)]
pub struct FlagEntry {
    /// The compiled flag (holds the flag as written).
    pub compiled: CompiledFlag,
    /// The wire form, shared with the history window (which keeps no compiled state).
    pub wire: Arc<pb::Flag>,
}

/// A segment in memory.
#[derive(Debug)]
pub struct SegmentEntry {
    /// The compiled segment.
    pub compiled: CompiledSegment,
    /// The wire form, shared with the history window.
    pub wire: Arc<pb::Segment>,
}

/// What a change wrote: a flag or a segment, or `None` for a deletion.
#[derive(Debug, Clone)]
pub enum Item {
    /// A flag.
    Flag(Arc<FlagEntry>),
    /// A segment.
    Segment(Arc<SegmentEntry>),
}

impl Item {
    /// Compiles a flag (checking it fully).
    pub fn flag(flag: Flag) -> Result<Item, ValidationError> {
        Ok(Item::Flag(Arc::new(FlagEntry::new(flag, None)?)))
    }

    /// Compiles a segment (checking all but its references).
    pub fn segment(segment: Segment) -> Result<Item, ValidationError> {
        Ok(Item::Segment(Arc::new(SegmentEntry::new(segment, None)?)))
    }

    /// Reads an item back from its stored JSON (see [`Item::body`]) and compiles it. Every
    /// store uses this, so what one backend wrote any other reads the same way.
    pub fn parse(kind: ItemKind, body: &str) -> Result<Item, String> {
        let compiled = match Stored::read(kind, body)? {
            Stored::Flag(f) => Item::flag(f),
            Stored::Segment(s) => Item::segment(s),
        };
        compiled.map_err(|e| format!("stored {}: {e}", kind.as_str()))
    }

    /// The item as stored: its JSON as written, version included.
    pub fn body(&self) -> String {
        let json = match self {
            Item::Flag(e) => serde_json::to_string(e.compiled.flag()),
            Item::Segment(e) => serde_json::to_string(e.compiled.segment()),
        };
        // The model types serialize plain maps, strings and numbers: this cannot fail.
        json.unwrap_or_default()
    }

    /// The environment version this item was written at.
    pub fn version(&self) -> u64 {
        match self {
            Item::Flag(e) => e.wire.version,
            Item::Segment(e) => e.wire.version,
        }
    }

    /// Whether it is a flag or a segment.
    pub fn kind(&self) -> ItemKind {
        match self {
            Item::Flag(_) => ItemKind::Flag,
            Item::Segment(_) => ItemKind::Segment,
        }
    }
}

impl FlagEntry {
    fn new(flag: Flag, previous: Option<&FlagEntry>) -> Result<FlagEntry, ValidationError> {
        let wire = Arc::new(pb::Flag::from(&flag));
        Ok(FlagEntry {
            compiled: CompiledFlag::after(flag, previous.map(|p| &p.compiled))?,
            wire,
        })
    }

    fn set_version(&mut self, version: u64) {
        self.compiled.set_version(version);
        Arc::make_mut(&mut self.wire).version = version;
    }
}

impl SegmentEntry {
    fn new(
        segment: Segment,
        previous: Option<&SegmentEntry>,
    ) -> Result<SegmentEntry, ValidationError> {
        let wire = Arc::new(pb::Segment::from(&segment));
        Ok(SegmentEntry {
            compiled: CompiledSegment::after(segment, previous.map(|p| &p.compiled))?,
            wire,
        })
    }

    fn set_version(&mut self, version: u64) {
        self.compiled.set_version(version);
        Arc::make_mut(&mut self.wire).version = version;
    }
}

/// An item's stored JSON, read back into the model (the one reader of every store's bodies).
enum Stored {
    Flag(Flag),
    Segment(Segment),
}

impl Stored {
    fn read(kind: ItemKind, body: &str) -> Result<Stored, String> {
        match kind {
            ItemKind::Flag => serde_json::from_str(body).map(Stored::Flag),
            ItemKind::Segment => serde_json::from_str(body).map(Stored::Segment),
        }
        .map_err(|e| format!("stored {} JSON: {e}", kind.as_str()))
    }
}

/// Whether a change concerns a flag or a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ItemKind {
    /// A flag.
    Flag,
    /// A segment.
    Segment,
}

impl ItemKind {
    /// `"flag"` or `"segment"`, as stores and messages name it.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemKind::Flag => "flag",
            ItemKind::Segment => "segment",
        }
    }

    /// Parses [`ItemKind::as_str`].
    pub fn parse(s: &str) -> Option<ItemKind> {
        match s {
            "flag" => Some(ItemKind::Flag),
            "segment" => Some(ItemKind::Segment),
            _ => None,
        }
    }
}

/// A write before it is committed: a flag or segment compiled (so it is known to be valid) and
/// waiting for the version its commit will give it, or a deletion. The store turns it into the
/// [`Change`] it commits, so the item is compiled once, before the commit.
#[derive(Debug)]
pub enum Write {
    /// Create or replace a flag.
    Flag(FlagEntry),
    /// Create or replace a segment.
    Segment(SegmentEntry),
    /// Delete the item with this key.
    Delete(ItemKind, String),
}

impl Write {
    /// Compiles a flag to write (checking it fully; its segment references are the caller's).
    pub fn flag(flag: Flag) -> Result<Write, ValidationError> {
        Write::flag_after(flag, None)
    }

    /// The same, for a flag replacing `previous`: rules it did not change are not compiled
    /// again but shared with it (a toggle of a flag full of regular expressions costs nothing).
    pub fn flag_after(flag: Flag, previous: Option<&FlagEntry>) -> Result<Write, ValidationError> {
        FlagEntry::new(flag, previous).map(Write::Flag)
    }

    /// Compiles a segment to write (checking all but its references).
    pub fn segment(segment: Segment) -> Result<Write, ValidationError> {
        Write::segment_after(segment, None)
    }

    /// The same, sharing the compiled rules of `previous` if they did not change.
    pub fn segment_after(
        segment: Segment,
        previous: Option<&SegmentEntry>,
    ) -> Result<Write, ValidationError> {
        SegmentEntry::new(segment, previous).map(Write::Segment)
    }

    /// Flag or segment.
    pub fn kind(&self) -> ItemKind {
        match self {
            Write::Flag(_) => ItemKind::Flag,
            Write::Segment(_) => ItemKind::Segment,
            Write::Delete(kind, _) => *kind,
        }
    }

    /// The key written or deleted.
    pub fn key(&self) -> &str {
        match self {
            Write::Flag(e) => &e.wire.key,
            Write::Segment(e) => &e.wire.key,
            Write::Delete(_, key) => key,
        }
    }

    /// The change this write is once committed as `version`.
    pub fn into_change(self, version: u64) -> Change {
        let (kind, key, item) = match self {
            Write::Flag(mut e) => {
                e.set_version(version);
                (
                    ItemKind::Flag,
                    e.wire.key.clone(),
                    Some(Item::Flag(Arc::new(e))),
                )
            }
            Write::Segment(mut e) => {
                e.set_version(version);
                let key = e.wire.key.clone();
                (ItemKind::Segment, key, Some(Item::Segment(Arc::new(e))))
            }
            Write::Delete(kind, key) => (kind, key, None),
        };
        Change {
            version,
            kind,
            key,
            item,
        }
    }
}

/// One committed change: version `version` set the `kind` item `key` to `item` (`None`: deleted).
#[derive(Debug, Clone)]
pub struct Change {
    /// The environment version this change produced.
    pub version: u64,
    /// Flag or segment.
    pub kind: ItemKind,
    /// Its key.
    pub key: String,
    /// The item after the change; `None` when it was deleted.
    pub item: Option<Item>,
}

/// A change as the history window keeps it: what a delta needs (the wire form), none of the
/// compiled state, so an old version of a flag costs its size on the wire and no more.
#[derive(Debug, Clone)]
pub struct Logged {
    /// The environment version this change produced.
    pub version: u64,
    /// Flag or segment.
    pub kind: ItemKind,
    /// Its key.
    pub key: String,
    /// The item after the change, as sent; `None` when it was deleted.
    pub wire: Option<Wire>,
}

/// An item in wire form.
#[derive(Debug, Clone)]
pub enum Wire {
    /// A flag.
    Flag(Arc<pb::Flag>),
    /// A segment.
    Segment(Arc<pb::Segment>),
}

impl Logged {
    /// Reads a logged change back from its stored JSON, without compiling it: its definition
    /// was checked when it was committed, and only its wire form is kept.
    pub fn parse(
        version: u64,
        kind: ItemKind,
        key: String,
        body: Option<&str>,
    ) -> Result<Logged, String> {
        let wire = match body.map(|b| Stored::read(kind, b)).transpose()? {
            None => None,
            Some(Stored::Flag(f)) => Some(Wire::Flag(Arc::new(pb::Flag::from(&f)))),
            Some(Stored::Segment(s)) => Some(Wire::Segment(Arc::new(pb::Segment::from(&s)))),
        };
        Ok(Logged {
            version,
            kind,
            key,
            wire,
        })
    }
}

impl From<&Change> for Logged {
    fn from(c: &Change) -> Logged {
        Logged {
            version: c.version,
            kind: c.kind,
            key: c.key.clone(),
            wire: c.item.as_ref().map(|item| match item {
                Item::Flag(e) => Wire::Flag(e.wire.clone()),
                Item::Segment(e) => Wire::Segment(e.wire.clone()),
            }),
        }
    }
}

/// An environment's flags, segments and recent history.
#[derive(Debug, Clone)]
pub struct EnvHistory {
    selector: Selector,
    flags: BTreeMap<String, Arc<FlagEntry>>,
    segments: BTreeMap<String, Arc<SegmentEntry>>,
    /// Changes in version order, the last one at `selector.version`; at most `window` of them.
    /// Usually one per version; a merged span of versions (see [`EnvHistory::apply_merged`])
    /// is several entries that all carry the span's last version.
    changes: VecDeque<Logged>,
    window: usize,
}

/// The changes after some version, by kind.
#[derive(Debug, Default)]
pub struct Changed<'a> {
    /// Flag keys created, changed or deleted.
    pub flags: BTreeSet<&'a str>,
    /// Segment keys created, changed or deleted.
    pub segments: BTreeSet<&'a str>,
}

impl SegmentSource for EnvHistory {
    fn segment(&self, key: &str) -> Option<&CompiledSegment> {
        self.segments.get(key).map(|e| &e.compiled)
    }
}

/// The hash of what an evaluated-mode client was told about one flag, to tell whether a change
/// altered it without keeping the value itself.
pub fn evaluation_hash(e: &Evaluation<'_>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    e.variant.hash(&mut h);
    e.reason.hash(&mut h);
    e.error.hash(&mut h);
    h.finish()
}

impl EnvHistory {
    /// An environment at `selector` holding `items`, with `changes` (oldest first) as its
    /// resumable history, of which the newest `window` are kept.
    pub fn new(
        selector: Selector,
        items: impl IntoIterator<Item = Item>,
        changes: impl IntoIterator<Item = Logged>,
        window: usize,
    ) -> Self {
        let mut history = EnvHistory {
            selector,
            flags: BTreeMap::new(),
            segments: BTreeMap::new(),
            changes: changes.into_iter().collect(),
            window: window.max(1),
        };
        for item in items {
            match item {
                Item::Flag(e) => history
                    .flags
                    .insert(e.compiled.flag().key.clone(), e)
                    .map(drop),
                Item::Segment(e) => history
                    .segments
                    .insert(e.compiled.segment().key.clone(), e)
                    .map(drop),
            };
        }
        history.trim();
        history
    }

    /// Where the environment stands.
    pub fn selector(&self) -> Selector {
        self.selector
    }

    /// The current flag with this key.
    pub fn flag(&self, key: &str) -> Option<&Arc<FlagEntry>> {
        self.flags.get(key)
    }

    /// The current flags, by key.
    pub fn flags(&self) -> impl Iterator<Item = &Arc<FlagEntry>> {
        self.flags.values()
    }

    /// The current segment with this key.
    pub fn segment_entry(&self, key: &str) -> Option<&Arc<SegmentEntry>> {
        self.segments.get(key)
    }

    /// The current segments, by key.
    pub fn segments(&self) -> impl Iterator<Item = &Arc<SegmentEntry>> {
        self.segments.values()
    }

    /// The oldest version from which a delta can still be built. (A merged span at the front
    /// of the window counts from its last version, less one: its start is not kept.)
    pub fn oldest_resumable(&self) -> u64 {
        self.changes
            .front()
            .map_or(self.selector.version, |c| c.version - 1)
    }

    /// Records a change committed as the next version (the caller applies changes in version
    /// order; see [`EnvHistory::next_version`]), and returns the rules-mode delta a client at
    /// the previous version needs.
    pub fn apply(&mut self, change: Change) -> pb::Delta {
        let version = change.version;
        assert_eq!(
            version,
            self.next_version(),
            "changes apply in version order"
        );
        debug_assert!(
            change
                .item
                .as_ref()
                .is_none_or(|i| i.version() == version && i.kind() == change.kind)
        );
        let key = change.key.clone();
        match (&change.item, change.kind) {
            (Some(Item::Flag(e)), _) => drop(self.flags.insert(key, e.clone())),
            (Some(Item::Segment(e)), _) => drop(self.segments.insert(key, e.clone())),
            (None, ItemKind::Flag) => drop(self.flags.remove(&key)),
            (None, ItemKind::Segment) => drop(self.segments.remove(&key)),
        }
        self.selector.version = version;
        self.changes.push_back(Logged::from(&change));
        self.trim();
        self.delta_since(version - 1)
            .expect("the change just recorded is in the window")
    }

    /// Records the versions after the current one up to `to` at once, from what a merged
    /// delta says of them: each item's latest state (`None`: deleted), not which version did
    /// what. A relay, mirroring its upstream, learns of a span of versions this way when it
    /// was brought current after a gap. The span is kept as entries that all carry `to`, so a
    /// client at any version inside it is sent the whole span again, which is correct (each
    /// item's latest state, applied over an older or newer one of the same span) if more than
    /// it needs; and it leaves the window whole or not at all.
    pub fn apply_merged(
        &mut self,
        to: u64,
        items: impl IntoIterator<Item = (ItemKind, String, Option<Item>)>,
    ) {
        assert!(
            to > self.selector.version,
            "a span ends after the current version"
        );
        for (kind, key, item) in items {
            let change = Change {
                version: to,
                kind,
                key,
                item,
            };
            let logged = Logged::from(&change);
            match (change.item, kind) {
                (Some(Item::Flag(e)), _) => drop(self.flags.insert(change.key, e)),
                (Some(Item::Segment(e)), _) => drop(self.segments.insert(change.key, e)),
                (None, ItemKind::Flag) => drop(self.flags.remove(&change.key)),
                (None, ItemKind::Segment) => drop(self.segments.remove(&change.key)),
            }
            self.changes.push_back(logged);
        }
        self.selector.version = to;
        self.trim();
    }

    /// The version the next change will have.
    pub fn next_version(&self) -> u64 {
        self.selector.version + 1
    }

    /// Drops the oldest entries beyond the window, a merged span as a whole.
    fn trim(&mut self) {
        while self.changes.len() > self.window {
            let Some(dropped) = self.changes.pop_front() else {
                break;
            };
            while self
                .changes
                .front()
                .is_some_and(|c| c.version == dropped.version)
            {
                self.changes.pop_front();
            }
        }
    }

    /// The changes after `from`, in version order; `None` if the window no longer reaches back.
    fn changes_since(&self, from: u64) -> Option<impl Iterator<Item = &Logged>> {
        if from < self.oldest_resumable() || from > self.selector.version {
            return None;
        }
        let skip = self.changes.partition_point(|c| c.version <= from);
        Some(self.changes.iter().skip(skip))
    }

    /// The keys changed after `from`, or `None` if the window no longer reaches back.
    pub fn changed_since(&self, from: u64) -> Option<Changed<'_>> {
        let mut changed = Changed::default();
        for c in self.changes_since(from)? {
            match c.kind {
                ItemKind::Flag => changed.flags.insert(&c.key),
                ItemKind::Segment => changed.segments.insert(&c.key),
            };
        }
        Some(changed)
    }

    /// The frame that brings a rules-mode client at `client` current: `UpToDate`, one merged
    /// `Delta`, or a `Snapshot` with the reason a delta is impossible.
    pub fn catch_up(&self, client: Option<Selector>) -> pb::Frame {
        match self.resumable(client) {
            Ok(from) if from == self.selector.version => pb::UpToDate {
                selector: Some(self.selector.into()),
            }
            .into(),
            Ok(from) => self
                .delta_since(from)
                .expect("resumable() checked the window")
                .into(),
            Err(reason) => self.snapshot(reason).into(),
        }
    }

    /// The version a client at `client` can resume from, or why it needs a snapshot.
    pub fn resumable(&self, client: Option<Selector>) -> Result<u64, pb::SnapshotReason> {
        use pb::SnapshotReason as R;
        let client = client.ok_or(R::NoSelector)?;
        if client.epoch != self.selector.epoch {
            return Err(R::EpochChanged);
        }
        if client.version > self.selector.version {
            return Err(R::ClientAhead);
        }
        if client.version < self.oldest_resumable() {
            return Err(R::HistoryGone);
        }
        Ok(client.version)
    }

    /// The changes after `from`, merged so each item appears once; `None` if the window no
    /// longer reaches back to `from`.
    pub fn delta_since(&self, from: u64) -> Option<pb::Delta> {
        let mut latest: BTreeMap<(ItemKind, &str), &Option<Wire>> = BTreeMap::new();
        for change in self.changes_since(from)? {
            latest.insert((change.kind, &change.key), &change.wire);
        }
        let mut delta = pb::Delta {
            epoch: self.selector.epoch,
            from_version: from,
            to_version: self.selector.version,
            ..Default::default()
        };
        for ((kind, key), item) in latest {
            match (item, kind) {
                (Some(Wire::Flag(f)), _) => delta.upserts.push((**f).clone()),
                (Some(Wire::Segment(s)), _) => delta.segment_upserts.push((**s).clone()),
                (None, ItemKind::Flag) => delta.deletes.push(key.to_owned()),
                (None, ItemKind::Segment) => delta.segment_deletes.push(key.to_owned()),
            }
        }
        Some(delta)
    }

    /// The whole environment, for rules mode.
    pub fn snapshot(&self, reason: pb::SnapshotReason) -> pb::Snapshot {
        pb::Snapshot {
            selector: Some(self.selector.into()),
            flags: self.flags.values().map(|e| (*e.wire).clone()).collect(),
            segments: self.segments.values().map(|e| (*e.wire).clone()).collect(),
            reason: reason.into(),
            values: Vec::new(),
        }
    }

    /// The flags whose evaluation the `changed` items may have altered (see
    /// [`crate::model::affected_flags`]).
    pub fn affected_flags(&self, changed: &Changed<'_>) -> BTreeSet<String> {
        crate::model::affected_flags(
            self.flags.values().map(|e| e.compiled.flag()),
            self.segments.values().map(|e| e.compiled.segment()),
            changed.flags.iter().map(|k| (*k).to_owned()),
            changed.segments.iter().map(|k| (*k).to_owned()),
        )
    }

    /// Evaluates one flag for `ctx`; `None` if there is no such flag.
    pub fn evaluate(&self, key: &str, ctx: &Context) -> Option<Evaluation<'_>> {
        Some(self.flags.get(key)?.compiled.evaluate(ctx, self))
    }

    /// Evaluates a flag into its evaluated-mode wire form.
    pub fn evaluated(&self, entry: &FlagEntry, ctx: &Context) -> (pb::EvaluatedFlag, u64) {
        let e = entry.compiled.evaluate(ctx, self);
        let hash = evaluation_hash(&e);
        let wire = pb::EvaluatedFlag {
            key: entry.wire.key.clone(),
            value: e.value.map(Into::into),
            variant: e.variant.unwrap_or_default().to_owned(),
            reason: crate::convert::reason_to_wire(e.reason).into(),
            error_code: e.error.map(|c| c.as_str().to_owned()).unwrap_or_default(),
            version: entry.wire.version,
        };
        (wire, hash)
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

    fn commit(h: &mut EnvHistory, write: Write) {
        let change = write.into_change(h.next_version());
        h.apply(change);
    }

    fn put(h: &mut EnvHistory, flag: Flag) {
        commit(h, Write::flag(flag).unwrap());
    }

    fn put_segment(h: &mut EnvHistory, json: &str) {
        commit(
            h,
            Write::segment(serde_json::from_str(json).unwrap()).unwrap(),
        );
    }

    #[test]
    fn a_write_gets_its_version_at_commit_and_reads_back_the_same() {
        let write = Write::flag(Flag::boolean("a", true, true)).unwrap();
        let change = write.into_change(7);
        let item = change.item.expect("a put");
        assert_eq!(item.version(), 7);
        let back = Item::parse(ItemKind::Flag, &item.body()).unwrap();
        let (Item::Flag(a), Item::Flag(b)) = (&item, &back) else {
            panic!("flags")
        };
        assert_eq!(a.compiled.flag(), b.compiled.flag());
        assert_eq!(a.wire, b.wire);
        assert!(Item::parse(ItemKind::Segment, "{").is_err());
    }

    #[test]
    fn versions_of_a_flag_share_compiled_rules_and_the_window_keeps_only_the_wire() {
        let costly: Flag = serde_json::from_str(
            r#"{"key": "f", "on": true, "variants": {"a": 1, "b": 2}, "off_variant": "a",
                "rules": [{"clauses": [{"attribute": "email", "op": "matches", "values": ["^(.+)@(vane|example)[.]dev$"]}],
                           "serve": {"variant": "b"}}],
                "fallthrough": {"variant": "a"}}"#,
        )
        .unwrap();
        let mut h = env(100);
        put(&mut h, costly.clone());
        let first = h.flag("f").unwrap().clone();
        let toggled = Flag {
            on: false,
            ..costly.clone()
        };
        commit(&mut h, Write::flag_after(toggled, Some(&first)).unwrap());
        let second = h.flag("f").unwrap().clone();
        assert!(
            second.compiled.shares_rules_with(&first.compiled),
            "a toggle compiles nothing"
        );
        assert_eq!(
            Arc::strong_count(&first),
            1,
            "the history no longer holds the old version"
        );
        let mut changed = costly;
        changed.rules[0].clauses[0].values = vec![serde_json::json!("^x$")];
        commit(&mut h, Write::flag_after(changed, Some(&second)).unwrap());
        assert!(
            !h.flag("f")
                .unwrap()
                .compiled
                .shares_rules_with(&second.compiled)
        );
        // The old versions still make a delta, from their wire form.
        let d = h.delta_since(0).unwrap();
        assert_eq!((d.upserts.len(), d.upserts[0].version), (1, 3));
    }

    #[test]
    fn merged_delta_keeps_the_latest_state_per_item() {
        let mut h = env(100);
        put(&mut h, Flag::boolean("a", true, true));
        put(&mut h, Flag::boolean("b", true, true));
        put(&mut h, Flag::boolean("a", false, true));
        commit(&mut h, Write::Delete(ItemKind::Flag, "b".into()));
        put_segment(&mut h, r#"{"key": "s", "included": ["u"]}"#);
        let d = h.delta_since(0).unwrap();
        assert_eq!((d.from_version, d.to_version), (0, 5));
        assert_eq!(d.upserts.len(), 1);
        assert!(!d.upserts[0].on);
        assert_eq!(d.upserts[0].version, 3);
        assert_eq!(d.deletes, vec!["b".to_owned()]);
        assert_eq!(d.segment_upserts.len(), 1);
        assert_eq!(d.segment_upserts[0].version, 5);
        let d = h.delta_since(3).unwrap();
        assert!(d.upserts.is_empty());
        assert_eq!(d.deletes, vec!["b".to_owned()]);
    }

    #[test]
    fn a_merged_span_serves_every_version_inside_it_and_leaves_the_window_whole() {
        let mut h = env(4);
        put(&mut h, Flag::boolean("a", true, true)); // 1
        put(&mut h, Flag::boolean("b", true, true)); // 2
        // Versions 3..=6 learned at once: "a" changed (last at 5), "b" deleted, "c" made at 6.
        let item = |key: &str, version: u64| {
            let mut flag = Flag::boolean(key, false, true);
            flag.version = version;
            Some(Item::flag(flag).unwrap())
        };
        h.apply_merged(
            6,
            [
                (ItemKind::Flag, "a".to_owned(), item("a", 5)),
                (ItemKind::Flag, "b".to_owned(), None),
                (ItemKind::Flag, "c".to_owned(), item("c", 6)),
            ],
        );
        assert_eq!(h.selector().version, 6);
        let keys: Vec<&str> = h.flags().map(|f| f.wire.key.as_str()).collect();
        assert_eq!(keys, ["a", "c"]);
        // From before the span, and from inside it: the whole span, each item once.
        for from in [2, 4] {
            let d = h.delta_since(from).unwrap();
            assert_eq!((d.from_version, d.to_version), (from, 6));
            let upserts: Vec<(&str, u64)> = d
                .upserts
                .iter()
                .map(|f| (f.key.as_str(), f.version))
                .collect();
            assert_eq!(upserts, [("a", 5), ("c", 6)]);
            assert_eq!(d.deletes, ["b"]);
        }
        assert!(h.delta_since(6).unwrap().upserts.is_empty());
        // One more change: the window (4) overflows, and the oldest entries go first; with the
        // span at the front, only a client at its end less one can still resume.
        put(&mut h, Flag::boolean("d", true, true)); // 7
        assert_eq!(h.oldest_resumable(), 5);
        assert!(h.delta_since(4).is_none());
        assert_eq!(h.delta_since(5).unwrap().upserts.len(), 3);
        // Then the span goes whole: no part of it is left to pass for all of it.
        put(&mut h, Flag::boolean("d", false, true)); // 8
        assert_eq!(h.oldest_resumable(), 6);
        let d = h.delta_since(6).unwrap();
        assert_eq!(d.upserts.len(), 1);
    }

    #[test]
    fn catch_up_chooses_the_cheapest_correct_frame() {
        let mut h = env(2);
        for i in 0..5 {
            put(&mut h, Flag::boolean("a", i % 2 == 0, true));
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

    #[test]
    fn a_segment_change_affects_the_flags_that_reach_it() {
        let mut h = env(100);
        put_segment(&mut h, r#"{"key": "inner", "included": ["u"]}"#);
        put_segment(
            &mut h,
            r#"{"key": "outer", "rules": [{"clauses": [{"op": "in_segment", "values": ["inner"]}]}]}"#,
        );
        let uses_outer: Flag = serde_json::from_str(
            r#"{"key": "f", "on": true, "variants": {"a": 1, "b": 2}, "off_variant": "a",
                "rules": [{"clauses": [{"op": "in_segment", "values": ["outer"]}], "serve": {"variant": "b"}}],
                "fallthrough": {"variant": "a"}}"#,
        )
        .unwrap();
        put(&mut h, uses_outer);
        put(&mut h, Flag::boolean("plain", true, true));
        let v = h.selector().version;
        put_segment(&mut h, r#"{"key": "inner", "included": ["w"]}"#);
        let changed = h.changed_since(v).unwrap();
        let affected: Vec<_> = h.affected_flags(&changed).into_iter().collect();
        assert_eq!(affected, ["f"], "through outer, not plain");
    }
}
