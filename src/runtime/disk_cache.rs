//! The on-disk envelope of the driver's pipeline cache.
//!
//! A pipeline cache is driver-private bytes handed straight to the driver, so a file damaged on
//! disk (a crash mid-write on a file system without atomic rename, bit rot, a truncated copy)
//! must never reach it. wgpu checks its own header (magic, backend, adapter, driver version,
//! length) but not the payload, so we wrap the file in an envelope: a magic, the payload length
//! and a 64-bit FNV-1a checksum of the payload. A file that fails any check is ignored (the cache
//! starts empty and is rewritten on save), never trusted.

const MAGIC: &[u8; 8] = b"LDMPC\x00\x00\x01";
const HEADER_LEN: usize = 8 + 8 + 8;

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Wrap driver cache bytes for writing to disk.
pub(crate) fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv1a64(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payload of a sealed file, or `None` (with the reason) if it is not exactly what `seal`
/// wrote: wrong magic (an older format or another file), a length that disagrees with the file,
/// or a checksum mismatch.
pub(crate) fn unseal(file: &[u8]) -> Result<&[u8], &'static str> {
    if file.len() < HEADER_LEN || &file[..8] != MAGIC {
        return Err("not an ldm-wgpu pipeline cache (or an older format)");
    }
    let len = u64::from_le_bytes(file[8..16].try_into().unwrap());
    let sum = u64::from_le_bytes(file[16..24].try_into().unwrap());
    let payload = &file[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err("truncated or extended");
    }
    if fnv1a64(payload) != sum {
        return Err("checksum mismatch (damaged on disk)");
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(unseal(&seal(&payload)).unwrap(), &payload[..]);
        assert_eq!(unseal(&seal(&[])).unwrap(), &[] as &[u8]);
    }

    #[test]
    fn every_single_byte_flip_is_caught() {
        let payload: Vec<u8> = (0..200u32).map(|i| (i * 13) as u8).collect();
        let sealed = seal(&payload);
        for i in 0..sealed.len() {
            let mut damaged = sealed.clone();
            damaged[i] ^= 0x20;
            assert!(unseal(&damaged).is_err(), "flip at byte {i} accepted");
        }
    }

    #[test]
    fn truncated_extended_and_foreign_files_are_refused() {
        let sealed = seal(b"driver bytes");
        assert!(unseal(&sealed[..sealed.len() - 1]).is_err());
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(unseal(&longer).is_err());
        assert!(unseal(b"").is_err());
        assert!(unseal(b"\x89PNG\r\n\x1a\n and more bytes than a header").is_err());
    }
}
