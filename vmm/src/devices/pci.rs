//! PCI bus 0 with configuration mechanism #1, as on the i440FX/PIIX3 chipset of QEMU's `pc`
//! machine.
//!
//! Configuration mechanism #1 (PCI Local Bus Specification 3.0, section 3.2.2.3.2): a 32-bit
//! write to CONFIG_ADDRESS (0xCF8) selects bus, device, function and register (bit 31 enables);
//! CONFIG_DATA (0xCFC-0xCFF) then reads or writes that function's configuration space at any
//! width. Only 32-bit accesses to 0xCF8 reach CONFIG_ADDRESS; a byte at 0xCF9 is the PIIX's
//! reset control register (bit 2 RST_CPU rising resets the machine; bit 1 SRST picks a hard
//! reset, which bt86 treats like a soft one: both end the run as a reboot).
//!
//! A function's [`ConfigSpace`] models the type-0 header: identification, the command register,
//! base address registers with size probing (writable bits below the size read as zero), and the
//! interrupt line and pin. BARs that the guest moves or enables are reported as [`BarChange`]s,
//! which the VM applies to its port bus (I/O BARs) or its MMIO bus (memory BARs).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::bus::{Bus, BusDevice};
use crate::control::{StopRequest, VmControl};

/// CONFIG_ADDRESS.
pub const CONFIG_ADDRESS_PORT: u16 = 0xCF8;
/// Ports claimed by the host bridge: CONFIG_ADDRESS and CONFIG_DATA.
pub const CONFIG_PORTS: u16 = 8;

/// Configuration-space register offsets of the type-0 header.
pub mod reg {
    /// Vendor ID (16 bits).
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE_ID: usize = 0x02;
    /// Command (16 bits).
    pub const COMMAND: usize = 0x04;
    /// Status (16 bits).
    pub const STATUS: usize = 0x06;
    /// Revision ID.
    pub const REVISION: usize = 0x08;
    /// Programming interface.
    pub const PROG_IF: usize = 0x09;
    /// Sub-class code.
    pub const SUBCLASS: usize = 0x0A;
    /// Base class code.
    pub const CLASS: usize = 0x0B;
    /// Cache line size.
    pub const CACHE_LINE: usize = 0x0C;
    /// Latency timer.
    pub const LATENCY: usize = 0x0D;
    /// Header type (bit 7: multi-function device).
    pub const HEADER_TYPE: usize = 0x0E;
    /// First base address register.
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID.
    pub const SUBSYSTEM_VENDOR: usize = 0x2C;
    /// Interrupt line (written by firmware/OS).
    pub const INTERRUPT_LINE: usize = 0x3C;
    /// Interrupt pin (1 = INTA#, 0 = none).
    pub const INTERRUPT_PIN: usize = 0x3D;
}

/// Command register: I/O space decoding.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus mastering.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: interrupt disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// What a base address register decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// I/O ports (bit 0 of the BAR reads 1).
    Io,
    /// 32-bit memory, not prefetchable.
    Memory32,
}

/// One base address register: kind and size (a power of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// What it decodes.
    pub kind: BarKind,
    /// Bytes (or ports) decoded; a power of two, at least 4 (I/O) or 16 (memory).
    pub size: u32,
    /// Writable address bits (bits above the size). An I/O BAR of a 16-bit decoder, like the
    /// PIIX's, has its upper 16 bits hard-wired to zero.
    pub address_mask: u32,
}

impl Bar {
    /// An I/O BAR of `size` ports decoded in the 64 KiB port space.
    pub fn io(size: u32) -> Self {
        Self {
            kind: BarKind::Io,
            size,
            address_mask: !(size - 1) & 0xFFFC,
        }
    }

    /// A 32-bit memory BAR of `size` bytes.
    pub fn memory32(size: u32) -> Self {
        Self {
            kind: BarKind::Memory32,
            size,
            address_mask: !(size - 1) & !0xF,
        }
    }

    fn flag_bits(&self) -> u32 {
        match self.kind {
            BarKind::Io => 1,
            BarKind::Memory32 => 0,
        }
    }
}

/// A function's 256-byte configuration space with per-bit write masks.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: [u8; 256],
    writable: [u8; 256],
    bars: [Option<Bar>; 6],
}

