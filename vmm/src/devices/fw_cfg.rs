//! QEMU's firmware configuration interface (fw_cfg), port-I/O flavour, as QEMU's
//! `docs/specs/fw_cfg.rst` describes it.
//!
//! - 0x510 (16-bit write): selector — picks an item and rewinds its read offset.
//! - 0x511 (8-bit read): data — the selected item's next byte; 0 past its end.
//! - 0x514 (two 32-bit big-endian writes, high half then low half): DMA — the low-half write
//!   starts the transfer described by the `FWCfgDmaAccess` structure at that guest-physical
//!   address. Reading these ports gives the DMA signature "QEMU CFG".
//!
//! Test kernels (kvm-unit-tests among them) read the CPU count and RAM size here, and firmware
//! reads its configuration files.

use std::collections::BTreeMap;
use std::sync::Arc;

use vmdriver::GuestMemory;

use crate::bus::BusDevice;

/// Base port (selector; data is base + 1).
pub const FW_CFG_PORT: u16 = 0x510;
/// Ports claimed: selector, data, and the DMA address register at base + 4.
pub const FW_CFG_PORTS: u16 = 12;

/// Item keys (the fixed ones bt86 provides).
pub mod keys {
    /// "QEMU".
    pub const SIGNATURE: u16 = 0x00;
    /// Feature bitmap: bit 0 traditional interface, bit 1 DMA.
    pub const ID: u16 = 0x01;
    /// The VM's UUID (16 bytes).
    pub const UUID: u16 = 0x02;
    /// RAM size in bytes (u64).
    pub const RAM_SIZE: u16 = 0x03;
    /// Whether there is no graphical display (u16).
    pub const NOGRAPHIC: u16 = 0x04;
    /// CPUs present at boot (u16).
    pub const NB_CPUS: u16 = 0x05;
    /// Maximum CPU count (u16).
    pub const MAX_CPUS: u16 = 0x0F;
    /// Directory of named files.
    pub const FILE_DIR: u16 = 0x19;
    /// First key given to named files.
    pub const FILE_FIRST: u16 = 0x20;
}

const DMA_SIGNATURE: u64 = 0x5145_4D55_2043_4647; // "QEMU CFG"
const DMA_CTL_ERROR: u32 = 0x01;
const DMA_CTL_READ: u32 = 0x02;
const DMA_CTL_SKIP: u32 = 0x04;
const DMA_CTL_SELECT: u32 = 0x08;
const DMA_CTL_WRITE: u32 = 0x10;
const FILE_NAME_LEN: usize = 56;

/// The fw_cfg device.
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<(String, u16)>,
    selected: u16,
    offset: usize,
    dma_high: u32,
    memory: Arc<GuestMemory>,
}

impl FwCfg {
    /// A device describing a machine with `cpus` CPUs and `ram_bytes` of RAM, doing DMA into
    /// `memory`.
    pub fn new(memory: Arc<GuestMemory>, cpus: u16, ram_bytes: u64) -> Self {
        let mut items = BTreeMap::new();
        items.insert(keys::SIGNATURE, b"QEMU".to_vec());
        items.insert(keys::ID, 3u32.to_le_bytes().to_vec());
        items.insert(keys::UUID, vec![0; 16]);
        items.insert(keys::RAM_SIZE, ram_bytes.to_le_bytes().to_vec());
        items.insert(keys::NOGRAPHIC, 1u16.to_le_bytes().to_vec());
        items.insert(keys::NB_CPUS, cpus.to_le_bytes().to_vec());
        items.insert(keys::MAX_CPUS, cpus.to_le_bytes().to_vec());
        let mut dev = Self {
            items,
            files: Vec::new(),
            selected: 0,
            offset: 0,
            dma_high: 0,
            memory,
        };
        dev.rebuild_directory();
        dev
    }

