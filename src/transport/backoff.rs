//! Reconnect backoff as pure state: exponential growth with full jitter, reset only after a
//! connection proved healthy.
//!
//! There is no clock and no sleeping here: the caller passes `now` and a random source, and
//! sleeps for whatever [`Backoff::next_delay`] returns. That keeps the schedule exact in tests
//! and replayable in the seeded simulation. Not here: the socket, the timer, or deciding
//! *whether* to reconnect.
//!
//! Why "healthy for a while" rather than "connected": a relay that accepts the connection and
//! then drops it at once (a crash loop, an expired token, a load shedder) would otherwise reset
//! the schedule on every attempt and be hammered at the base rate by every device.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use rand::{rngs::StdRng, SeedableRng};
//! use tandem::transport::{Backoff, BackoffConfig};
//!
//! let mut backoff = Backoff::new(BackoffConfig::default());
//! let mut rng = StdRng::seed_from_u64(1);
//! let first = backoff.next_delay(&mut rng);
//! assert!(first <= BackoffConfig::default().base);
//!
//! let t0 = Instant::now();
//! backoff.connected(t0);
//! backoff.disconnected(t0 + Duration::from_secs(1)); // dropped at once: keep backing off
//! assert_eq!(backoff.ceiling(), 2 * BackoffConfig::default().base);
//! ```

use std::time::{Duration, Instant};

use rand::Rng;

/// The shape of the backoff schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// The ceiling of the first delay.
    pub base: Duration,
    /// No delay is ever longer than this.
    pub cap: Duration,
    /// How long a connection must have been up, when it drops, for the schedule to restart
    /// from `base`.
    pub healthy_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(60),
            healthy_after: Duration::from_secs(30),
        }
    }
}

/// Where a device is in its reconnect schedule.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    /// Failed attempts since the last healthy connection.
    attempt: u32,
    /// When the current connection came up, if one is up.
    connected_at: Option<Instant>,
}

impl Backoff {
    /// A fresh schedule: the first delay is at most `config.base`.
    pub fn new(config: BackoffConfig) -> Backoff {
        Backoff {
            config,
            attempt: 0,
            connected_at: None,
        }
    }

    /// The upper bound of the next delay: `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        // Past 2^31 the product is beyond any sane cap anyway; overflow means "the cap".
        2u32.checked_pow(self.attempt)
            .and_then(|factor| self.config.base.checked_mul(factor))
            .map_or(self.config.cap, |d| d.min(self.config.cap))
    }

    /// How long to wait before the next attempt: uniform in `[0, ceiling]` ("full jitter", so
    /// devices that lost the relay together do not come back together), and the ceiling
    /// doubles for the attempt after.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        rng.gen_range(Duration::ZERO..=ceiling)
    }

    /// The connection is up (handshake done).
    pub fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// The connection dropped (or an attempt failed). The schedule restarts only if the
    /// connection had been up for at least `healthy_after`.
    pub fn disconnected(&mut self, now: Instant) {
        if let Some(since) = self.connected_at.take() {
            if now.saturating_duration_since(since) >= self.config.healthy_after {
                self.attempt = 0;
            }
        }
    }

    /// Failed attempts since the last healthy connection.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn config() -> BackoffConfig {
        BackoffConfig {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
            healthy_after: Duration::from_secs(10),
        }
    }

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let mut backoff = Backoff::new(config());
        let mut rng = StdRng::seed_from_u64(7);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(backoff.ceiling().as_millis());
            backoff.next_delay(&mut rng);
        }
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]
        );
    }

    #[test]
    fn the_exponent_saturates_instead_of_overflowing() {
        let mut backoff = Backoff::new(config());
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            assert!(backoff.next_delay(&mut rng) <= config().cap);
        }
        assert_eq!(backoff.ceiling(), config().cap);
    }

    #[test]
    fn every_delay_is_within_its_ceiling_and_they_vary() {
        let mut backoff = Backoff::new(config());
        let mut rng = StdRng::seed_from_u64(42);
        let mut delays = Vec::new();
        for _ in 0..50 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay(&mut rng);
            assert!(delay <= ceiling, "{delay:?} > {ceiling:?}");
            delays.push(delay);
        }
        // At the cap, jitter is what spreads devices out: the delays must not all be equal.
        let at_cap = &delays[10..];
        assert!(at_cap.iter().any(|d| d != &at_cap[0]));
        assert!(at_cap.iter().all(|d| d <= &config().cap));
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let run = |seed| {
            let mut backoff = Backoff::new(config());
            let mut rng = StdRng::seed_from_u64(seed);
            (0..8)
                .map(|_| backoff.next_delay(&mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn a_short_lived_connection_does_not_reset() {
        let mut backoff = Backoff::new(config());
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..4 {
            backoff.next_delay(&mut rng);
        }
        let t0 = Instant::now();
        backoff.connected(t0);
        backoff.disconnected(t0 + Duration::from_millis(9_999));
        assert_eq!(backoff.attempt(), 4);
        assert_eq!(backoff.ceiling(), Duration::from_millis(1600));
    }

    #[test]
    fn a_failed_attempt_without_connecting_does_not_reset() {
        let mut backoff = Backoff::new(config());
        let mut rng = StdRng::seed_from_u64(1);
        backoff.next_delay(&mut rng);
        backoff.disconnected(Instant::now());
        assert_eq!(backoff.attempt(), 1);
    }

    #[test]
    fn a_healthy_connection_resets() {
        let mut backoff = Backoff::new(config());
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..6 {
            backoff.next_delay(&mut rng);
        }
        let t0 = Instant::now();
        backoff.connected(t0);
        backoff.disconnected(t0 + Duration::from_secs(10));
        assert_eq!(backoff.attempt(), 0);
        assert_eq!(backoff.ceiling(), config().base);

        // The reset is consumed: a second drop without a new connection changes nothing.
        backoff.next_delay(&mut rng);
        backoff.disconnected(t0 + Duration::from_secs(60));
        assert_eq!(backoff.attempt(), 1);
    }
}