impl ConfigSpace {
    /// A type-0 header with the given identity. Writable: command (I/O, memory, bus master,
    /// parity, SERR, interrupt disable), cache line size, latency timer, interrupt line.
    pub fn new(
        vendor: u16,
        device: u16,
        class: u8,
        subclass: u8,
        prog_if: u8,
        revision: u8,
    ) -> Self {
        let mut c = Self {
            bytes: [0; 256],
            writable: [0; 256],
            bars: [None; 6],
        };
        c.set_u16(reg::VENDOR_ID, vendor);
        c.set_u16(reg::DEVICE_ID, device);
        c.bytes[reg::REVISION] = revision;
        c.bytes[reg::PROG_IF] = prog_if;
        c.bytes[reg::SUBCLASS] = subclass;
        c.bytes[reg::CLASS] = class;
        let cmd_mask = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | 0x40 | 0x100;
        c.set_writable(
            reg::COMMAND,
            &(cmd_mask | COMMAND_INTX_DISABLE).to_le_bytes(),
        );
        c.set_writable(reg::CACHE_LINE, &[0xFF, 0xFF]);
        c.set_writable(reg::INTERRUPT_LINE, &[0xFF]);
        c
    }

    /// Sets the header type byte (bit 7: multi-function).
    pub fn set_header_type(&mut self, v: u8) {
        self.bytes[reg::HEADER_TYPE] = v;
    }

    /// Sets the interrupt pin (1 = INTA# ... 4 = INTD#, 0 = none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.bytes[reg::INTERRUPT_PIN] = pin;
    }

    /// Declares BAR `index` (0-5).
    pub fn set_bar(&mut self, index: usize, bar: Bar) {
        self.bars[index] = Some(bar);
        let off = reg::BAR0 + 4 * index;
        self.set_u32(off, bar.flag_bits());
        self.set_writable(off, &bar.address_mask.to_le_bytes());
    }

    /// Makes bits `mask` of the bytes at `offset` writable by the guest.
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        for (i, m) in mask.iter().enumerate() {
            if let Some(w) = self.writable.get_mut(offset + i) {
                *w = *m;
            }
        }
    }

    /// Sets a 16-bit field (initial values, read-only fields).
    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Sets a 32-bit field.
    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// A byte of the space.
    pub fn byte(&self, offset: usize) -> u8 {
        self.bytes[offset & 0xFF]
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[reg::COMMAND], self.bytes[reg::COMMAND + 1]])
    }

    /// The address BAR `index` decodes now, if it is declared and its space is enabled in the
    /// command register.
    pub fn bar_address(&self, index: usize) -> Option<u32> {
        let bar = self.bars.get(index).copied().flatten()?;
        let off = reg::BAR0 + 4 * index;
        let raw = u32::from_le_bytes(self.bytes[off..off + 4].try_into().ok()?);
        let enabled = match bar.kind {
            BarKind::Io => self.command() & COMMAND_IO != 0,
            BarKind::Memory32 => self.command() & COMMAND_MEMORY != 0,
        };
        let addr = raw & bar.address_mask;
        (enabled && addr != 0).then_some(addr)
    }

    /// The declared BAR `index`.
    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// Reads `data.len()` bytes at `offset` (wrapping within the 256 bytes).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes[(offset + i) & 0xFF];
        }
    }

    /// Writes `data` at `offset`: only writable bits change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let o = (offset + i) & 0xFF;
            let w = self.writable[o];
            self.bytes[o] = (self.bytes[o] & !w) | (v & w);
        }
    }
}

/// A PCI function on bus 0.
pub trait PciFunction: Send {
    /// Its configuration space.
    fn config(&self) -> &ConfigSpace;
    /// Its configuration space, for writes.
    fn config_mut(&mut self) -> &mut ConfigSpace;
    /// Called after every configuration write (the command register may have changed).
    fn config_written(&mut self) {}
    /// A configuration read (functions with registers that act on reads override it).
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// A configuration write: the writable bits change, then [`Self::config_written`].
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
        self.config_written();
    }
    /// A bus adapter for BAR `index`, mapped where the BAR points: on the port bus for an I/O
    /// BAR, on the MMIO bus for a memory BAR.
    fn bar_device(&self, index: usize) -> Option<Box<dyn BusDevice>> {
        let _ = index;
        None
    }
    /// The adapter's name in `--stats`.
    fn bar_name(&self, index: usize) -> &'static str {
        let _ = index;
        "pci-bar"
    }
}

