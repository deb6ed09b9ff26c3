// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Log-linear latency histogram: exact below 32 ns, then 32 linear sub-buckets per power of two,
//! so any percentile is within about 3% of the true value.

const SUB_BITS: u32 = 5;
const SUB_BUCKETS: usize = 1 << SUB_BITS;
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB_BUCKETS;

#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum_ns: u128,
    min_ns: u64,
    max_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            count: 0,
            sum_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }
}

fn bucket_of(value: u64) -> usize {
    if value < SUB_BUCKETS as u64 {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros();
    let sub = (value >> (exponent - SUB_BITS)) as usize & (SUB_BUCKETS - 1);
    (exponent - SUB_BITS + 1) as usize * SUB_BUCKETS + sub
}

/// The smallest value that falls in `bucket`, and the bucket's width.
fn bucket_range(bucket: usize) -> (u64, u64) {
    if bucket < SUB_BUCKETS {
        return (bucket as u64, 1);
    }
    let exponent = (bucket / SUB_BUCKETS) as u32 + SUB_BITS - 1;
    let sub = (bucket % SUB_BUCKETS) as u64;
    let width = 1u64 << (exponent - SUB_BITS);
    ((SUB_BUCKETS as u64 + sub) * width, width)
}

impl Histogram {
    pub fn record(&mut self, value_ns: u64) {
        self.counts[bucket_of(value_ns)] += 1;
        self.count += 1;
        self.sum_ns += u128::from(value_ns);
        self.min_ns = self.min_ns.min(value_ns);
        self.max_ns = self.max_ns.max(value_ns);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        self.min_ns = self.min_ns.min(other.min_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn mean_ns(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.count as f64
        }
    }

    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// The value below or at which `percent` of the samples lie (middle of its bucket, clamped
    /// to the observed extremes); 0 when empty.
    pub fn percentile_ns(&self, percent: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((percent / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, width) = bucket_range(bucket);
                let middle = low + (width - 1) / 2;
                return middle.clamp(self.min_ns, self.max_ns);
            }
        }
        self.max_ns
    }
}

/// Checks used by the self-test mode (a harness-less bench cannot host `#[test]`s).
pub fn self_check() -> Result<(), String> {
    for value in [0u64, 1, 31, 32, 33, 63, 64, 1000, 123_456_789, u64::MAX] {
        let (low, width) = bucket_range(bucket_of(value));
        if value < low || value - low >= width {
            return Err(format!(
                "value {value} landed in bucket [{low}, +{width}) that does not hold it"
            ));
        }
        if width > 1 && width > low / 16 {
            return Err(format!(
                "bucket of {value} is wider ({width}) than 1/16 of its start"
            ));
        }
    }
    let mut histogram = Histogram::default();
    for value in 1..=10_000u64 {
        histogram.record(value * 1000);
    }
    for (percent, exact) in [(50.0, 5_000_000u64), (99.0, 9_900_000), (100.0, 10_000_000)] {
        let got = histogram.percentile_ns(percent);
        let error = got.abs_diff(exact) as f64 / exact as f64;
        if error > 0.04 {
            return Err(format!("p{percent} is {got}, expected about {exact}"));
        }
    }
    if (histogram.mean_ns() - 5_000_500.0).abs() > 1.0 {
        return Err(format!("mean is {}, expected 5000500", histogram.mean_ns()));
    }
    let mut merged = Histogram::default();
    merged.merge(&histogram);
    merged.merge(&histogram);
    if merged.count() != 20_000 || merged.max_ns() != 10_000_000 {
        return Err("merging two histograms lost samples".into());
    }
    if Histogram::default().percentile_ns(99.0) != 0 {
        return Err("an empty histogram must report 0".into());
    }
    Ok(())
}
