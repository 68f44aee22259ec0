//! Rate limits and the content filter: the checks that protect the server
//! and its users from floods and from unwanted content.
//!
//! Rate limits are token buckets (GCRA: `governor`'s keyed limiters for
//! the shared buckets, a 24-byte [`Bucket`] of our own for a connection's
//! two): a bucket holds
//! `burst` tokens and refills at `per_second`; a request takes one token,
//! or is refused with the truthful time until one is available. Buckets are
//! per connection (all requests; messages), per user (messages, across all
//! of the user's connections), and per IP and per account name (`register`,
//! `login`, `resume`), so password guessing is slow whichever it varies.
//! A connection refused `abuse_refusals` times within `abuse_window` is
//! closed (code 4029).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use confab_proto::ErrorCode;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use regex::{RegexSet, RegexSetBuilder};

use crate::error::ChatError;

/// A token bucket: `burst` at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

impl Rate {
    pub const fn new(per_second: f64, burst: u32) -> Rate {
        Rate { per_second, burst }
    }

    /// `n` at once, and `n` an hour after that.
    pub fn per_hour(n: u32) -> Rate {
        Rate::new(f64::from(n) / 3600.0, n)
    }

    /// (the period of one token, the burst), or `None` for a rate that
    /// limits nothing: for buckets kept elsewhere (a broker's).
    pub fn gcra(self) -> Option<(Duration, u32)> {
        let quota = self.quota()?;
        Some((quota.replenish_interval(), quota.burst_size().get()))
    }

    /// The bucket, or `None` for a rate that limits nothing.
    fn quota(self) -> Option<Quota> {
        let burst = NonZeroU32::new(self.burst)?;
        if !(self.per_second > 0.0 && self.per_second.is_finite()) {
            return None;
        }
        let period = Duration::from_secs_f64(1.0 / self.per_second).max(Duration::from_nanos(1));
        Some(Quota::with_period(period)?.allow_burst(burst))
    }
}

/// Every rate limit; `None` turns one off.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimits {
    /// All requests of one connection but `ping`.
    pub requests: Option<Rate>,
    /// `send` and `dm` of one connection.
    pub messages: Option<Rate>,
    /// `send` and `dm` of one user, all connections together.
    pub user_messages: Option<Rate>,
    /// `register`, `login` and `resume` from one IP address.
    pub auth_per_ip: Option<Rate>,
    /// `register` and `login` naming one account.
    pub auth_per_account: Option<Rate>,
    /// Rooms one user creates (a `join` of a room that does not exist).
    pub room_creations: Option<Rate>,
    /// Refusals within `abuse_window` that close the connection (4029).
    pub abuse_refusals: u32,
    pub abuse_window: Duration,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            requests: Some(Rate::new(50.0, 100)),
            messages: Some(Rate::new(10.0, 30)),
            user_messages: Some(Rate::new(20.0, 60)),
            auth_per_ip: Some(Rate::new(1.0, 20)),
            auth_per_account: Some(Rate::new(0.2, 5)),
            room_creations: Some(Rate::per_hour(20)),
            abuse_refusals: 20,
            abuse_window: Duration::from_secs(10),
        }
    }
}

impl RateLimits {
    /// No limits at all (benchmarks, tests of other things).
    pub fn off() -> Self {
        RateLimits {
            requests: None,
            messages: None,
            user_messages: None,
            auth_per_ip: None,
            auth_per_account: None,
            room_creations: None,
            abuse_refusals: 0,
            abuse_window: Duration::ZERO,
        }
    }
}

/// The limiters shared by every connection of one server.
pub(crate) struct SharedLimiters {
    clock: DefaultClock,
    user_messages: Option<DefaultKeyedRateLimiter<String>>,
    auth_per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    auth_per_account: Option<DefaultKeyedRateLimiter<String>>,
    room_creations: Option<DefaultKeyedRateLimiter<String>>,
}

impl SharedLimiters {
    pub(crate) fn new(limits: &RateLimits) -> Self {
        fn keyed<K: std::hash::Hash + Eq + Clone>(
            rate: Option<Rate>,
        ) -> Option<DefaultKeyedRateLimiter<K>> {
            rate.and_then(Rate::quota).map(governor::RateLimiter::keyed)
        }
        SharedLimiters {
            clock: DefaultClock::default(),
            user_messages: keyed(limits.user_messages),
            auth_per_ip: keyed(limits.auth_per_ip),
            auth_per_account: keyed(limits.auth_per_account),
            room_creations: keyed(limits.room_creations),
        }
    }

    /// Forget buckets that are full again (keyed limiters grow with keys).
    pub(crate) fn forget_idle(&self) {
        if let Some(l) = &self.user_messages {
            l.retain_recent();
        }
        if let Some(l) = &self.auth_per_ip {
            l.retain_recent();
        }
        if let Some(l) = &self.auth_per_account {
            l.retain_recent();
        }
        if let Some(l) = &self.room_creations {
            l.retain_recent();
        }
    }

