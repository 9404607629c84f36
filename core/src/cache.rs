//! The offline cache: the last applied state, persisted so a cold start has flags before (or
//! without) a connection.
//!
//! One file per SDK key, mode and context key (`vane-<hash>.json` in the cache directory), so a
//! phone shared by two users keeps both. Writes are atomic (a temporary file, fsync, rename), so a
//! crash leaves the old file or the new one, never half of one. A file that cannot be read or
//! parsed is ignored with a warning: the client starts empty, as without a cache.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

#[cfg(feature = "rules")]
use crate::model::{Flag, Segment};
use crate::protocol::Selector;
use crate::state::{EvaluatedValue, FlagSet};

/// The file format version this build writes and reads.
const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct CacheDoc {
    format: u32,
    epoch: String,
    version: u64,
    /// Evaluated mode: the context (JSON text) the values were computed for.
    #[serde(default)]
    context: Option<String>,
    #[cfg(feature = "rules")]
    #[serde(default)]
    flags: Vec<Flag>,
    #[cfg(feature = "rules")]
    #[serde(default)]
    segments: Vec<Segment>,
    #[serde(default)]
    values: BTreeMap<String, EvaluatedValue>,
}

/// Where a client keeps its cache files.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    /// Hash of what every file of this client shares: the SDK key and the mode.
    base: u64,
}

/// FNV-1a 64 over `parts`, each followed by a 0 byte: stable across builds and platforms (the
/// standard library's hasher is not), and never the SDK key itself in a file name.
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(std::iter::once(&0)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

impl Cache {
    /// The cache of a client with this SDK key and mode, in `dir`.
    pub fn new(dir: impl Into<PathBuf>, sdk_key: &str, evaluated: bool) -> Cache {
        let mode: &[u8] = if evaluated { b"evaluated" } else { b"rules" };
        Cache {
            dir: dir.into(),
            base: stable_hash(&[sdk_key.as_bytes(), mode]),
        }
    }

    /// The file for a context's targeting key (evaluated mode), or the one file (rules mode).
    pub fn file(&self, context_key: Option<&str>) -> PathBuf {
        let key = context_key.unwrap_or("");
        let h = stable_hash(&[&self.base.to_le_bytes(), key.as_bytes()]);
        self.dir.join(format!("vane-{h:016x}.json"))
    }

    /// Loads the state cached for `context_key`, with the context (JSON text) it was computed
    /// for. `None` if there is none or it is unreadable (logged).
    pub fn load(&self, context_key: Option<&str>) -> Option<(FlagSet, Option<String>)> {
        let path = self.file(context_key);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "ignoring unreadable flag cache");
                return None;
            }
        };
        match parse(&text) {
            Ok(loaded) => Some(loaded),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "ignoring corrupt flag cache");
                None
            }
        }
    }

    /// Persists `flags` (computed for `context`, in evaluated mode) atomically.
    pub fn save(&self, flags: &FlagSet, context: Option<&str>) -> std::io::Result<()> {
        let Some(selector) = flags.selector() else {
            return Ok(()); // nothing applied yet
        };
        #[cfg(feature = "rules")]
        let (flag_list, segments) = flags.cached_definitions();
        let doc = CacheDoc {
            format: FORMAT,
            epoch: selector.epoch_hex(),
            version: selector.version,
            context: context.map(str::to_owned),
            #[cfg(feature = "rules")]
            flags: flag_list,
            #[cfg(feature = "rules")]
            segments,
            values: flags.cached_values(),
        };
        let key = context
            .and_then(|c| crate::eval::Context::parse(c).ok())
            .and_then(|c| c.key().map(str::to_owned));
        let path = self.file(key.as_deref());
        std::fs::create_dir_all(&self.dir)?;
        write_atomically(
            &path,
            &serde_json::to_vec(&doc).map_err(std::io::Error::other)?,
        )
    }
}

fn parse(text: &str) -> Result<(FlagSet, Option<String>), String> {
    let doc: CacheDoc = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if doc.format != FORMAT {
        return Err(format!("format {} (this build reads {FORMAT})", doc.format));
    }
    let epoch = u64::from_str_radix(&doc.epoch, 16).map_err(|e| format!("epoch: {e}"))?;
    let selector = Selector {
        epoch,
        version: doc.version,
    };
    #[cfg(feature = "rules")]
    let set = FlagSet::from_cached(Some(selector), doc.flags, doc.segments, doc.values)?;
    #[cfg(not(feature = "rules"))]
    let set = FlagSet::from_cached(Some(selector), Vec::new(), Vec::new(), doc.values)?;
    Ok((set, doc.context))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{Context, Reason};
    use vane_proto::v1 as pb;

    fn evaluated_set() -> FlagSet {
        let mut set = FlagSet::default();
        set.replace(pb::Snapshot {
            selector: Some(pb::Selector {
                epoch: 0xab,
                version: 7,
            }),
            values: vec![pb::EvaluatedFlag {
                key: "f".into(),
                value: Some(pb::Value {
                    kind: Some(pb::value::Kind::Bool(true)),
                }),
                variant: "on".into(),
                reason: pb::Reason::TargetingMatch.into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .unwrap();
        set
    }

    #[test]
    fn a_saved_state_loads_back_marked_cached() {
        let dir = tempfile_dir();
        let cache = Cache::new(&dir, "vane_mob_x", true);
        let ctx = r#"{"key":"u1"}"#;
        cache.save(&evaluated_set(), Some(ctx)).unwrap();
        let (set, context) = cache.load(Some("u1")).expect("cached");
        assert_eq!(context.as_deref(), Some(ctx));
        assert_eq!(
            set.selector(),
            Some(Selector {
                epoch: 0xab,
                version: 7
            })
        );
        let e = set.evaluate("f", &Context::default());
        assert_eq!((e.variant, e.reason), (Some("on"), Reason::Cached));
        assert!(cache.load(Some("u2")).is_none(), "one file per context key");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_corrupt_file_is_ignored() {
        let dir = tempfile_dir();
        let cache = Cache::new(&dir, "k", true);
        std::fs::write(cache.file(Some("u1")), b"{\"format\": 1, \"epoch\": ").unwrap();
        assert!(cache.load(Some("u1")).is_none());
        std::fs::write(
            cache.file(Some("u1")),
            b"{\"format\": 99, \"epoch\": \"1\", \"version\": 1}",
        )
        .unwrap();
        assert!(
            cache.load(Some("u1")).is_none(),
            "a newer format is not misread"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn file_names_are_stable_and_do_not_contain_the_key() {
        let cache = Cache::new("/c", "vane_mob_secret", true);
        let name = cache.file(Some("u1")).display().to_string();
        assert!(!name.contains("secret"));
        assert_eq!(
            name,
            Cache::new("/c", "vane_mob_secret", true)
                .file(Some("u1"))
                .display()
                .to_string()
        );
        assert_ne!(
            name,
            Cache::new("/c", "vane_mob_secret", false)
                .file(Some("u1"))
                .display()
                .to_string()
        );
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "vane-cache-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
