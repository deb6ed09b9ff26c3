// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Verify patterns: every 512-byte sector carries its own device offset, the run's generation
//! and a pseudo-random body seeded by both, so a misplaced, stale or torn sector is told apart
//! from a correct one and the report can say where the wrong data came from.

pub const SECTOR: usize = 512;
const WORDS: usize = SECTOR / 8;

fn body_word(offset: u64, generation: u64, index: usize) -> u64 {
    crate::rng::splitmix64(
        offset ^ generation.rotate_left(29) ^ (index as u64).wrapping_mul(0x9e37_79b9),
    )
}

/// Fills `buf` (a multiple of 512 bytes) with the pattern of the blocks starting at `offset`.
pub fn fill(buf: &mut [u8], offset: u64, generation: u64) {
    for (number, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
        let sector_offset = offset + (number * SECTOR) as u64;
        for (index, word) in sector.chunks_exact_mut(8).enumerate() {
            let value = match index {
                0 => sector_offset,
                1 => generation,
                _ => body_word(sector_offset, generation, index),
            };
            word.copy_from_slice(&value.to_le_bytes());
        }
    }
}

fn word_at(sector: &[u8], index: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&sector[index * 8..index * 8 + 8]);
    u64::from_le_bytes(bytes)
}

/// Checks `buf` read from `offset`; describes the first bad sector.
pub fn check(buf: &[u8], offset: u64, generation: u64) -> Result<(), String> {
    for (number, sector) in buf.chunks_exact(SECTOR).enumerate() {
        let sector_offset = offset + (number * SECTOR) as u64;
        let found_offset = word_at(sector, 0);
        let found_generation = word_at(sector, 1);
        if found_offset != sector_offset || found_generation != generation {
            let what = if sector.iter().all(|&b| b == 0) {
                "all zeroes".to_string()
            } else {
                format!("a header for offset {found_offset} generation {found_generation}")
            };
            return Err(format!(
                "sector at offset {sector_offset}: expected generation {generation}, found {what}"
            ));
        }
        if let Some(index) =
            (2..WORDS).find(|&i| word_at(sector, i) != body_word(sector_offset, generation, i))
        {
            return Err(format!(
                "sector at offset {sector_offset}: header is right but byte {} differs (torn or corrupted)",
                index * 8
            ));
        }
    }
    Ok(())
}

pub fn self_check() -> Result<(), String> {
    let mut buf = vec![0u8; 4096];
    fill(&mut buf, 8192, 7);
    check(&buf, 8192, 7)?;
    if check(&buf, 8192, 8).is_ok() {
        return Err("a block of another generation passed the check".into());
    }
    if check(&buf, 4096, 7).is_ok() {
        return Err("a block written at another offset passed the check".into());
    }
    let mut torn = buf.clone();
    torn[3 * SECTOR + 100] ^= 1;
    match check(&torn, 8192, 7) {
        Err(message) if message.contains(&(8192 + 3 * SECTOR).to_string()) => {}
        other => return Err(format!("a flipped bit was reported as {other:?}")),
    }
    if check(&[0u8; SECTOR], 0, 0).is_ok() {
        return Err("an unwritten (zero) sector passed the check of generation 0".into());
    }
    Ok(())
}
