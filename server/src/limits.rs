//! Limits per source address, so one host cannot take what all the others need: how often it
//! may open protocol connections (a token bucket), how many of its handshakes may be in
//! progress at once, and how many wrong admin tokens it may present. Whatever goes over is
//! answered with `RATE_LIMITED` (protocol) or `429` (HTTP) and when to come back; what a flood
//! costs is bounded, the tables included ([`MAX_SOURCES`]).
//!
//! A source is an IPv4 address or an IPv6 /64 (what one host usually holds). Operators whose
//! clients all arrive through one proxy address turn the connection rate off (`--connect-rate 0`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Sources a table tracks at most. Past it, idle sources are forgotten; if none is idle, a new
/// source is let through untracked (a flood from this many hosts is beyond what per-source
/// limits are for) and that is logged.
pub const MAX_SOURCES: usize = 65_536;

/// Where a connection or request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// An IPv4 address (also when it arrived mapped into IPv6).
    V4(u32),
    /// The /64 prefix of an IPv6 address.
    V6(u64),
}

impl Source {
    /// The source of a peer address.
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(u32::from(v4)),
                None => Source::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// A token bucket's shape: `burst` tokens, refilled at `per_second`. A rate of zero is no limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Tokens the bucket holds when full.
    pub burst: f64,
}

impl Rate {
    /// No limit.
    pub const OFF: Rate = Rate {
        per_second: 0.0,
        burst: 0.0,
    };

    fn is_off(&self) -> bool {
        self.per_second <= 0.0 || self.burst < 1.0
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per source.
#[derive(Debug)]
pub struct Buckets {
    rate: Rate,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    buckets: HashMap<Source, Bucket>,
    /// While the table is full of busy sources, it is not searched again before this.
    full_until: Option<Instant>,
}

impl Buckets {
    /// Buckets of this shape.
    pub fn new(rate: Rate) -> Buckets {
        Buckets {
            rate,
            table: Mutex::new(Table::default()),
        }
    }

    /// Takes a token for `source`: `Ok`, or how long until one will be there.
    pub fn take(&self, source: Source, now: Instant) -> Result<(), Duration> {
        self.with(source, now, true)
    }

    /// Whether `source` has a token, taking none: `Ok`, or how long until it has one.
    pub fn check(&self, source: Source, now: Instant) -> Result<(), Duration> {
        self.with(source, now, false)
    }

    /// Sources tracked now.
    pub fn len(&self) -> usize {
        self.table.lock().buckets.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn with(&self, source: Source, now: Instant, take: bool) -> Result<(), Duration> {
        let rate = self.rate;
        if rate.is_off() {
            return Ok(());
        }
        let refill = |b: &Bucket| {
            let secs = now.saturating_duration_since(b.at).as_secs_f64();
            (b.tokens + secs * rate.per_second).min(rate.burst)
        };
        let mut table = self.table.lock();
        let known = table.buckets.contains_key(&source);
        if !known && !take {
            // A source never seen has its whole burst (and a check must not fill the table:
            // the addresses of unvalidated QUIC attempts may be spoofed).
            return Ok(());
        }
        if !known && table.buckets.len() >= MAX_SOURCES {
            if table.full_until.is_some_and(|t| now < t) {
                return Ok(());
            }
            // Forget the sources whose buckets have refilled: they are as if never seen.
            table.buckets.retain(|_, b| refill(b) < rate.burst);
            if table.buckets.len() >= MAX_SOURCES {
                table.full_until = Some(now + Duration::from_secs(1));
                tracing::warn!(
                    sources = MAX_SOURCES,
                    "rate-limit table full of busy sources; new sources pass unlimited for 1 s"
                );
                return Ok(());
            }
        }
        let bucket = table.buckets.entry(source).or_insert(Bucket {
            tokens: rate.burst,
            at: now,
        });
        bucket.tokens = refill(bucket);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            return Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / rate.per_second,
            ));
        }
        if take {
            bucket.tokens -= 1.0;
        }
        Ok(())
    }
}

/// Handshakes in progress, per source and in all.
#[derive(Debug)]
pub struct Handshakes {
    per_source: usize,
    table: Mutex<HashMap<Source, usize>>,
    total: AtomicUsize,
}

/// A handshake in progress; it stops counting when dropped.
#[derive(Debug)]
pub struct Handshake {
    of: Arc<Handshakes>,
    source: Source,
}

