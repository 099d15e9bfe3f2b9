//! The CPU's local APIC (xAPIC, version 0x14 as on the Pentium M), memory-mapped at
//! IA32_APIC_BASE (0xFEE00000 after reset), as the Intel SDM vol. 3A chapter 10 describes it.
//!
//! Modelled: the ID, version, TPR/APR/PPR, EOI, LDR/DFR, the spurious-vector register and the
//! software enable, ISR/TMR/IRR with priority classes, the error status register, the ICR (fixed
//! and lowest-priority IPIs to this CPU: self-IPIs, the shorthands, physical, broadcast and
//! logical destinations), and the six LVT entries: the timer (one-shot and periodic, the divide
//! configuration, its current count computed from the VM's monotonic clock), thermal and
//! performance-counter entries (no source: the CPU has no thermal sensor and its counters do not
//! count), LINT0 (ExtINT: the 8259's INTR, the "virtual wire"), LINT1 (NMI; nothing drives it)
//! and the error entry.
//!
//! The timer counts the bus clock, [`APIC_BUS_HZ`], through the divider. Time is passed in as
//! nanoseconds since the VM started; the model does no I/O.

/// The local APIC's timer input clock (a 100 MHz front-side bus, a Pentium M's).
pub const APIC_BUS_HZ: u64 = 100_000_000;
/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1B;
/// IA32_APIC_BASE's global enable bit.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
/// IA32_APIC_BASE's bootstrap-processor flag.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// The bits IA32_APIC_BASE holds with 32 physical address bits; setting any other is #GP.
const APIC_BASE_WRITABLE: u64 = 0xFFFF_F000 | APIC_BASE_ENABLE | APIC_BASE_BSP;
/// Version register: version 0x14 (xAPIC), six LVT entries (max LVT index 5).
const VERSION: u32 = 0x0005_0014;

const LVT_TIMER: usize = 0;
const LVT_THERMAL: usize = 1;
const LVT_PERF: usize = 2;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
const LVT_ERROR: usize = 5;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
/// Per-entry writable bits: vector, delivery mode, polarity, trigger, mask, timer mode.
const LVT_WRITABLE: [u32; 6] = [
    0x0003_00FF, // timer: vector, mask, periodic
    0x0001_07FF, // thermal: vector, delivery mode, mask
    0x0001_07FF, // performance counters
    0x0001_A7FF, // LINT0: vector, delivery mode, polarity, trigger, mask
    0x0001_A7FF, // LINT1
    0x0001_00FF, // error: vector, mask
];
const DELIVERY_EXTINT: u32 = 0b111;
const SVR_ENABLE: u32 = 1 << 8;
/// ESR: a fixed interrupt was received with a vector below 16.
const ESR_RECEIVE_ILLEGAL: u32 = 1 << 6;
/// ESR: a fixed IPI was sent with a vector below 16.
const ESR_SEND_ILLEGAL: u32 = 1 << 5;

/// A 256-bit vector register (ISR, TMR, IRR).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Bits256([u32; 8]);

impl Bits256 {
    fn get(&self, v: u8) -> bool {
        self.0[usize::from(v >> 5)] & (1 << (v & 31)) != 0
    }
    fn set(&mut self, v: u8, on: bool) {
        let w = &mut self.0[usize::from(v >> 5)];
        if on {
            *w |= 1 << (v & 31);
        } else {
            *w &= !(1 << (v & 31));
        }
    }
    fn highest(&self) -> Option<u8> {
        (0..8).rev().find_map(|i| {
            let w = self.0[i];
            (w != 0).then(|| (i as u32 * 32 + 31 - w.leading_zeros()) as u8)
        })
    }
}

/// An IPI or message that leaves the local APIC: what the VM must do about a register write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LapicEvent {
    /// An EOI for a level-triggered vector: the IOAPICs clear their remote IRR for it.
    EoiBroadcast(u8),
}

/// The local APIC's state.
#[derive(Debug, Clone)]
pub struct LocalApic {
    base: u64,
    id: u8,
    tpr: u8,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: Bits256,
    tmr: Bits256,
    irr: Bits256,
    /// Errors latched since the last ESR write, and the value the last write made visible.
    esr_pending: u32,
    esr: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; 6],
    divide: u32,
    initial_count: u32,
    /// When the current count was last loaded from the initial count.
    timer_start: u64,
    /// When the timer next reaches zero, while it runs.
    timer_deadline: Option<u64>,
    /// Periodic timer interrupts that fell due while the previous one was still pending (the
    /// host did not run the VM in time): delivered one at a time as the guest takes them, so
    /// a guest counting ticks keeps time (VMware's timer catch-up).
    missed_ticks: u64,
}

