//! Evaluation counts a client reports to the server (docs/PROTOCOL.md 4.8): how often each flag
//! was evaluated, per variant and reason, over a window. Only counts leave the client, never a
//! context.
//!
//! The getters count on the application's threads, so counting is cheap: nothing at all while
//! the server has not asked for counts (one relaxed load), otherwise an uncontended lock of one of
//! a few shards (each thread keeps to one) and a lookup by flag key. The driver takes the window
//! when the sync machine says a summary is due ([`crate::sync::Output::Summarize`]) and hands it
//! to the machine, which frames it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use vane_proto::v1 as pb;

use crate::convert::reason_to_wire;
use crate::eval::{ErrorCode, Evaluation, Reason};

/// Distinct (flag, variant, reason) counts one window holds at most; more are dropped (and
/// counted as dropped). A server takes at most this many per summary interval from a session.
pub const MAX_SUMMARY_COUNTS: usize = 4096;

/// Shards of the counter. A thread keeps to one, so threads evaluating at once rarely meet.
const SHARDS: usize = 8;

/// Evaluations of one flag that served one variant for one reason.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tally {
    variant: Option<Box<str>>,
    reason: Reason,
    error: Option<ErrorCode>,
    count: u64,
}

/// The counts of one window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    /// When the window began, in Unix milliseconds.
    pub start_ms: u64,
    /// When it was taken, in Unix milliseconds.
    pub end_ms: u64,
    /// By flag key. Keys come from the application's code, not from the network, so a fast
    /// hash without flooding resistance is the right one.
    counts: FxHashMap<String, Vec<Tally>>,
    entries: usize,
    /// Evaluations not counted because the window was full.
    pub dropped: u64,
}

impl Window {
    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.entries == 0 && self.dropped == 0
    }

    /// Distinct (flag, variant, reason) counts held.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// The count of `flag` served `variant` for `reason`.
    pub fn count(&self, flag: &str, variant: Option<&str>, reason: Reason) -> u64 {
        self.counts.get(flag).map_or(0, |tallies| {
            tallies
                .iter()
                .filter(|t| t.variant.as_deref() == variant && t.reason == reason)
                .map(|t| t.count)
                .sum()
        })
    }

    fn add(
        &mut self,
        flag: &str,
        variant: Option<&str>,
        reason: Reason,
        error: Option<ErrorCode>,
        n: u64,
    ) {
        let same =
            |t: &Tally| t.variant.as_deref() == variant && t.reason == reason && t.error == error;
        if let Some(tallies) = self.counts.get_mut(flag)
            && let Some(t) = tallies.iter_mut().find(|t| same(t))
        {
            t.count += n;
            return;
        }
        if self.entries >= MAX_SUMMARY_COUNTS {
            self.dropped += n;
            return;
        }
        self.entries += 1;
        self.counts.entry(flag.to_owned()).or_default().push(Tally {
            variant: variant.map(Into::into),
            reason,
            error,
            count: n,
        });
    }

    fn merge(&mut self, other: Window) {
        for (flag, tallies) in other.counts {
            for t in tallies {
                self.add(&flag, t.variant.as_deref(), t.reason, t.error, t.count);
            }
        }
        self.dropped += other.dropped;
        if self.start_ms == 0 || (other.start_ms != 0 && other.start_ms < self.start_ms) {
            self.start_ms = other.start_ms;
        }
    }

    /// The window as summary frames, each of at most `max_len` encoded bytes (the server's
    /// `max_client_frame_len`): the counts are split over as many frames as they need, every one
    /// with the window's start and end.
    pub fn frames(&self, max_len: usize) -> Vec<pb::EvaluationSummary> {
        let empty = |counts| pb::EvaluationSummary {
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            counts,
        };
        // Room for the Frame and summary headers around the counts.
        let budget = max_len.saturating_sub(64).max(256);
        let mut frames = Vec::new();
        let (mut counts, mut used) = (Vec::new(), 0);
        let mut flags: Vec<_> = self.counts.iter().collect();
        flags.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (flag, tallies) in flags {
            for t in tallies {
                let count = pb::EvaluationCount {
                    flag: flag.clone(),
                    variant: t.variant.as_deref().unwrap_or_default().to_owned(),
                    reason: reason_to_wire(t.reason).into(),
                    error_code: t.error.map(|e| e.as_str().to_owned()).unwrap_or_default(),
                    count: t.count,
                };
                let len = prost::Message::encoded_len(&count) + 3;
                if used + len > budget && !counts.is_empty() {
                    frames.push(empty(std::mem::take(&mut counts)));
                    used = 0;
                }
                used += len;
                counts.push(count);
            }
        }
        if !counts.is_empty() {
            frames.push(empty(counts));
        }
        frames
    }
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard(Mutex<Window>);

/// Counts evaluations for the summaries. See the module docs.
#[derive(Debug)]
pub struct EvaluationCounts {
    on: AtomicBool,
    shards: Box<[Shard]>,
}