    /// Adds a named file (e.g. `etc/e820`) and returns its key. Names longer than 55 bytes are
    /// refused, as the directory format cannot hold them.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Option<u16> {
        if name.len() >= FILE_NAME_LEN {
            return None;
        }
        let key = keys::FILE_FIRST + self.files.len() as u16;
        self.items.insert(key, data);
        self.files.push((name.to_string(), key));
        self.rebuild_directory();
        Some(key)
    }

    fn rebuild_directory(&mut self) {
        let mut dir = (self.files.len() as u32).to_be_bytes().to_vec();
        for (name, key) in &self.files {
            let size = self.items.get(key).map_or(0, Vec::len) as u32;
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut n = [0u8; FILE_NAME_LEN];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
        }
        self.items.insert(keys::FILE_DIR, dir);
    }

    fn select(&mut self, key: u16) {
        self.selected = key;
        self.offset = 0;
    }

    fn read_byte(&mut self) -> u8 {
        let b = self
            .items
            .get(&self.selected)
            .and_then(|item| item.get(self.offset))
            .copied()
            .unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        b
    }

    /// Carries out the DMA request whose descriptor is at guest-physical `addr`, and writes the
    /// resulting control word back.
    fn dma(&mut self, addr: u64) {
        let mut desc = [0u8; 16];
        if self.memory.read(addr, &mut desc).is_err() {
            tracing::debug!("fw_cfg DMA descriptor at {addr:#x} is not in RAM");
            return;
        }
        let control = u32::from_be_bytes(desc[0..4].try_into().expect("4 bytes"));
        let length = u32::from_be_bytes(desc[4..8].try_into().expect("4 bytes")) as usize;
        let target = u64::from_be_bytes(desc[8..16].try_into().expect("8 bytes"));
        if control & DMA_CTL_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let ok = if control & DMA_CTL_READ != 0 {
            let data: Vec<u8> = (0..length).map(|_| self.read_byte()).collect();
            self.memory.write_ram(target, &data).is_ok()
        } else if control & DMA_CTL_SKIP != 0 {
            self.offset = self.offset.saturating_add(length);
            true
        } else {
            // Writes to items are not supported (QEMU allows them only to a few files).
            control & DMA_CTL_WRITE == 0
        };
        let status: u32 = if ok { 0 } else { DMA_CTL_ERROR };
        if self.memory.write_ram(addr, &status.to_be_bytes()).is_err() {
            tracing::debug!("fw_cfg DMA status write to {addr:#x} failed");
        }
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            1 => data.iter_mut().for_each(|b| *b = self.read_byte()),
            4..=11 => {
                let sig = DMA_SIGNATURE.to_be_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = sig.get(offset as usize - 4 + i).copied().unwrap_or(0);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 2) | (0, 1) => {
                let mut key = [0u8; 2];
                key[..data.len()].copy_from_slice(data);
                self.select(u16::from_le_bytes(key));
            }
            (4, 4) => self.dma_high = u32::from_be_bytes(data.try_into().expect("4 bytes")),
            (8, 4) => {
                let low = u32::from_be_bytes(data.try_into().expect("4 bytes"));
                let addr = (u64::from(self.dma_high) << 32) | u64::from(low);
                self.dma_high = 0;
                self.dma(addr);
            }
            _ => tracing::trace!("ignored fw_cfg write {data:02x?} at offset {offset}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmdriver::MemoryLayout;

    fn dev() -> FwCfg {
        let mem = Arc::new(GuestMemory::new(MemoryLayout::new(4).unwrap()).unwrap());
        FwCfg::new(mem, 1, 4 << 20)
    }

    fn read_item(d: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
        d.write(0, &key.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0u8];
                d.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn signature_cpus_and_ram_size() {
        let mut d = dev();
        assert_eq!(read_item(&mut d, keys::SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut d, keys::NB_CPUS, 2), [1, 0]);
        assert_eq!(read_item(&mut d, keys::MAX_CPUS, 2), [1, 0]);
        assert_eq!(
            read_item(&mut d, keys::RAM_SIZE, 8),
            (4u64 << 20).to_le_bytes()
        );
        assert_eq!(read_item(&mut d, keys::ID, 4), [3, 0, 0, 0]);
    }

    #[test]
    fn reads_past_the_end_and_of_unknown_keys_are_zero() {
        let mut d = dev();
        assert_eq!(read_item(&mut d, keys::SIGNATURE, 6), b"QEMU\0\0");
        assert_eq!(read_item(&mut d, 0x7777, 3), [0, 0, 0]);
    }

    #[test]
    fn selecting_rewinds() {
        let mut d = dev();
        read_item(&mut d, keys::SIGNATURE, 2);
        assert_eq!(read_item(&mut d, keys::SIGNATURE, 4), b"QEMU");
    }

    #[test]
    fn file_directory_lists_files_big_endian() {
        let mut d = dev();
        let key = d.add_file("etc/test", vec![1, 2, 3]).unwrap();
        assert_eq!(key, keys::FILE_FIRST);
        let dir = read_item(&mut d, keys::FILE_DIR, 4 + 64);
        assert_eq!(&dir[0..4], &1u32.to_be_bytes());
        assert_eq!(&dir[4..8], &3u32.to_be_bytes());
        assert_eq!(&dir[8..10], &key.to_be_bytes());
        assert_eq!(&dir[12..20], b"etc/test");
        assert_eq!(read_item(&mut d, key, 3), [1, 2, 3]);
        assert!(d.add_file(&"x".repeat(56), vec![]).is_none());
    }

    #[test]
    fn dma_select_and_read_into_guest_memory() {
        let mut d = dev();
        let desc_addr = 0x1000u64;
        let target = 0x2000u64;
        let control = (u32::from(keys::SIGNATURE) << 16) | DMA_CTL_SELECT | DMA_CTL_READ;
        let mut desc = control.to_be_bytes().to_vec();
        desc.extend_from_slice(&4u32.to_be_bytes());
        desc.extend_from_slice(&target.to_be_bytes());
        d.memory.write(desc_addr, &desc).unwrap();
        d.write(4, &0u32.to_be_bytes());
        d.write(8, &(desc_addr as u32).to_be_bytes());
        let mut got = [0u8; 4];
        d.memory.read(target, &mut got).unwrap();
        assert_eq!(&got, b"QEMU");
        assert_eq!(
            d.memory.read_u32(desc_addr).unwrap(),
            0,
            "control cleared on success"
        );
    }

    #[test]
    fn dma_to_a_hole_reports_an_error() {
        let mut d = dev();
        let control = (u32::from(keys::SIGNATURE) << 16) | DMA_CTL_SELECT | DMA_CTL_READ;
        let mut desc = control.to_be_bytes().to_vec();
        desc.extend_from_slice(&4u32.to_be_bytes());
        desc.extend_from_slice(&0xA_0000u64.to_be_bytes()); // VGA window: not RAM
        d.memory.write(0x1000, &desc).unwrap();
        d.write(4, &0u32.to_be_bytes());
        d.write(8, &0x1000u32.to_be_bytes());
        let status = u32::from_be(d.memory.read_u32(0x1000).unwrap());
        assert_eq!(status, DMA_CTL_ERROR);
    }

    #[test]
    fn dma_port_reads_the_signature() {
        let mut d = dev();
        let mut sig = [0u8; 8];
        d.read(4, &mut sig[..4]);
        d.read(8, &mut sig[4..]);
        assert_eq!(&sig, b"QEMU CFG");
    }
}