impl Handshakes {
    /// At most `per_source` in progress for one source (0: no limit).
    pub fn new(per_source: usize) -> Arc<Handshakes> {
        Arc::new(Handshakes {
            per_source,
            table: Mutex::new(HashMap::new()),
            total: AtomicUsize::new(0),
        })
    }

    /// Counts a new handshake from `source`, unless that source already has its limit.
    pub fn begin(self: &Arc<Handshakes>, source: Source) -> Option<Handshake> {
        let mut table = self.table.lock();
        let n = table.entry(source).or_insert(0);
        if self.per_source > 0 && *n >= self.per_source {
            return None;
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(Handshake {
            of: self.clone(),
            source,
        })
    }

    /// Handshakes in progress now, from every source.
    pub fn in_progress(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let mut table = self.of.table.lock();
        if let Some(n) = table.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                table.remove(&self.source);
            }
        }
        self.of.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The limits' settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitsConfig {
    /// Protocol connection attempts per source. Over it, a TCP client gets
    /// `Error(RATE_LIMITED, retry_after)` once its TLS handshake is done; a QUIC client whose
    /// address is not validated gets a Retry first (which costs the server nothing), and the
    /// same Error once it comes back validated.
    pub connects: Rate,
    /// Handshakes one source may have in progress; over it, a TCP connection is closed before
    /// TLS and a QUIC attempt refused. 0: no limit.
    pub handshakes_per_source: usize,
    /// Handshakes in progress (TCP and QUIC, all sources) above which a QUIC attempt from an
    /// address not yet validated is sent a Retry, so that a flood of spoofed Initial packets
    /// costs one stateless answer each. 0: always.
    pub quic_retry_above: usize,
    /// Wrong admin tokens per source. Once the bucket is empty, every admin request from that
    /// source is answered `429` with `Retry-After`, before its token is looked at.
    pub admin_failures: Rate,
    /// SDK requests over HTTP (OFREP, snapshot polling) per source; over it, `429` with
    /// `Retry-After`. Off by default: one backend host may rightly evaluate thousands of
    /// times a second (`--sdk-request-rate`).
    pub sdk_requests: Rate,
}

impl Default for LimitsConfig {
    fn default() -> LimitsConfig {
        LimitsConfig {
            // Generous: a whole office behind one NAT reconnecting at once after a restart.
            connects: Rate {
                per_second: 200.0,
                burst: 2_000.0,
            },
            handshakes_per_source: 2_000,
            quic_retry_above: 256,
            // Twenty wrong tokens, then one more every 6 s.
            admin_failures: Rate {
                per_second: 1.0 / 6.0,
                burst: 20.0,
            },
            sdk_requests: Rate::OFF,
        }
    }
}

/// Why an attempt was refused, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Over the connection rate: answered `RATE_LIMITED`.
    ConnectRate,
    /// Over the handshakes in progress of its source: closed.
    Handshakes,
    /// Over the connection limit of the server: closed or refused.
    Capacity,
    /// An admin request from a source over its failures: `429`.
    AdminFailures,
    /// An SDK request over HTTP from a source over its rate: `429`.
    SdkRequests,
}

impl Refused {
    /// Every reason, for the metrics.
    pub const ALL: [Refused; 5] = [
        Refused::ConnectRate,
        Refused::Handshakes,
        Refused::Capacity,
        Refused::AdminFailures,
        Refused::SdkRequests,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::ConnectRate => "connect_rate",
            Refused::Handshakes => "handshakes",
            Refused::Capacity => "capacity",
            Refused::AdminFailures => "admin_failures",
            Refused::SdkRequests => "sdk_requests",
        }
    }
}

/// The limits the listeners and the admin API share, and what they refused.
#[derive(Debug)]
pub struct Limits {
    /// The settings.
    pub config: LimitsConfig,
    /// Protocol connection attempts.
    pub connects: Buckets,
    /// Protocol handshakes in progress.
    pub handshakes: Arc<Handshakes>,
    /// Wrong admin tokens.
    pub admin_failures: Buckets,
    /// SDK requests over HTTP.
    pub sdk_requests: Buckets,
    refused: [AtomicU64; 5],
    /// When each reason was last logged at WARN, and how many since.
    logged: Mutex<[(Option<Instant>, u64); 5]>,
    /// QUIC attempts sent a Retry.
    retries: AtomicU64,
}