    pub(crate) fn room_creation(&self, user_key: &str) -> Result<(), Duration> {
        keyed_check(&self.clock, &self.room_creations, &user_key.to_owned())
    }

    pub(crate) fn user_message(&self, user_key: &str) -> Result<(), Duration> {
        keyed_check(&self.clock, &self.user_messages, &user_key.to_owned())
    }

    pub(crate) fn auth(&self, ip: Option<IpAddr>, account: Option<&str>) -> Result<(), Duration> {
        if let Some(ip) = ip {
            keyed_check(&self.clock, &self.auth_per_ip, &ip)?;
        }
        if let Some(account) = account {
            keyed_check(&self.clock, &self.auth_per_account, &account.to_owned())?;
        }
        Ok(())
    }
}

fn keyed_check<K: std::hash::Hash + Eq + Clone>(
    clock: &DefaultClock,
    limiter: &Option<DefaultKeyedRateLimiter<K>>,
    key: &K,
) -> Result<(), Duration> {
    match limiter {
        Some(l) => l
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(clock.now())),
        None => Ok(()),
    }
}

/// One connection's buckets and its record of refusals.
pub(crate) struct ConnLimiter {
    /// When the buckets started: their times count from here.
    start: Instant,
    requests: Option<Bucket>,
    messages: Option<Bucket>,
    abuse_refusals: u32,
    abuse_window: Duration,
    refusals: u32,
    window_start: Instant,
}

/// The outcome of a refusal.
pub(crate) enum Refusal {
    /// Tell the client when to retry.
    Retry(ChatError),
    /// Tell the client, then close the connection: it keeps flooding.
    Abuse(ChatError),
}

/// One connection's bucket, GCRA as `governor` does it, in 24 bytes (a
/// connection has two, and an idle connection should cost little): the
/// theoretical arrival time of the next token, in nanoseconds from the
/// limiter's start. A request is allowed while that time is at most
/// `burst - 1` periods ahead of now.
#[derive(Debug)]
struct Bucket {
    period: u64,
    tolerance: u64,
    tat: u64,
}

impl Bucket {
    fn new(rate: Option<Rate>) -> Option<Bucket> {
        let (period, burst) = rate?.gcra()?;
        let period = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX).max(1);
        Some(Bucket {
            period,
            tolerance: period.saturating_mul(u64::from(burst) - 1),
            tat: 0,
        })
    }

    /// Take a token at `now`, or say how long until one is there.
    fn take(&mut self, now: u64) -> Result<(), Duration> {
        let tat = self.tat.max(now);
        let ahead = tat - now;
        if ahead > self.tolerance {
            return Err(Duration::from_nanos(ahead - self.tolerance));
        }
        self.tat = tat.saturating_add(self.period);
        Ok(())
    }
}

impl ConnLimiter {
    pub(crate) fn new(limits: &RateLimits) -> Self {
        ConnLimiter {
            start: Instant::now(),
            requests: Bucket::new(limits.requests),
            messages: Bucket::new(limits.messages),
            abuse_refusals: limits.abuse_refusals,
            abuse_window: limits.abuse_window,
            refusals: 0,
            window_start: Instant::now(),
        }
    }

    pub(crate) fn request(&mut self) -> Result<(), Duration> {
        let now = self.now();
        self.requests.as_mut().map_or(Ok(()), |b| b.take(now))
    }

    pub(crate) fn message(&mut self) -> Result<(), Duration> {
        let now = self.now();
        self.messages.as_mut().map_or(Ok(()), |b| b.take(now))
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Record a refusal that waits `wait`, and say what the client hears.
    pub(crate) fn refuse(&mut self, wait: Duration, what: &str) -> Refusal {
        let now = Instant::now();
        if now.duration_since(self.window_start) > self.abuse_window {
            self.window_start = now;
            self.refusals = 0;
        }
        self.refusals += 1;
        // Round up: retrying after `retry_after_ms` must succeed.
        let ms = (wait.as_micros().div_ceil(1000)).max(1) as u64;
        let mut error = ChatError::new(
            ErrorCode::RateLimited,
            format!("too many {what}; retry in {ms} ms"),
        );
        error.retry_after_ms = Some(ms);
        if self.abuse_refusals > 0 && self.refusals >= self.abuse_refusals {
            error.message = format!("too many {what}, too often: disconnecting");
            // No retry on this connection: it is closing.
            error.retry_after_ms = None;
            return Refusal::Abuse(error);
        }
        Refusal::Retry(error)
    }
}

/// One filter rule: a regular expression (matched without regard to case)
/// and the reason given when it refuses a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterRule {
    pub pattern: String,
    pub reason: String,
}

/// Refuses message bodies and topics that match any rule.
#[derive(Debug, Clone, Default)]
pub struct ContentFilter {
    set: Option<Arc<RegexSet>>,
    reasons: Arc<[String]>,
}

