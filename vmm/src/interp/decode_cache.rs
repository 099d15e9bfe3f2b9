//! Decoded instructions kept by address, so a loop is not decoded again on every iteration.
//!
//! Decoding with iced-x86 (and setting up its decoder) took about a third of the interpreter's
//! time on Linux's boot. An entry is used only when the bytes fetched for the instruction now
//! are the bytes it was decoded from, so code that was rewritten, remapped or moved never runs
//! from a stale entry: nothing has to invalidate the cache.

use iced_x86::Instruction;

/// Entries, direct-mapped by EIP (a power of two).
const ENTRIES: usize = 4096;

#[derive(Clone, Copy)]
struct Entry {
    eip: u32,
    bitness: u32,
    len: u8,
    bytes: [u8; 15],
    ins: Instruction,
}

/// The cache: one slot per hash of EIP.
pub(super) struct DecodeCache {
    entries: Box<[Option<Entry>]>,
}

impl Default for DecodeCache {
    fn default() -> Self {
        Self {
            entries: vec![None; ENTRIES].into_boxed_slice(),
        }
    }
}

fn slot(eip: u32) -> usize {
    (eip.wrapping_mul(0x9E37_79B1) >> 20) as usize & (ENTRIES - 1)
}

impl DecodeCache {
    /// The instruction decoded earlier at `eip` in `bitness`-bit code, if `bytes` (what the
    /// fetch found there now) begin with the bytes it was decoded from.
    pub(super) fn get(&self, eip: u32, bitness: u32, bytes: &[u8]) -> Option<Instruction> {
        let e = self.entries[slot(eip)].as_ref()?;
        let len = usize::from(e.len);
        (e.eip == eip && e.bitness == bitness && bytes.get(..len) == Some(&e.bytes[..len]))
            .then_some(e.ins)
    }

    /// Remembers `ins`, decoded at `eip` from the start of `bytes`.
    pub(super) fn put(&mut self, eip: u32, bitness: u32, bytes: &[u8], ins: Instruction) {
        let len = ins.len();
        if len == 0 || len > 15 || bytes.len() < len {
            return;
        }
        let mut copy = [0u8; 15];
        copy[..len].copy_from_slice(&bytes[..len]);
        self.entries[slot(eip)] = Some(Entry {
            eip,
            bitness,
            len: len as u8,
            bytes: copy,
            ins,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    fn decode(bitness: u32, bytes: &[u8], eip: u32) -> Instruction {
        Decoder::with_ip(bitness, bytes, u64::from(eip), DecoderOptions::NONE).decode()
    }

    #[test]
    fn an_entry_is_used_only_for_the_same_bytes_address_and_mode() {
        let mut c = DecodeCache::default();
        let code = [0x01, 0xD8, 0x90, 0x90]; // add eax, ebx; nop...
        let ins = decode(32, &code, 0x1000);
        c.put(0x1000, 32, &code, ins);
        assert_eq!(
            c.get(0x1000, 32, &code).map(|i| i.mnemonic()),
            Some(Mnemonic::Add)
        );
        // Only the instruction's own bytes matter: what follows it may change.
        assert!(c.get(0x1000, 32, &[0x01, 0xD8, 0xCC]).is_some());
        // Rewritten code, another address or another mode: decode again.
        assert!(c.get(0x1000, 32, &[0x29, 0xD8, 0x90]).is_none());
        assert!(c.get(0x2000, 32, &code).is_none());
        assert!(c.get(0x1000, 16, &code).is_none());
        // Fewer bytes than the instruction (a fetch cut short by a segment limit or a fault).
        assert!(c.get(0x1000, 32, &[0x01]).is_none());
    }
}