impl Default for EvaluationCounts {
    fn default() -> EvaluationCounts {
        EvaluationCounts {
            on: AtomicBool::new(false),
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

impl EvaluationCounts {
    /// Counts one evaluation of `flag` (nothing while counting is off).
    pub fn count(&self, flag: &str, e: &Evaluation<'_>) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        let mut window = self.shards[shard_index()].0.lock();
        window.add(flag, e.variant, e.reason, e.error, 1);
    }

    /// Whether evaluations are being counted.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Starts counting (the server asked for summaries), the window beginning at `now_ms` if
    /// none has begun; or stops, dropping what was counted (the server no longer wants it).
    pub fn set_on(&self, on: bool, now_ms: u64) {
        let was = self.on.swap(on, Ordering::Relaxed);
        if on && !was {
            for shard in &self.shards {
                let mut w = shard.0.lock();
                if w.start_ms == 0 {
                    w.start_ms = now_ms;
                }
            }
        } else if !on && was {
            for shard in &self.shards {
                *shard.0.lock() = Window::default();
            }
        }
    }

    /// Takes the window counted so far, ending at `now_ms`; the next begins there.
    pub fn take(&self, now_ms: u64) -> Window {
        let mut all = Window::default();
        for shard in &self.shards {
            let w = std::mem::replace(
                &mut *shard.0.lock(),
                Window {
                    start_ms: now_ms,
                    ..Window::default()
                },
            );
            all.merge(w);
        }
        if all.start_ms == 0 {
            all.start_ms = now_ms;
        }
        all.end_ms = now_ms;
        all
    }

    /// Puts back a window that could not be sent, so its counts go with the next one.
    pub fn restore(&self, window: Window) {
        if self.is_on() {
            self.shards[shard_index()].0.lock().merge(window);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(variant: &'static str, reason: Reason) -> Evaluation<'static> {
        Evaluation {
            value: None,
            variant: Some(variant),
            reason,
            error: None,
            rule: None,
            bucket: None,
        }
    }

    #[test]
    fn nothing_is_counted_until_the_server_asks() {
        let counts = EvaluationCounts::default();
        counts.count("f", &served("on", Reason::Static));
        counts.set_on(true, 1_000);
        counts.count("f", &served("on", Reason::Static));
        counts.count("f", &served("on", Reason::Static));
        counts.count("f", &served("off", Reason::Disabled));
        counts.count("g", &Evaluation::not_found());
        let w = counts.take(2_000);
        assert_eq!((w.start_ms, w.end_ms), (1_000, 2_000));
        assert_eq!(w.count("f", Some("on"), Reason::Static), 2);
        assert_eq!(w.count("f", Some("off"), Reason::Disabled), 1);
        assert_eq!(w.count("g", None, Reason::Error), 1);
        assert_eq!(w.len(), 3);
        let next = counts.take(3_000);
        assert!(next.is_empty());
        assert_eq!(
            next.start_ms, 2_000,
            "the next window begins where the last ended"
        );
    }

    #[test]
    fn threads_count_into_their_shards_and_a_take_merges_them() {
        let counts = std::sync::Arc::new(EvaluationCounts::default());
        counts.set_on(true, 1);
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let counts = counts.clone();
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        counts.count("f", &served("on", Reason::Split));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let w = counts.take(2);
        assert_eq!(w.count("f", Some("on"), Reason::Split), 6_000);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn a_full_window_drops_and_counts_and_a_restored_one_adds_up() {
        let counts = EvaluationCounts::default();
        counts.set_on(true, 1);
        let keys: Vec<String> = (0..MAX_SUMMARY_COUNTS + 10)
            .map(|i| format!("f{i}"))
            .collect();
        for k in &keys {
            counts.count(k, &served("on", Reason::Static));
        }
        let w = counts.take(2);
        assert_eq!(w.len(), MAX_SUMMARY_COUNTS);
        assert_eq!(w.dropped, 10);
        counts.count("f0", &served("on", Reason::Static));
        counts.restore(w);
        let again = counts.take(3);
        assert_eq!(again.count("f0", Some("on"), Reason::Static), 2);
        assert_eq!(again.start_ms, 1, "a restored window keeps its start");
    }

    #[test]
    fn a_big_window_is_split_into_frames_that_fit() {
        let counts = EvaluationCounts::default();
        counts.set_on(true, 1);
        for i in 0..2_000 {
            counts.count(
                &format!("a-rather-long-flag-name-{i}"),
                &served("on", Reason::Static),
            );
        }
        let w = counts.take(2);
        let frames = w.frames(16 * 1024);
        assert!(frames.len() > 1, "{} frames", frames.len());
        let mut total = 0;
        for f in &frames {
            let frame: pb::Frame = f.clone().into();
            assert!(prost::Message::encoded_len(&frame) <= 16 * 1024);
            assert_eq!((f.start_ms, f.end_ms), (1, 2));
            total += f.counts.len();
        }
        assert_eq!(total, 2_000);
    }

    #[test]
    fn stopping_drops_what_was_counted() {
        let counts = EvaluationCounts::default();
        counts.set_on(true, 1);
        counts.count("f", &served("on", Reason::Static));
        counts.set_on(false, 2);
        counts.set_on(true, 3);
        let w = counts.take(4);
        assert!(w.is_empty());
        assert_eq!(w.start_ms, 3);
    }
}