/// A function with nothing behind it but its configuration space (host bridge, ISA bridge).
#[derive(Debug, Clone)]
pub struct PlainFunction {
    config: ConfigSpace,
}

impl PlainFunction {
    /// A function with configuration space `config`.
    pub fn new(config: ConfigSpace) -> Self {
        Self { config }
    }

    /// The i440FX host bridge (8086:1237, class 06/00) at 00:00.0, as QEMU's `pc` machine has.
    pub fn i440fx_host_bridge() -> Self {
        Self::new(ConfigSpace::new(0x8086, 0x1237, 0x06, 0x00, 0x00, 0x02))
    }

    /// The PIIX3 PCI-to-ISA bridge (8086:7000, class 06/01) at 00:01.0: function 0 of the
    /// multi-function device whose function 1 is the IDE controller.
    pub fn piix3_isa_bridge() -> Self {
        let mut c = ConfigSpace::new(0x8086, 0x7000, 0x06, 0x01, 0x00, 0x00);
        c.set_header_type(0x80);
        // PIRQ route control (0x60-0x63) and the other chipset registers firmware programs.
        c.set_writable(0x60, &[0x8F; 4]);
        Self::new(c)
    }
}

impl PciFunction for PlainFunction {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
}

/// A BAR that moved: unmap it from `old`, map `device` at `new`.
pub struct BarChange {
    /// Which address space it decodes.
    pub kind: BarKind,
    /// The function (device << 3 | function).
    pub devfn: u8,
    /// The BAR.
    pub index: usize,
    /// Name for the bus.
    pub name: &'static str,
    /// Where it was decoded, if anywhere.
    pub old: Option<u32>,
    /// Where it is decoded now, if anywhere.
    pub new: Option<u32>,
    /// Ports or bytes decoded.
    pub len: u32,
    /// The adapter to map at `new`.
    pub device: Option<Box<dyn BusDevice>>,
}

/// BAR changes waiting for the VM to apply them to its port and MMIO buses.
#[derive(Clone, Default)]
pub struct BarChanges {
    queue: Arc<Mutex<Vec<BarChange>>>,
    /// Where each (devfn, bar) is mapped now.
    mapped: Arc<Mutex<BTreeMap<(u8, usize), u32>>>,
}

impl BarChanges {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&self, c: BarChange) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).push(c);
    }

    /// Whether changes are waiting.
    pub fn pending(&self) -> bool {
        !self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Applies waiting changes: I/O BARs to `pio`, memory BARs to `mmio`. A BAR placed over
    /// another device's range stays unmapped (and is logged): on real hardware such a
    /// conflict decodes unpredictably.
    pub fn apply(&self, pio: &mut Bus, mmio: &mut Bus) {
        let changes = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        for c in changes {
            let bus = match c.kind {
                BarKind::Io => &mut *pio,
                BarKind::Memory32 => &mut *mmio,
            };
            if let Some(at) = mapped.remove(&(c.devfn, c.index)) {
                bus.remove(u64::from(at));
            }
            if let (Some(new), Some(device)) = (c.new, c.device) {
                match bus.insert(u64::from(new), u64::from(c.len), c.name, device) {
                    Ok(()) => {
                        mapped.insert((c.devfn, c.index), new);
                    }
                    Err(e) => tracing::warn!(
                        "PCI {:02x}.{} BAR{}: {e}",
                        c.devfn >> 3,
                        c.devfn & 7,
                        c.index
                    ),
                }
            }
        }
    }
}

/// The functions on bus 0 and CONFIG_ADDRESS: the host bridge's configuration ports.
pub struct PciBus {
    address: u32,
    functions: BTreeMap<u8, Box<dyn PciFunction>>,
    /// Where each function's BARs decode, as last reported.
    bars: BTreeMap<(u8, usize), Option<u32>>,
    changes: BarChanges,
    /// The reset control register (0xCF9): SRST as last written.
    reset_control: u8,
    reset: Option<VmControl>,
}

/// Reset control (0xCF9) RST_CPU: a 0 -> 1 transition resets.
const RCR_RST_CPU: u8 = 1 << 2;
/// Reset control (0xCF9) SRST: the reset is a hard (system) reset.
const RCR_SRST: u8 = 1 << 1;

