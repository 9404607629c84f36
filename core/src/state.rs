//! The client's copy of an environment: the flags it holds and the selector they are at.
//! Applying a snapshot or delta reports which keys changed, which is what listeners receive.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use vane_proto::v1 as pb;

use crate::model::{Flag, WireFlagError};

/// A position in an environment's history (see `Selector` in the protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Selector {
    /// Changes when history is discontinuous.
    pub epoch: u64,
    /// Rises by one with every committed change.
    pub version: u64,
}

impl Selector {
    /// The epoch as 16 hex digits, as shown in logs and JSON.
    pub fn epoch_hex(&self) -> String {
        format!("{:016x}", self.epoch)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}:{}", self.epoch, self.version)
    }
}

impl From<pb::Selector> for Selector {
    fn from(s: pb::Selector) -> Self {
        Selector {
            epoch: s.epoch,
            version: s.version,
        }
    }
}

impl From<Selector> for pb::Selector {
    fn from(s: Selector) -> Self {
        pb::Selector {
            epoch: s.epoch,
            version: s.version,
        }
    }
}

/// The flags a client holds, at a selector. Cheap to clone: flags are shared.
#[derive(Debug, Clone, Default)]
pub struct FlagSet {
    selector: Option<Selector>,
    flags: HashMap<String, Arc<Flag>>,
}

impl FlagSet {
    /// Where this set stands; `None` before the first snapshot.
    pub fn selector(&self) -> Option<Selector> {
        self.selector
    }

    /// The flag with this key.
    pub fn get(&self, key: &str) -> Option<&Flag> {
        self.flags.get(key).map(|f| &**f)
    }

    /// Every flag, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Flag> {
        self.flags.values().map(|f| &**f)
    }

    /// How many flags.
    pub fn len(&self) -> usize {
        self.flags.len()
    }

    /// No flags at all.
    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    /// Replaces everything with `snapshot`; returns the keys that were added, removed or changed.
    pub(crate) fn replace(&mut self, snapshot: pb::Snapshot) -> Result<Vec<String>, WireFlagError> {
        let selector = snapshot.selector.map(Selector::from);
        let mut next = HashMap::with_capacity(snapshot.flags.len());
        for wire in snapshot.flags {
            let flag = Flag::try_from(wire)?;
            next.insert(flag.key.clone(), Arc::new(flag));
        }
        let mut changed: Vec<String> = next
            .iter()
            .filter(|(k, f)| self.flags.get(*k) != Some(*f))
            .map(|(k, _)| k.clone())
            .chain(
                self.flags
                    .keys()
                    .filter(|k| !next.contains_key(*k))
                    .cloned(),
            )
            .collect();
        changed.sort_unstable();
        self.flags = next;
        self.selector = selector;
        Ok(changed)
    }

    /// Applies `delta`, which the caller has checked starts at this set's version.
    pub(crate) fn apply(&mut self, delta: pb::Delta) -> Result<Vec<String>, WireFlagError> {
        // Convert first so a bad flag leaves the set untouched.
        let upserts = delta
            .upserts
            .into_iter()
            .map(Flag::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let mut changed = Vec::with_capacity(upserts.len() + delta.deletes.len());
        for flag in upserts {
            changed.push(flag.key.clone());
            self.flags.insert(flag.key.clone(), Arc::new(flag));
        }
        for key in delta.deletes {
            if self.flags.remove(&key).is_some() {
                changed.push(key);
            }
        }
        changed.sort_unstable();
        changed.dedup();
        self.selector = Some(Selector {
            epoch: delta.epoch,
            version: delta.to_version,
        });
        Ok(changed)
    }
}