/// The most periodic ticks kept for catch-up.
const MAX_MISSED_TICKS: u64 = 1000;

impl LocalApic {
    /// The bootstrap processor's APIC after reset: enabled at the default base, software
    /// disabled. LINT0 is preset to ExtINT, unmasked, as the BIOS of a PC leaves it (QEMU presets
    /// it the same way) so that the 8259 reaches the CPU until an OS takes over the APIC.
    pub fn new() -> Self {
        let mut apic = Self {
            base: u64::from(crate::platform::LAPIC_BASE) | APIC_BASE_ENABLE | APIC_BASE_BSP,
            id: 0,
            tpr: 0,
            ldr: 0,
            dfr: 0xFFFF_FFFF,
            svr: 0xFF,
            isr: Bits256::default(),
            tmr: Bits256::default(),
            irr: Bits256::default(),
            esr_pending: 0,
            esr: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [LVT_MASKED; 6],
            divide: 0,
            initial_count: 0,
            timer_start: 0,
            timer_deadline: None,
            missed_ticks: 0,
        };
        apic.lvt[LVT_LINT0] = DELIVERY_EXTINT << 8;
        apic
    }

    /// The APIC ID.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// IA32_APIC_BASE.
    pub fn base_msr(&self) -> u64 {
        self.base
    }

    /// Writes IA32_APIC_BASE. Returns false (the WRMSR raises #GP) if a reserved bit is set.
    /// Clearing the global enable puts the APIC in its reset state (the CPU then behaves as one
    /// without an APIC); setting it again brings it back in that state, as on the Pentium 4 and
    /// later (SDM 10.4.3).
    pub fn write_base_msr(&mut self, value: u64) -> bool {
        if value & !APIC_BASE_WRITABLE != 0 {
            return false;
        }
        let was_enabled = self.enabled();
        let value = (value & !APIC_BASE_BSP) | (self.base & APIC_BASE_BSP);
        if was_enabled && value & APIC_BASE_ENABLE == 0 {
            let id = self.id;
            *self = Self::new();
            self.id = id;
            self.lvt[LVT_LINT0] = LVT_MASKED;
        }
        self.base = value;
        true
    }

    /// Whether the APIC is globally enabled (IA32_APIC_BASE bit 11).
    pub fn enabled(&self) -> bool {
        self.base & APIC_BASE_ENABLE != 0
    }

    /// The guest-physical base of the register page while the APIC is enabled.
    pub fn mmio_base(&self) -> Option<u64> {
        self.enabled().then_some(self.base & 0xFFFF_F000)
    }

    fn software_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// Whether the 8259's INTR reaches the CPU: the APIC is globally disabled (INTR is then
    /// the CPU's own pin), or LINT0 is an unmasked ExtINT entry.
    pub fn pic_routed(&self) -> bool {
        let lint0 = self.lvt[LVT_LINT0];
        !self.enabled() || (lint0 & LVT_MASKED == 0 && (lint0 >> 8) & 7 == DELIVERY_EXTINT)
    }

    fn ppr(&self) -> u8 {
        let isrv = self.isr.highest().unwrap_or(0);
        if self.tpr >> 4 >= isrv >> 4 {
            self.tpr
        } else {
            isrv & 0xF0
        }
    }

