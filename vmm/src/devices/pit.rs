//! The 8254 programmable interval timer (ports 0x40-0x43) and system control port B (0x61),
//! clocked at 1.193182 MHz from the VM's monotonic clock.
//!
//! Channel 0 drives IRQ 0, channel 2's gate and output are wired to port 0x61 (the speaker,
//! and how Linux calibrates the TSC). Counters are computed from elapsed time, not ticked: a
//! channel remembers when it was loaded, and its count and OUT are derived on every access, as
//! the data sheet's waveforms describe them for modes 0-5.

use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;

/// The PIT's input clock.
pub const PIT_HZ: u64 = 1_193_182;
/// Base port of the counters (0x40-0x42) and the control word (0x43).
pub const PIT_PORT: u16 = 0x40;
/// System control port B.
pub const PORT_B: u16 = 0x61;

/// Monotonic time for devices, in nanoseconds since the VM started.
pub trait Clock: Send + Sync {
    /// Nanoseconds since an arbitrary fixed start.
    fn now_ns(&self) -> u64;
}

/// The host's monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct HostClock {
    start: std::time::Instant,
}

impl HostClock {
    /// A clock starting at zero now.
    pub fn new() -> Self {
        Self {
            start: std::time::Instant::now(),
        }
    }
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for HostClock {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

fn ns_to_ticks(ns: u64) -> u64 {
    super::clock::scale(ns, PIT_HZ, 1_000_000_000)
}

fn ticks_to_ns(ticks: u64) -> u64 {
    super::clock::scale_ceil(ticks, 1_000_000_000, PIT_HZ)
}

#[derive(Debug, Clone, Default)]
struct Channel {
    /// Reload value, 1..=65536 (a written 0 means 65536).
    count: u64,
    mode: u8,
    /// Access: 1 LSB only, 2 MSB only, 3 LSB then MSB.
    rw: u8,
    bcd: bool,
    gate: bool,
    /// When counting (re)started, in ns; None before a count is written (or a trigger arrives).
    start_ns: Option<u64>,
    /// Ticks already counted when the gate froze the counter (modes 0 and 4).
    frozen_ticks: Option<u64>,
    latch: Option<u16>,
    /// Whether the next latched/live read returns the MSB (LSB-then-MSB access).
    read_msb: bool,
    /// The LSB written so far in LSB-then-MSB access.
    write_lsb: Option<u8>,
    status: Option<u8>,
    null_count: bool,
}

impl Channel {
    fn ticks(&self, now: u64) -> Option<u64> {
        if let Some(f) = self.frozen_ticks {
            return Some(f);
        }
        self.start_ns.map(|s| ns_to_ticks(now.saturating_sub(s)))
    }

    /// The counting element's value.
    fn value(&self, now: u64) -> u16 {
        let Some(d) = self.ticks(now) else {
            return self.count as u16;
        };
        let c = self.count;
        let v = match self.mode {
            2 => c - d % c,
            3 => (c - (2 * d) % c) & 0xFFFF,
            _ => c.wrapping_sub(d) & 0xFFFF,
        };
        v as u16
    }

    /// The OUT pin.
    fn out(&self, now: u64) -> bool {
        let Some(d) = self.ticks(now) else {
            // Mode 0 drives OUT low when the control word is written; the others high.
            return self.mode != 0;
        };
        let c = self.count;
        match self.mode {
            0 | 1 => d >= c,
            2 => d == 0 || d % c != c - 1,
            3 => d % c < c.div_ceil(2),
            _ => d != c,
        }
    }

    /// Time of the first rising edge of OUT strictly after `after` ns, if OUT will rise.
    fn next_rise(&self, after: u64) -> Option<u64> {
        let start = self.start_ns?;
        if self.frozen_ticks.is_some() || !self.gate {
            return None;
        }
        let d = ns_to_ticks(after.saturating_sub(start));
        let c = self.count;
        let tick = match self.mode {
            0 | 1 => (d < c).then_some(c)?,
            // Mode 2 rises again one tick after each terminal count; mode 3 at each period.
            2 => (d / c + 1) * c,
            3 => (d / c + 1) * c,
            4 | 5 => (d < c + 1).then_some(c + 1)?,
            _ => return None,
        };
        Some(start + ticks_to_ns(tick))
    }

    fn status_byte(&self, now: u64) -> u8 {
        (u8::from(self.out(now)) << 7)
            | (u8::from(self.null_count) << 6)
            | (self.rw << 4)
            | (self.mode << 1)
            | u8::from(self.bcd)
    }

    fn write_count(&mut self, v: u8, now: u64) {
        let full = match self.rw {
            1 => Some(u16::from(v)),
            2 => Some(u16::from(v) << 8),
            _ => match self.write_lsb.take() {
                None => {
                    self.write_lsb = Some(v);
                    None
                }
                Some(lsb) => Some(u16::from(lsb) | (u16::from(v) << 8)),
            },
        };
        if let Some(c) = full {
            self.count = if c == 0 { 0x1_0000 } else { u64::from(c) };
            self.null_count = false;
            self.frozen_ticks = None;
            // Modes 1 and 5 wait for a gate trigger; the others start now (if gated on).
            self.start_ns = match self.mode {
                1 | 5 => None,
                _ => Some(now),
            };
            if !self.gate && matches!(self.mode, 0 | 4) {
                self.frozen_ticks = Some(0);
            }
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        if let Some(s) = self.status.take() {
            return s;
        }
        let v = match self.latch {
            Some(l) => l,
            None => self.value(now),
        };
        let byte = match self.rw {
            1 => v as u8,
            2 => (v >> 8) as u8,
            _ => {
                let b = if self.read_msb {
                    (v >> 8) as u8
                } else {
                    v as u8
                };
                self.read_msb = !self.read_msb;
                b
            }
        };
        if self.latch.is_some() && (self.rw != 3 || !self.read_msb) {
            self.latch = None;
        }
        byte
    }

    fn set_gate(&mut self, high: bool, now: u64) {
        let rising = high && !self.gate;
        let falling = !high && self.gate;
        self.gate = high;
        match self.mode {
            0 | 4 => {
                if falling {
                    self.frozen_ticks = self.ticks(now);
                } else if rising && let Some(f) = self.frozen_ticks.take() {
                    self.start_ns = Some(now.saturating_sub(ticks_to_ns(f)));
                }
            }
            _ => {
                if rising {
                    self.start_ns = Some(now);
                    self.frozen_ticks = None;
                } else if falling && matches!(self.mode, 2 | 3) {
                    self.start_ns = None;
                }
            }
        }
    }
}

/// The three counters, port B, and the IRQ 0 bookkeeping.
#[derive(Debug, Clone)]
pub struct Pit {
    channels: [Channel; 3],
    port_b: u8,
    /// Time up to which channel 0's rising edges have been delivered.
    irq_checked_ns: u64,
    ticks_delivered: u64,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// Counters in their power-on state: gates 0 and 1 high, nothing counting.
    pub fn new() -> Self {
        let mut channels: [Channel; 3] = Default::default();
        for (i, c) in channels.iter_mut().enumerate() {
            c.gate = i != 2;
            c.rw = 3;
            c.count = 0x1_0000;
        }
        Self {
            channels,
            port_b: 0,
            irq_checked_ns: 0,
            ticks_delivered: 0,
        }
    }

    /// Advances to `now`: returns true if channel 0's OUT rose since the last call (one IRQ 0
    /// edge, however many periods passed: an overdue timer does not replay its backlog).
    pub fn update(&mut self, now: u64) -> bool {
        let from = self.irq_checked_ns;
        self.irq_checked_ns = now.max(from);
        match self.channels[0].next_rise(from) {
            Some(t) if t <= now => {
                self.ticks_delivered += 1;
                true
            }
            _ => false,
        }
    }

    /// When channel 0's OUT next rises after the last [`Pit::update`], if it will.
    pub fn next_deadline(&self) -> Option<u64> {
        self.channels[0].next_rise(self.irq_checked_ns)
    }

    /// IRQ 0 edges delivered so far.
    pub fn ticks_delivered(&self) -> u64 {
        self.ticks_delivered
    }

    fn control(&mut self, v: u8, now: u64) {
        let sel = (v >> 6) as usize;
        if sel == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear latches status.
            for ch in 0..3 {
                if v & (2 << ch) == 0 {
                    continue;
                }
                let c = &mut self.channels[ch];
                if v & 0x10 == 0 && c.status.is_none() {
                    c.status = Some(c.status_byte(now));
                }
                if v & 0x20 == 0 && c.latch.is_none() {
                    c.latch = Some(c.value(now));
                    c.read_msb = false;
                }
            }
            return;
        }
        let c = &mut self.channels[sel];
        let rw = (v >> 4) & 3;
        if rw == 0 {
            if c.latch.is_none() {
                c.latch = Some(c.value(now));
                c.read_msb = false;
            }
            return;
        }
        let mode = (v >> 1) & 7;
        c.mode = if mode >= 6 { mode - 4 } else { mode };
        c.rw = rw;
        c.bcd = v & 1 != 0;
        c.start_ns = None;
        c.frozen_ticks = None;
        c.latch = None;
        c.status = None;
        c.read_msb = false;
        c.write_lsb = None;
        c.null_count = true;
    }

    fn port_b_read(&self, now: u64) -> u8 {
        // Bit 4 toggles with each DRAM refresh (every 15.085 us); bit 5 is OUT2.
        let refresh = (now / 15_085) & 1 == 1;
        (self.port_b & 0x0F) | (u8::from(refresh) << 4) | (u8::from(self.channels[2].out(now)) << 5)
    }

    fn port_b_write(&mut self, v: u8, now: u64) {
        self.port_b = v & 0x0F;
        self.channels[2].set_gate(v & 1 != 0, now);
    }
}

/// Bus adapter: the PIT's ports or port B, reading time from a [`Clock`].
pub struct PitPorts {
    pit: Arc<Mutex<Pit>>,
    clock: Arc<dyn Clock>,
    port_b: bool,
}

impl PitPorts {
    /// The counter/control ports (0x40-0x43) of `pit`.
    pub fn counters(pit: Arc<Mutex<Pit>>, clock: Arc<dyn Clock>) -> Self {
        Self {
            pit,
            clock,
            port_b: false,
        }
    }

    /// Port B (0x61) of `pit`.
    pub fn port_b(pit: Arc<Mutex<Pit>>, clock: Arc<dyn Clock>) -> Self {
        Self {
            pit,
            clock,
            port_b: true,
        }
    }
}

impl BusDevice for PitPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let now = self.clock.now_ns();
        let mut pit = self.pit.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset as usize + i;
            *b = if self.port_b {
                pit.port_b_read(now)
            } else if off < 3 {
                pit.channels[off].read(now)
            } else {
                0xFF // the control word is write-only
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let now = self.clock.now_ns();
        let mut pit = self.pit.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in data.iter().enumerate() {
            let off = offset as usize + i;
            if self.port_b {
                pit.port_b_write(*b, now);
            } else if off < 3 {
                pit.channels[off].write_count(*b, now);
            } else if off == 3 {
                pit.control(*b, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nanoseconds for `ticks` PIT clocks.
    fn t(ticks: u64) -> u64 {
        ticks_to_ns(ticks)
    }

    fn program(p: &mut Pit, ch: u8, mode: u8, count: u16, now: u64) {
        p.control((ch << 6) | 0x30 | (mode << 1), now);
        p.channels[ch as usize].write_count(count as u8, now);
        p.channels[ch as usize].write_count((count >> 8) as u8, now);
    }

    fn read16(p: &mut Pit, ch: usize, now: u64) -> u16 {
        let lo = p.channels[ch].read(now);
        let hi = p.channels[ch].read(now);
        u16::from_le_bytes([lo, hi])
    }

    #[test]
    fn mode2_interrupts_once_per_period() {
        let mut p = Pit::new();
        program(&mut p, 0, 2, 1193, 0); // ~1 kHz
        assert!(!p.update(t(100)));
        assert!(p.update(t(1193)), "terminal count reached");
        assert!(!p.update(t(1193)), "one edge per period");
        assert!(!p.update(t(2000)));
        assert!(p.update(t(2386)));
        assert_eq!(p.next_deadline(), Some(t(3579)));
        // A late check delivers one edge, not the backlog.
        assert!(p.update(t(100 * 1193)));
        assert!(!p.update(t(100 * 1193 + 1)));
        assert_eq!(p.ticks_delivered(), 3);
    }

    #[test]
    fn counts_read_back_through_a_latch() {
        let mut p = Pit::new();
        program(&mut p, 0, 2, 1000, 0);
        p.control(0x00, t(300)); // latch channel 0
        assert_eq!(read16(&mut p, 0, t(900)), 700, "latched at 300 ticks");
        assert_eq!(
            read16(&mut p, 0, t(900)),
            100,
            "live again after the latch was read"
        );
    }

    #[test]
    fn mode0_out_rises_at_terminal_count_and_the_gate_pauses_it() {
        let mut p = Pit::new();
        // Channel 2, gate high through port B: the Linux TSC-calibration sequence.
        p.port_b_write(0x01, 0);
        program(&mut p, 2, 0, 100, 0);
        assert_eq!(p.port_b_read(t(50)) & 0x20, 0, "OUT2 low while counting");
        assert_ne!(
            p.port_b_read(t(100)) & 0x20,
            0,
            "OUT2 high at terminal count"
        );
        // Pause half way with the gate, resume, and the terminal count moves out.
        let a = t(1000);
        program(&mut p, 2, 0, 100, a);
        p.port_b_write(0x00, a + t(50));
        assert_eq!(
            read16(&mut p, 2, a + t(5000)),
            50,
            "frozen while the gate is low"
        );
        let b = a + t(5000);
        p.port_b_write(0x01, b);
        assert_eq!(p.port_b_read(b + t(49)) & 0x20, 0);
        assert_ne!(p.port_b_read(b + t(50)) & 0x20, 0);
    }

    #[test]
    fn mode3_square_wave_counts_by_two() {
        let mut p = Pit::new();
        program(&mut p, 0, 3, 100, 0);
        assert!(p.channels[0].out(t(10)));
        assert!(!p.channels[0].out(t(60)), "low in the second half");
        assert_eq!(read16(&mut p, 0, t(10)), 80);
        assert!(p.update(t(100)));
    }

    #[test]
    fn read_back_latches_status_then_count() {
        let mut p = Pit::new();
        program(&mut p, 1, 2, 18, 0);
        p.control(0xC4, t(5)); // read-back, count and status, channel 1
        let status = p.channels[1].read(t(9));
        assert_eq!(status & 0x3F, 0x34, "lsb/msb, mode 2, binary");
        assert_eq!(read16(&mut p, 1, t(9)), 13);
    }

    #[test]
    fn a_zero_count_means_65536_and_lsb_only_access_works() {
        let mut p = Pit::new();
        program(&mut p, 0, 2, 0, 0);
        assert_eq!(p.next_deadline(), Some(t(65536)));
        p.control(0x14, 0); // channel 0, LSB only, mode 2
        p.channels[0].write_count(50, 0);
        assert_eq!(p.channels[0].count, 50);
        assert_eq!(p.channels[0].read(t(10)), 40);
    }

    #[test]
    fn mode0_before_a_count_keeps_out_low_and_never_interrupts() {
        let mut p = Pit::new();
        p.control(0x30, 0); // channel 0, mode 0, no count yet
        assert!(!p.channels[0].out(t(10)));
        assert_eq!(p.next_deadline(), None);
        assert!(!p.update(t(1_000_000)));
    }

    #[test]
    fn bus_adapter_uses_the_clock() {
        struct Fixed(u64);
        impl Clock for Fixed {
            fn now_ns(&self) -> u64 {
                self.0
            }
        }
        let pit = Arc::new(Mutex::new(Pit::new()));
        let mut ports = PitPorts::counters(pit.clone(), Arc::new(Fixed(0)));
        ports.write(3, &[0x34]);
        ports.write(0, &[0x10]);
        ports.write(0, &[0x00]);
        let mut later = PitPorts::counters(pit, Arc::new(Fixed(t(6))));
        let mut b = [0u8; 2];
        later.read(0, &mut b[..1]);
        later.read(0, &mut b[1..]);
        assert_eq!(u16::from_le_bytes(b), 10);
    }
}