impl Limits {
    /// Limits with these settings.
    pub fn new(config: LimitsConfig) -> Arc<Limits> {
        Arc::new(Limits {
            config,
            connects: Buckets::new(config.connects),
            handshakes: Handshakes::new(config.handshakes_per_source),
            admin_failures: Buckets::new(config.admin_failures),
            sdk_requests: Buckets::new(config.sdk_requests),
            refused: Default::default(),
            logged: Mutex::new([(None, 0); 5]),
            retries: AtomicU64::new(0),
        })
    }

    /// Counts a refusal of `peer`, and logs it: every one at DEBUG, and at WARN at most once a
    /// second per reason, with how many there were since (a flood does not flood the log).
    pub fn refused(&self, why: Refused, peer: SocketAddr) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, reason = why.as_str(), "refused");
        let now = Instant::now();
        let mut logged = self.logged.lock();
        let (last, since) = &mut logged[why as usize];
        *since += 1;
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            tracing::warn!(%peer, reason = why.as_str(), refused = *since, "refusing connections or requests over the limits (counted since the last such line)");
            *last = Some(now);
            *since = 0;
        }
    }

    /// Refusals so far, by reason.
    pub fn refusals(&self) -> [(Refused, u64); 5] {
        Refused::ALL.map(|r| (r, self.refused[r as usize].load(Ordering::Relaxed)))
    }

    /// Counts a QUIC Retry.
    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// QUIC Retries so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
}

/// What a limited client is told to wait: the time until it may try again, plus up to a
/// second more at random, so that clients refused together do not come back together.
pub fn retry_after(wait: Duration) -> Duration {
    wait + Duration::from_millis(rand::random_range(0..1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(n: u8) -> Source {
        Source::of(IpAddr::from([10, 0, 0, n]))
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let b = Buckets::new(Rate {
            per_second: 10.0,
            burst: 3.0,
        });
        let t = Instant::now();
        for _ in 0..3 {
            assert_eq!(b.take(v4(1), t), Ok(()));
        }
        let wait = b.take(v4(1), t).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // Another source is not affected.
        assert_eq!(b.take(v4(2), t), Ok(()));
        // A token comes back after a tenth of a second; no more than the burst ever.
        assert_eq!(b.take(v4(1), t + Duration::from_millis(100)), Ok(()));
        assert!(b.take(v4(1), t + Duration::from_millis(100)).is_err());
        let later = t + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.take(v4(1), later), Ok(()));
        }
        assert!(b.take(v4(1), later).is_err());
        assert!(b.check(v4(1), later).is_err(), "check sees it empty");
    }

    #[test]
    fn check_takes_nothing_and_off_is_no_limit() {
        let b = Buckets::new(Rate {
            per_second: 1.0,
            burst: 1.0,
        });
        let t = Instant::now();
        for _ in 0..10 {
            assert_eq!(b.check(v4(1), t), Ok(()));
        }
        assert!(b.is_empty(), "a check of an unknown source tracks nothing");
        let off = Buckets::new(Rate::OFF);
        for _ in 0..10_000 {
            assert_eq!(off.take(v4(1), t), Ok(()));
        }
        assert!(off.is_empty(), "no limit, nothing tracked");
    }

    #[test]
    fn an_ipv6_host_is_its_64_and_a_mapped_ipv4_is_itself() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(Source::of(mapped), v4(1));
    }

    #[test]
    fn the_table_stays_bounded_and_forgets_idle_sources_first() {
        let b = Buckets::new(Rate {
            per_second: 1.0,
            burst: 2.0,
        });
        let t = Instant::now();
        for i in 0..MAX_SOURCES as u32 {
            b.take(Source::V4(i), t).unwrap();
        }
        assert_eq!(b.len(), MAX_SOURCES);
        // All busy: a new source passes untracked.
        assert_eq!(b.take(Source::V4(u32::MAX), t), Ok(()));
        assert_eq!(b.len(), MAX_SOURCES);
        // Once they have refilled they are forgotten, and the newcomer is tracked.
        let later = t + Duration::from_secs(5);
        assert_eq!(b.take(Source::V4(u32::MAX), later), Ok(()));
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn handshakes_count_per_source_until_dropped() {
        let h = Handshakes::new(2);
        let a = h.begin(v4(1)).unwrap();
        let _b = h.begin(v4(1)).unwrap();
        assert!(h.begin(v4(1)).is_none());
        let _c = h.begin(v4(2)).unwrap();
        assert_eq!(h.in_progress(), 3);
        drop(a);
        assert!(h.begin(v4(1)).is_some());
        assert_eq!(h.in_progress(), 2, "the one just begun was dropped at once");
    }
}