    /// Accepts a fixed interrupt from the bus (an IOAPIC message, an IPI) or a local source:
    /// sets its IRR bit, and its TMR bit if level-triggered.
    pub fn accept(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            self.error(ESR_RECEIVE_ILLEGAL);
            return;
        }
        self.irr.set(vector, true);
        self.tmr.set(vector, level);
    }

    fn error(&mut self, bits: u32) {
        let new = bits & !self.esr_pending != 0;
        self.esr_pending |= bits;
        let lvt = self.lvt[LVT_ERROR];
        if new && lvt & LVT_MASKED == 0 {
            let v = lvt as u8;
            if v >= 16 {
                self.irr.set(v, true);
                self.tmr.set(v, false);
            }
        }
    }

    /// The vector the CPU would take next, if one is deliverable: the highest IRR vector whose
    /// priority class is above the processor priority.
    pub fn pending(&self) -> Option<u8> {
        if !self.enabled() || !self.software_enabled() {
            return None;
        }
        let v = self.irr.highest()?;
        (v >> 4 > self.ppr() >> 4).then_some(v)
    }

    /// The CPU's interrupt acknowledge: the pending vector moves from IRR to ISR.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let v = self.pending()?;
        self.irr.set(v, false);
        self.isr.set(v, true);
        Some(v)
    }

    fn eoi(&mut self) -> Option<LapicEvent> {
        let v = self.isr.highest()?;
        self.isr.set(v, false);
        self.tmr.get(v).then_some(LapicEvent::EoiBroadcast(v))
    }

    fn divisor(&self) -> u64 {
        let code = ((self.divide & 0x8) >> 1) | (self.divide & 0x3);
        1 << ((code + 1) & 7)
    }

    /// One count of the timer in nanoseconds (the divisor, at most 128, times the bus
    /// clock's 10 ns: 64-bit arithmetic throughout).
    fn tick_ns(&self) -> u64 {
        self.divisor() * 1_000_000_000 / APIC_BUS_HZ
    }

    fn periodic(&self) -> bool {
        self.lvt[LVT_TIMER] & LVT_PERIODIC != 0
    }

    fn period_ns(&self) -> u64 {
        u64::from(self.initial_count) * self.tick_ns()
    }

    /// The timer's current count at `now`.
    pub fn current_count(&self, now: u64) -> u32 {
        if self.initial_count == 0 {
            return 0;
        }
        let elapsed = now.saturating_sub(self.timer_start) / self.tick_ns();
        let initial = u64::from(self.initial_count);
        if self.periodic() {
            (initial - elapsed % initial) as u32
        } else if elapsed >= initial {
            0
        } else {
            (initial - elapsed) as u32
        }
    }

    /// When the timer next fires, if it is running and unmasked (a masked timer counts but
    /// cannot interrupt, so nothing need wake for it).
    pub fn next_deadline(&self) -> Option<u64> {
        if self.lvt[LVT_TIMER] & LVT_MASKED != 0 {
            return None;
        }
        if self.missed_ticks > 0 && !self.timer_vector_busy() {
            return Some(0);
        }
        self.timer_deadline
    }

    /// Whether the timer's vector is still requested or in service.
    fn timer_vector_busy(&self) -> bool {
        let v = self.lvt[LVT_TIMER] as u8;
        self.irr.get(v) || self.isr.get(v)
    }

    /// Advances the timer to `now`: sets the timer vector's IRR bit if it reached zero (once,
    /// however many periods went by). Returns whether it fired.
    pub fn update(&mut self, now: u64) -> bool {
        let lvt = self.lvt[LVT_TIMER];
        let mut fired = false;
        if self.missed_ticks > 0 && lvt & LVT_MASKED == 0 && !self.timer_vector_busy() {
            self.missed_ticks -= 1;
            self.accept(lvt as u8, false);
            fired = true;
        }
        let Some(deadline) = self.timer_deadline else {
            return fired;
        };
        if now < deadline {
            return fired;
        }
        let period = self.period_ns();
        self.timer_deadline = if self.periodic() && period > 0 {
            let behind = (now - deadline) / period;
            Some(deadline + (behind + 1) * period)
        } else {
            None
        };
        let mut due = 1;
        if self.periodic() && period > 0 {
            // Keep the count's phase: the timer reloaded at the last deadline passed.
            self.timer_start = deadline + (now - deadline) / period * period;
            due += (now - deadline) / period;
        }
        if lvt & LVT_MASKED != 0 {
            return fired;
        }
        if self.timer_vector_busy() || fired {
            self.missed_ticks = (self.missed_ticks + due).min(MAX_MISSED_TICKS);
        } else {
            self.accept(lvt as u8, false);
            self.missed_ticks = (self.missed_ticks + due - 1).min(MAX_MISSED_TICKS);
        }
        if !self.periodic() {
            self.missed_ticks = 0;
        }
        true
    }

    fn start_timer(&mut self, now: u64) {
        self.timer_start = now;
        self.missed_ticks = 0;
        self.timer_deadline = (self.initial_count != 0).then(|| now + self.period_ns());
    }

    fn lvt_index(offset: u32) -> Option<usize> {
        match offset {
            0x320 => Some(LVT_TIMER),
            0x330 => Some(LVT_THERMAL),
            0x340 => Some(LVT_PERF),
            0x350 => Some(LVT_LINT0),
            0x360 => Some(LVT_LINT1),
            0x370 => Some(LVT_ERROR),
            _ => None,
        }
    }

    /// Reads the 32-bit register at `offset` (a multiple of 16) in the register page.
    pub fn read(&self, offset: u32, now: u64) -> u32 {
        let bank = |b: &Bits256, base: u32| b.0[((offset - base) >> 4) as usize];
        match offset {
            0x20 => u32::from(self.id) << 24,
            0x30 => VERSION,
            0x80 => u32::from(self.tpr),
            // APR: with no lowest-priority arbitration among CPUs, the PPR's value.
            0x90 | 0xA0 => u32::from(self.ppr()),
            0xD0 => self.ldr,
            0xE0 => self.dfr,
            0xF0 => self.svr,
            0x100..=0x170 => bank(&self.isr, 0x100),
            0x180..=0x1F0 => bank(&self.tmr, 0x180),
            0x200..=0x270 => bank(&self.irr, 0x200),
            0x280 => self.esr,
            0x300 => self.icr_low & !(1 << 12), // delivery status: always idle
            0x310 => self.icr_high,
            0x380 => self.initial_count,
            0x390 => self.current_count(now),
            0x3E0 => self.divide,
            _ => match Self::lvt_index(offset) {
                Some(i) => self.lvt[i],
                None => 0,
            },
        }
    }

    /// Writes the 32-bit register at `offset`. Returns what the write sends outside the APIC.
    pub fn write(&mut self, offset: u32, value: u32, now: u64) -> Option<LapicEvent> {
        match offset {
            0x20 => self.id = (value >> 24) as u8,
            0x80 => self.tpr = value as u8,
            0xB0 => return self.eoi(),
            0xD0 => self.ldr = value & 0xFF00_0000,
            0xE0 => self.dfr = value | 0x0FFF_FFFF,
            0xF0 => {
                self.svr = value & 0x3FF;
                if !self.software_enabled() {
                    for l in &mut self.lvt {
                        *l |= LVT_MASKED;
                    }
                }
            }
            0x280 => {
                self.esr = self.esr_pending;
                self.esr_pending = 0;
            }
            0x300 => {
                self.icr_low = value & 0x000C_CFFF;
                self.send_ipi();
            }
            0x310 => self.icr_high = value & 0xFF00_0000,
            0x380 => {
                self.initial_count = value;
                self.start_timer(now);
            }
            0x3E0 => {
                // Keep the current count; count on at the new rate from here.
                let count = self.current_count(now);
                self.divide = value & 0xB;
                if self.timer_deadline.is_some() {
                    let done = u64::from(self.initial_count - count);
                    let back = done * self.tick_ns();
                    self.timer_start = now.saturating_sub(back);
                    self.timer_deadline = Some(self.timer_start + self.period_ns());
                }
            }
            _ => {
                if let Some(i) = Self::lvt_index(offset) {
                    let mut v = value & LVT_WRITABLE[i];
                    if !self.software_enabled() {
                        v |= LVT_MASKED;
                    }
                    self.lvt[i] = v;
                }
            }
        }
        None
    }

    /// Whether this APIC is a destination of a message for `dest` in logical (`logical`) or
    /// physical mode.
    pub fn matches(&self, dest: u8, logical: bool) -> bool {
        if logical {
            // Flat model (DFR 0xF): a bit mask; cluster model: cluster in the high nibble.
            if self.dfr >> 28 == 0xF {
                dest & (self.ldr >> 24) as u8 != 0
            } else {
                let ldr = (self.ldr >> 24) as u8;
                (dest >> 4 == 0xF || dest >> 4 == ldr >> 4) && dest & ldr & 0xF != 0
            }
        } else {
            dest == 0xFF || dest == self.id
        }
    }

    fn send_ipi(&mut self) {
        let low = self.icr_low;
        let vector = low as u8;
        let mode = (low >> 8) & 7;
        let to_self = match (low >> 18) & 3 {
            0 => self.matches((self.icr_high >> 24) as u8, low & (1 << 11) != 0),
            1 | 2 => true,
            _ => false, // all excluding self: there is no other CPU
        };
        match mode {
            0 | 1 => {
                if vector < 16 {
                    self.error(ESR_SEND_ILLEGAL);
                } else if to_self {
                    self.accept(vector, false);
                }
            }
            // INIT level de-assert: a synchronisation message with no effect on this CPU.
            5 if low & (1 << 14) == 0 && low & (1 << 15) != 0 => {}
            _ if !to_self => {}
            _ => tracing::warn!(
                "the guest sent itself an IPI with delivery mode {mode:#b} (NMI, SMI, INIT or \
                 start-up), which bt86 does not deliver"
            ),
        }
    }
}

