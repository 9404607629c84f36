//! Vane's measuring instruments: the [`load`] engine behind `vane-load`, a server the other bench
//! tools start for themselves ([`spawned`]), a counting allocator that proves a code path
//! allocates nothing, and the flags the evaluation bench measures.

pub mod load;
pub mod spawned;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

/// Wraps the system allocator and counts allocations. Install it in a bench binary with
/// `#[global_allocator]`, then compare [`CountingAllocator::count`] around the code measured.
#[derive(Debug)]
pub struct CountingAllocator {
    allocations: AtomicU64,
}

impl CountingAllocator {
    /// A counter at zero.
    pub const fn new() -> Self {
        CountingAllocator {
            allocations: AtomicU64::new(0),
        }
    }

    /// Allocations so far (reallocations count too).
    pub fn count(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }
}

impl Default for CountingAllocator {
    fn default() -> Self {
        Self::new()
    }
}

// The one unsafe block in the workspace: a GlobalAlloc must be an unsafe impl. It only forwards
// to the system allocator and counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged; the caller upholds GlobalAlloc's contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc`/`realloc` above, i.e. from System, with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for dealloc; System.realloc's contract is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// A boolean flag with no rules.
pub fn bool_flag() -> Value {
    json!({"key": "plain", "on": true, "variants": {"on": true, "off": false},
           "off_variant": "off", "fallthrough": {"variant": "on"}})
}

/// One rule (country in a list) serving a 30/70 rollout.
pub fn one_rule_rollout_flag() -> Value {
    json!({"key": "checkout", "on": true, "variants": {"a": "A", "b": "B"}, "off_variant": "b",
           "rules": [{"clauses": [{"attribute": "country", "op": "in", "values": ["de", "at", "ch"]}],
                      "serve": {"rollout": {"variants": [{"variant": "a", "weight": 30000}, {"variant": "b", "weight": 70000}]}}}],
           "fallthrough": {"variant": "b"}})
}

/// Nine rules that do not match, then one on a segment of `members` keys.
pub fn ten_rules_flag() -> Value {
    let mut rules: Vec<Value> = (0..9)
        .map(|i| {
            json!({"clauses": [{"attribute": "plan", "op": "in", "values": [format!("plan-{i}")]},
                               {"attribute": "app.version", "op": "semver_gt", "values": ["2.0.0"]}],
                   "serve": {"variant": "a"}})
        })
        .collect();
    rules.push(
        json!({"clauses": [{"op": "in_segment", "values": ["beta"]}], "serve": {"variant": "b"}}),
    );
    json!({"key": "big", "on": true, "variants": {"a": "A", "b": "B", "c": "C"}, "off_variant": "c",
           "rules": rules, "fallthrough": {"variant": "c"}})
}

/// A segment listing `members` keys `user-0` … explicitly.
pub fn big_segment(members: usize) -> Value {
    let included: Vec<String> = (0..members).map(|i| format!("user-{i}")).collect();
    json!({"key": "beta", "included": included})
}