impl PciBus {
    /// An empty bus reporting BAR moves to `changes`.
    pub fn new(changes: BarChanges) -> Self {
        Self {
            address: 0,
            functions: BTreeMap::new(),
            bars: BTreeMap::new(),
            changes,
            reset_control: 0,
            reset: None,
        }
    }

    /// Connects the reset control register at 0xCF9 to the VM's stop control.
    pub fn set_reset_control(&mut self, control: VmControl) {
        self.reset = Some(control);
    }

    /// Plugs `function` in at `device.function` (device 0-31, function 0-7).
    pub fn add(&mut self, device: u8, function: u8, f: Box<dyn PciFunction>) {
        let devfn = (device << 3) | (function & 7);
        self.functions.insert(devfn, f);
        self.update_bars(devfn);
    }

    fn update_bars(&mut self, devfn: u8) {
        let Some(f) = self.functions.get(&devfn) else {
            return;
        };
        for index in 0..6 {
            let Some(bar) = f.config().bar(index) else {
                continue;
            };
            let now = f.config().bar_address(index);
            let before = self.bars.insert((devfn, index), now).flatten();
            if before != now {
                self.changes.push(BarChange {
                    kind: bar.kind,
                    devfn,
                    index,
                    name: f.bar_name(index),
                    old: before,
                    new: now,
                    len: bar.size,
                    device: now.and_then(|_| f.bar_device(index)),
                });
            }
        }
    }

    /// The function CONFIG_ADDRESS selects, with the register offset, if enabled and present.
    fn selected(&self) -> Option<(u8, usize)> {
        let a = self.address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xFF;
        let devfn = ((a >> 8) & 0xFF) as u8;
        (enabled && bus == 0 && self.functions.contains_key(&devfn))
            .then_some((devfn, (a & 0xFC) as usize))
    }

    /// A configuration read of `data.len()` bytes at register `offset` of `devfn` (absent
    /// functions read all ones).
    pub fn config_read(&mut self, devfn: u8, offset: usize, data: &mut [u8]) {
        match self.functions.get_mut(&devfn) {
            Some(f) => f.config_read(offset, data),
            None => data.fill(0xFF),
        }
    }

    /// A configuration write.
    pub fn config_write(&mut self, devfn: u8, offset: usize, data: &[u8]) {
        if let Some(f) = self.functions.get_mut(&devfn) {
            f.config_write(offset, data);
            self.update_bars(devfn);
        }
    }
}

impl BusDevice for PciBus {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            1 if data.len() == 1 => data[0] = self.reset_control,
            4..=7 => match self.selected() {
                Some((devfn, reg)) => self.config_read(devfn, reg + (offset as usize - 4), data),
                None => data.fill(0xFF),
            },
            _ => data.fill(0xFF),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                // Bits 30-24 are reserved (read 0); bits 1-0 select type 0/1 cycles and read 0
                // on the i440FX.
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.address = v & 0x80FF_FFFC;
            }
            1 if data.len() == 1 => {
                let rising = data[0] & RCR_RST_CPU != 0 && self.reset_control & RCR_RST_CPU == 0;
                // RST_CPU reads back 0 once the reset it started is under way.
                self.reset_control = data[0] & RCR_SRST;
                if rising && let Some(control) = &self.reset {
                    control.request_stop(StopRequest::Reset);
                }
            }
            4..=7 => {
                if let Some((devfn, reg)) = self.selected() {
                    self.config_write(devfn, reg + (offset as usize - 4), data);
                }
            }
            _ => {}
        }
    }
}

/// A [`PciBus`] shared between the configuration ports and the VM.
pub type SharedPciBus = Arc<Mutex<PciBus>>;

/// The configuration ports' bus adapter over a shared [`PciBus`].
pub struct PciConfigPorts(pub SharedPciBus);