impl Default for LocalApic {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> LocalApic {
        let mut a = LocalApic::new();
        a.write(0xF0, 0x1FF, 0);
        a
    }

    #[test]
    fn reset_state_passes_the_8259_through_lint0() {
        let a = LocalApic::new();
        assert_eq!(a.base_msr(), 0xFEE0_0900);
        assert_eq!(a.read(0x30, 0), 0x0005_0014);
        assert_eq!(a.read(0xF0, 0), 0xFF);
        assert!(a.pic_routed());
        assert_eq!(a.read(0x320, 0), LVT_MASKED);
    }

    #[test]
    fn software_disabled_apic_delivers_nothing_and_masks_lvts() {
        let mut a = LocalApic::new();
        a.accept(0x40, false);
        assert_eq!(a.pending(), None);
        a.write(0x320, 0x30, 0);
        assert_eq!(a.read(0x320, 0) & LVT_MASKED, LVT_MASKED, "mask stays set");
        a.write(0xF0, 0x1FF, 0);
        assert_eq!(a.pending(), Some(0x40));
    }

    #[test]
    fn priority_classes_tpr_and_eoi() {
        let mut a = enabled();
        a.accept(0x35, false);
        a.accept(0x51, false);
        assert_eq!(a.acknowledge(), Some(0x51));
        // 0x35's class (3) is below the in-service class (5).
        assert_eq!(a.pending(), None);
        assert_eq!(a.read(0xA0, 0), 0x50, "PPR is the ISR's class");
        a.accept(0x58, false);
        assert_eq!(
            a.pending(),
            None,
            "same class as the in-service vector waits"
        );
        assert_eq!(a.write(0xB0, 0, 0), None);
        assert_eq!(a.acknowledge(), Some(0x58));
        a.write(0xB0, 0, 0);
        // TPR 0x40 blocks class 3 and 4, not 5.
        a.write(0x80, 0x40, 0);
        assert_eq!(a.pending(), None);
        a.accept(0x4F, false);
        assert_eq!(a.pending(), None);
        a.accept(0x50, false);
        assert_eq!(a.pending(), Some(0x50));
        a.write(0x80, 0, 0);
        assert_eq!(a.acknowledge(), Some(0x50));
        a.write(0xB0, 0, 0);
        assert_eq!(a.acknowledge(), Some(0x4F));
        a.write(0xB0, 0, 0);
        assert_eq!(a.acknowledge(), Some(0x35));
    }

