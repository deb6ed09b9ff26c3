// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Small deterministic generators: no statistical quality beyond "spread evenly" is needed.

pub fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A splitmix64 stream.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix64(self.0)
    }

    /// Uniform in `0..bound` (`bound` > 0), without modulo bias worth caring about here.
    pub fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Visits each of `0..len` exactly once: in order, or scrambled by a stride coprime with `len`
/// (a permutation that needs no memory, so whole devices can be verified).
pub struct VisitOrder {
    len: u64,
    start: u64,
    stride: u64,
}

impl VisitOrder {
    pub fn new(len: u64, scrambled: bool, seed: u64) -> Self {
        if !scrambled || len < 3 {
            return Self {
                len,
                start: 0,
                stride: 1,
            };
        }
        let mut rng = Rng::new(seed);
        let mut stride = (len / 2 + rng.below(len / 2)) | 1;
        while gcd(stride, len) != 1 {
            stride += 1;
        }
        Self {
            len,
            start: rng.below(len),
            stride: stride % len,
        }
    }

    /// The `index`-th element visited (`index` < `len`).
    pub fn at(&self, index: u64) -> u64 {
        ((u128::from(index) * u128::from(self.stride) + u128::from(self.start))
            % u128::from(self.len)) as u64
    }
}

pub fn self_check() -> Result<(), String> {
    for len in [1u64, 2, 3, 10, 64, 1000, 4097] {
        for scrambled in [false, true] {
            let order = VisitOrder::new(len, scrambled, len * 31);
            let mut seen = vec![false; len as usize];
            for index in 0..len {
                let element = order.at(index);
                if element >= len || seen[element as usize] {
                    return Err(format!(
                        "visit order of {len} (scrambled {scrambled}) repeats or leaves the range at {index}"
                    ));
                }
                seen[element as usize] = true;
            }
        }
    }
    let scrambled = VisitOrder::new(1000, true, 5);
    if (0..10).all(|i| scrambled.at(i) == i) {
        return Err("a scrambled order is sequential".into());
    }
    let mut rng = Rng::new(1);
    let mut buckets = [0u32; 10];
    for _ in 0..100_000 {
        buckets[rng.below(10) as usize] += 1;
    }
    if buckets
        .iter()
        .any(|&count| !(9_000..11_000).contains(&count))
    {
        return Err(format!("uniform draws are lopsided: {buckets:?}"));
    }
    Ok(())
}