impl ContentFilter {
    /// Compile the rules; an invalid pattern is an error naming it.
    pub fn new(rules: &[FilterRule]) -> Result<ContentFilter, String> {
        if rules.is_empty() {
            return Ok(ContentFilter::default());
        }
        let set = RegexSetBuilder::new(rules.iter().map(|r| &r.pattern))
            .case_insensitive(true)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| format!("invalid filter pattern: {e}"))?;
        Ok(ContentFilter {
            set: Some(Arc::new(set)),
            reasons: rules.iter().map(|r| r.reason.clone()).collect(),
        })
    }

    /// `forbidden`, with the first matching rule's reason.
    pub fn check(&self, text: &str) -> Result<(), ChatError> {
        let Some(set) = &self.set else { return Ok(()) };
        match set.matches(text).iter().next() {
            Some(i) => Err(ChatError::forbidden(format!(
                "refused by the content filter: {}",
                self.reasons[i]
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_refusals_with_the_wait() {
        let mut limits = RateLimits::off();
        limits.messages = Some(Rate::new(2.0, 3));
        limits.abuse_refusals = 3;
        limits.abuse_window = Duration::from_secs(60);
        let mut conn = ConnLimiter::new(&limits);
        for _ in 0..3 {
            assert!(conn.message().is_ok());
        }
        let wait = conn.message().unwrap_err();
        assert!(conn.message().is_err(), "a refusal takes no token");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(conn.request().is_ok(), "requests are not limited here");
        match conn.refuse(wait, "messages") {
            Refusal::Retry(e) => {
                assert_eq!(e.code, ErrorCode::RateLimited);
                assert!((1..=500).contains(&e.retry_after_ms.unwrap()));
            }
            Refusal::Abuse(_) => panic!("too early"),
        }
        assert!(matches!(conn.refuse(wait, "messages"), Refusal::Retry(_)));
        match conn.refuse(wait, "messages") {
            Refusal::Abuse(e) => assert_eq!(e.retry_after_ms, None),
            Refusal::Retry(_) => panic!("the third refusal is abuse"),
        }
    }

    #[test]
    fn buckets_refill_at_their_rate() {
        let mut b = Bucket::new(Some(Rate::new(10.0, 2))).unwrap();
        let ms = |n: u64| n * 1_000_000;
        assert!(b.take(0).is_ok());
        assert!(b.take(0).is_ok());
        assert_eq!(
            b.take(0),
            Err(Duration::from_millis(100)),
            "the truthful wait"
        );
        assert_eq!(b.take(ms(60)), Err(Duration::from_millis(40)));
        assert!(b.take(ms(100)).is_ok(), "one token every 100 ms");
        assert!(b.take(ms(100)).is_err());
        assert!(b.take(ms(1000)).is_ok(), "a full bucket after a pause…");
        assert!(b.take(ms(1000)).is_ok());
        assert!(b.take(ms(1000)).is_err(), "…holds the burst, no more");
    }

    #[test]
    fn zero_rates_limit_nothing() {
        assert!(Rate::new(0.0, 5).quota().is_none());
        assert!(Rate::new(5.0, 0).quota().is_none());
        let shared = SharedLimiters::new(&RateLimits::off());
        for _ in 0..1000 {
            assert!(shared.auth(Some([127, 0, 0, 1].into()), Some("a")).is_ok());
        }
    }

    #[test]
    fn auth_is_limited_per_ip_and_per_account() {
        let mut limits = RateLimits::off();
        limits.auth_per_ip = Some(Rate::new(0.001, 2));
        limits.auth_per_account = Some(Rate::new(0.001, 2));
        let shared = SharedLimiters::new(&limits);
        let (ip1, ip2): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        assert!(shared.auth(Some(ip1), Some("alice")).is_ok());
        assert!(shared.auth(Some(ip2), Some("alice")).is_ok());
        assert!(
            shared.auth(Some(ip2), Some("alice")).is_err(),
            "alice's bucket is empty"
        );
        assert!(shared.auth(Some(ip1), Some("bob")).is_ok());
        assert!(
            shared.auth(Some(ip1), Some("carol")).is_err(),
            "ip1's bucket is empty"
        );
    }

    #[test]
    fn the_filter_refuses_with_a_reason() {
        let f = ContentFilter::new(&[
            FilterRule {
                pattern: r"\bspam+\b".into(),
                reason: "no spam".into(),
            },
            FilterRule {
                pattern: "buy now".into(),
                reason: "no ads".into(),
            },
        ])
        .unwrap();
        assert!(f.check("hello").is_ok());
        let e = f.check("SPAMMM!").unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
        assert_eq!(e.message, "refused by the content filter: no spam");
        assert!(f.check("Buy Now").is_err());
        assert!(ContentFilter::new(&[FilterRule {
            pattern: "(".into(),
            reason: String::new()
        }])
        .is_err());
        assert!(ContentFilter::default().check("anything").is_ok());
    }
}