    #[test]
    fn eoi_of_a_level_vector_is_broadcast() {
        let mut a = enabled();
        a.accept(0x61, true);
        assert_eq!(a.read(0x180 + 0x30, 0), 1 << 1, "TMR bit of 0x61");
        assert_eq!(a.acknowledge(), Some(0x61));
        assert_eq!(a.read(0x100 + 0x30, 0), 1 << 1, "ISR bit of 0x61");
        assert_eq!(a.write(0xB0, 0, 0), Some(LapicEvent::EoiBroadcast(0x61)));
    }

    #[test]
    fn one_shot_timer_counts_down_at_the_divided_bus_clock_and_fires_once() {
        let mut a = enabled();
        a.write(0x3E0, 0xB, 0); // divide by 1: 10 ns a tick
        a.write(0x320, 0x40, 0);
        a.write(0x380, 1000, 0);
        assert_eq!(a.read(0x390, 5_000), 500);
        assert_eq!(a.next_deadline(), Some(10_000));
        assert!(!a.update(9_999));
        assert!(a.update(10_000));
        assert_eq!(a.read(0x390, 20_000), 0);
        assert_eq!(a.next_deadline(), None);
        assert!(!a.update(50_000));
        assert_eq!(a.acknowledge(), Some(0x40));
    }