impl BusDevice for PciConfigPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(devfn: u8, reg: u32) -> [u8; 4] {
        (0x8000_0000 | (u32::from(devfn) << 8) | reg).to_le_bytes()
    }

    fn read32(bus: &mut PciBus, devfn: u8, reg: u32) -> u32 {
        bus.write(0, &addr(devfn, reg));
        let mut d = [0u8; 4];
        bus.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    fn write32(bus: &mut PciBus, devfn: u8, reg: u32, v: u32) {
        bus.write(0, &addr(devfn, reg));
        bus.write(4, &v.to_le_bytes());
    }

    struct Probe(Arc<Mutex<Vec<u8>>>);
    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 | 0x40);
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.0.lock().unwrap().extend_from_slice(data);
        }
    }

    struct WithBar {
        config: ConfigSpace,
        log: Arc<Mutex<Vec<u8>>>,
    }
    impl PciFunction for WithBar {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.config
        }
        fn bar_device(&self, _: usize) -> Option<Box<dyn BusDevice>> {
            Some(Box::new(Probe(self.log.clone())))
        }
    }

    fn bus_with_bar() -> (PciBus, BarChanges, Arc<Mutex<Vec<u8>>>) {
        let changes = BarChanges::new();
        let mut bus = PciBus::new(changes.clone());
        bus.add(0, 0, Box::new(PlainFunction::i440fx_host_bridge()));
        let mut config = ConfigSpace::new(0x8086, 0x7010, 0x01, 0x01, 0x80, 0);
        config.set_bar(4, Bar::io(16));
        let log = Arc::default();
        bus.add(
            1,
            1,
            Box::new(WithBar {
                config,
                log: Arc::clone(&log),
            }),
        );
        (bus, changes, log)
    }

    #[test]
    fn mechanism_one_reads_ids_and_absent_functions_read_all_ones() {
        let (mut bus, _, _) = bus_with_bar();
        assert_eq!(read32(&mut bus, 0, 0), 0x1237_8086);
        assert_eq!(read32(&mut bus, 0, 8) >> 8, 0x06_00_00);
        assert_eq!(read32(&mut bus, 9, 0), 0x7010_8086);
        assert_eq!(read32(&mut bus, 9, 8) >> 8, 0x01_01_80);
        assert_eq!(read32(&mut bus, 8, 0), 0xFFFF_FFFF, "00:01.0 absent");
        assert_eq!(read32(&mut bus, 3 << 3, 0), 0xFFFF_FFFF);
        // Bus 1 does not exist.
        bus.write(0, &(0x8001_0000u32).to_le_bytes());
        let mut d = [0u8; 4];
        bus.read(4, &mut d);
        assert_eq!(d, [0xFF; 4]);
        // Disabled (bit 31 clear): all ones.
        bus.write(0, &0u32.to_le_bytes());
        bus.read(4, &mut d);
        assert_eq!(d, [0xFF; 4]);
    }

    #[test]
    fn config_address_holds_only_defined_bits_and_only_dword_accesses() {
        let (mut bus, _, _) = bus_with_bar();
        bus.write(0, &0xFFFF_FFFFu32.to_le_bytes());
        let mut d = [0u8; 4];
        bus.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x80FF_FFFC);
        // A byte write to 0xCF8 does not touch CONFIG_ADDRESS.
        bus.write(0, &[0]);
        bus.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x80FF_FFFC);
        let mut b = [0u8; 1];
        bus.read(0, &mut b);
        assert_eq!(b, [0xFF]);
    }

    #[test]
    fn reset_control_at_cf9_resets_on_rst_cpu_rising() {
        let (mut bus, _, _) = bus_with_bar();
        let control = VmControl::new();
        bus.set_reset_control(control.clone());
        bus.write(1, &[RCR_SRST]);
        assert_eq!(
            control.pending(),
            None,
            "SRST alone only selects the reset type"
        );
        let mut b = [0u8; 1];
        bus.read(1, &mut b);
        assert_eq!(b, [RCR_SRST]);
        bus.write(1, &[RCR_SRST | RCR_RST_CPU]);
        assert_eq!(control.pending(), Some(StopRequest::Reset));
        // The dword at 0xCF8 is still CONFIG_ADDRESS.
        bus.write(0, &addr(0, 0));
        let mut d = [0u8; 4];
        bus.read(0, &mut d);
        assert_eq!(d, addr(0, 0));
    }

    #[test]
    fn byte_and_word_data_accesses_hit_the_right_register_bytes() {
        let (mut bus, _, _) = bus_with_bar();
        bus.write(0, &addr(0, 0));
        let mut w = [0u8; 2];
        bus.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1237);
        let mut b = [0u8; 1];
        bus.read(5, &mut b);
        assert_eq!(b, [0x80]);
        // Interrupt line is writable; interrupt pin is not.
        bus.write(0, &addr(9, 0x3C));
        bus.write(4, &[0x0E]);
        bus.write(5, &[0x03]);
        let mut d = [0u8; 4];
        bus.read(4, &mut d);
        assert_eq!(&d[..2], &[0x0E, 0x00]);
    }

    #[test]
    fn bar_size_probing_and_read_only_fields() {
        let (mut bus, _, _) = bus_with_bar();
        write32(&mut bus, 9, 0x20, 0xFFFF_FFFF);
        // 16 ports, I/O, 16-bit decoder: the upper half reads zero.
        assert_eq!(read32(&mut bus, 9, 0x20), 0x0000_FFF1);
        // BARs that do not exist stay zero.
        write32(&mut bus, 9, 0x10, 0xFFFF_FFFF);
        assert_eq!(read32(&mut bus, 9, 0x10), 0);
        write32(&mut bus, 9, 0x20, 0xC041);
        assert_eq!(read32(&mut bus, 9, 0x20), 0xC041);
        // IDs and class are read-only.
        write32(&mut bus, 9, 0, 0);
        assert_eq!(read32(&mut bus, 9, 0), 0x7010_8086);
        write32(&mut bus, 9, 8, 0);
        assert_eq!(read32(&mut bus, 9, 8) >> 8, 0x01_01_80);
        // Command: only defined bits stick.
        write32(&mut bus, 9, 4, 0xFFFF);
        assert_eq!(read32(&mut bus, 9, 4) & 0xFFFF, 0x0547);
    }

    #[test]
    fn io_bars_map_when_enabled_and_move_with_the_bar() {
        let (mut bus, changes, log) = bus_with_bar();
        let mut pio = Bus::new();
        write32(&mut bus, 9, 0x20, 0xC040);
        changes.apply(&mut pio, &mut Bus::new());
        assert!(!pio.write(0xC040, &[1]), "not decoded before COMMAND.IO");
        write32(&mut bus, 9, 4, u32::from(COMMAND_IO | COMMAND_BUS_MASTER));
        assert!(changes.pending());
        changes.apply(&mut pio, &mut Bus::new());
        assert!(pio.write(0xC042, &[7]));
        let mut b = [0u8; 1];
        assert!(pio.read(0xC04F, &mut b));
        assert_eq!(b, [0x4F]);
        write32(&mut bus, 9, 0x20, 0xD001);
        changes.apply(&mut pio, &mut Bus::new());
        assert!(!pio.write(0xC040, &[8]));
        assert!(pio.write(0xD000, &[9]));
        assert_eq!(log.lock().unwrap().as_slice(), &[7, 9]);
        // Disabling I/O decode unmaps it.
        write32(&mut bus, 9, 4, 0);
        changes.apply(&mut pio, &mut Bus::new());
        assert!(!pio.write(0xD000, &[1]));
    }

    #[test]
    fn a_bar_over_another_device_stays_unmapped_and_the_other_survives() {
        let (mut bus, changes, log) = bus_with_bar();
        let mut pio = Bus::new();
        let other = Arc::new(Mutex::new(Vec::new()));
        pio.insert(0x3F8, 8, "uart", Box::new(Probe(other.clone())))
            .unwrap();
        write32(&mut bus, 9, 0x20, 0x3F1);
        write32(&mut bus, 9, 4, u32::from(COMMAND_IO));
        changes.apply(&mut pio, &mut Bus::new());
        assert!(pio.write(0x3F8, &[5]));
        assert_eq!(other.lock().unwrap().as_slice(), &[5]);
        // Moving it away must not unmap the UART.
        write32(&mut bus, 9, 0x20, 0xC001);
        changes.apply(&mut pio, &mut Bus::new());
        assert!(pio.write(0x3F8, &[6]));
        assert!(pio.write(0xC000, &[1]));
        assert_eq!(other.lock().unwrap().as_slice(), &[5, 6]);
        assert_eq!(log.lock().unwrap().as_slice(), &[1]);
    }

    #[test]
    fn the_isa_bridge_is_multifunction() {
        let f = PlainFunction::piix3_isa_bridge();
        assert_eq!(f.config().byte(reg::HEADER_TYPE), 0x80);
        assert_eq!(f.config().byte(reg::CLASS), 0x06);
        assert_eq!(f.config().byte(reg::SUBCLASS), 0x01);
    }
}
