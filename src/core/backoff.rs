//! One way to wait between retries: doubling from a floor to a ceiling, reset on success,
//! optionally jittered so that replicas that failed together do not retry together.

use std::time::Duration;

/// The delays of one retry loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    jitter: bool,
    next: Duration,
}

impl Backoff {
    /// Delays from `min`, doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            jitter: false,
            next: min,
        }
    }

    /// Each delay drawn from the upper half of its value (full jitter there): retries of
    /// replicas that lost Redis together spread out.
    pub fn jittered(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// The delay to wait now; the following one doubles (up to the ceiling).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        if self.jitter {
            let half = delay / 2;
            half + half.mul_f64(rand::random::<f64>())
        } else {
            delay
        }
    }

    /// Back to the floor after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_ceiling_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let plain: Vec<u64> = (0..6).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(plain, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        let mut j = Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).jittered();
        for _ in 0..20 {
            let d = j.next_delay();
            assert!(d <= Duration::from_secs(5));
        }
        assert!(j.next_delay() >= Duration::from_millis(2500));
    }
}