    #[test]
    fn periodic_timer_reloads_and_divider_codes_work() {
        let mut a = enabled();
        a.write(0x3E0, 0x3, 0); // divide by 16: 160 ns a tick
        a.write(0x320, LVT_PERIODIC | 0x41, 0);
        a.write(0x380, 100, 0); // 16 us
        assert_eq!(a.read(0x390, 8_000), 50);
        assert!(a.update(16_000));
        assert_eq!(a.next_deadline(), Some(32_000));
        assert_eq!(a.acknowledge(), Some(0x41));
        a.write(0xB0, 0, 16_000);
        // Three periods late (due at 32, 48 and 64 us): one interrupt now, the next deadline on
        // the period grid, and the two missed ticks delivered as the guest takes each one.
        assert!(a.update(70_000));
        assert_eq!(a.read(0x390, 72_000), 50);
        assert_eq!(a.acknowledge(), Some(0x41));
        assert!(!a.update(71_000), "the tick is in service");
        assert_ne!(a.next_deadline(), Some(0));
        a.write(0xB0, 0, 71_000);
        assert_eq!(a.next_deadline(), Some(0), "a missed tick is due at once");
        assert!(a.update(71_000));
        assert_eq!(a.acknowledge(), Some(0x41));
        a.write(0xB0, 0, 71_000);
        assert!(a.update(71_000));
        assert_eq!(a.acknowledge(), Some(0x41));
        a.write(0xB0, 0, 71_000);
        assert!(!a.update(71_000), "caught up");
        assert_eq!(a.next_deadline(), Some(80_000));
        a.write(0x380, 0, 72_000);
        assert_eq!(a.next_deadline(), None, "initial count 0 stops the timer");
    }

    #[test]
    fn self_ipi_shorthands_and_destinations() {
        let mut a = enabled();
        a.write(0x300, (1 << 18) | 0x70, 0); // self
        a.write(0x300, (3 << 18) | 0x71, 0); // all excluding self
        a.write(0x310, 0, 0);
        a.write(0x300, 0x72, 0); // physical, APIC ID 0
        a.write(0x310, 5 << 24, 0);
        a.write(0x300, 0x73, 0); // physical, APIC ID 5: not us
        a.write(0xD0, 1 << 24, 0);
        a.write(0x310, 1 << 24, 0);
        a.write(0x300, (1 << 11) | 0x74, 0); // logical flat, bit 0
        let mut got = Vec::new();
        while let Some(v) = a.acknowledge() {
            got.push(v);
            a.write(0xB0, 0, 0);
        }
        assert_eq!(got, [0x74, 0x72, 0x70]);
    }

    #[test]
    fn illegal_vectors_set_the_esr_and_raise_the_error_lvt() {
        let mut a = enabled();
        a.write(0x370, 0xFE, 0);
        a.accept(3, false);
        a.write(0x280, 0, 0);
        assert_eq!(a.read(0x280, 0), ESR_RECEIVE_ILLEGAL);
        assert_eq!(a.acknowledge(), Some(0xFE));
    }

    #[test]
    fn apic_base_msr_disables_relocates_and_rejects_reserved_bits() {
        let mut a = enabled();
        assert!(!a.write_base_msr(0xFEE0_0900 | (1 << 32)));
        assert!(a.write_base_msr(0xFED0_0800));
        assert_eq!(a.mmio_base(), Some(0xFED0_0000));
        assert_eq!(a.base_msr(), 0xFED0_0900, "BSP flag is read-only");
        assert!(a.write_base_msr(0xFEE0_0100));
        assert_eq!(a.mmio_base(), None);
        assert!(a.pic_routed(), "INTR goes straight to the CPU");
        a.accept(0x40, false);
        assert_eq!(a.pending(), None);
        assert!(a.write_base_msr(0xFEE0_0900));
        assert_eq!(a.read(0xF0, 0), 0xFF, "re-enabled in the reset state");
        assert!(
            !a.pic_routed(),
            "LINT0 is masked after the APIC was disabled"
        );
    }
}
