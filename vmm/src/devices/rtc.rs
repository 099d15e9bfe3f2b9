//! The MC146818A real-time clock and CMOS RAM at ports 0x70 (index, bit 7 = NMI disable) and 0x71
//! (data), IRQ 8.
//!
//! Modelled on the Motorola MC146818A data sheet, with the PC's CMOS layout:
//!
//! - time and date registers 0x00-0x09 in BCD or binary and 12- or 24-hour format, as register B
//!   selects, counting from the host's wall clock at power-on (UTC) by host monotonic time;
//!   writes set the clock (the SET bit freezes it while software writes);
//! - register A's update-in-progress flag, high for the last 244 us of every second;
//! - periodic (rate from register A), alarm (with "don't care" values 0xC0-0xFF) and
//!   update-ended interrupts, flagged in register C (cleared by reading it) and signalled on IRQ 8
//!   when enabled in register B;
//! - register D's valid-RAM bit, the century at 0x32 (the offset ACPI's FADT names), and the
//!   memory sizes a BIOS leaves in NVRAM: base memory (0x15-0x16), extended memory up to 64 MiB in
//!   KiB (0x17-0x18 and 0x30-0x31) and memory above 16 MiB in 64 KiB blocks (0x34-0x35).

use std::sync::{Arc, Mutex};

use super::IrqLine;
use super::pit::Clock;
use crate::bus::BusDevice;

/// Index port; data is the next port.
pub const RTC_PORT: u16 = 0x70;
/// ISA IRQ of the RTC.
pub const RTC_IRQ: u8 = 8;

const REG_A: usize = 0x0A;
const REG_B: usize = 0x0B;
const REG_C: usize = 0x0C;
const REG_D: usize = 0x0D;
/// Century register (BCD), as ACPI's FADT `century` field says.
pub const REG_CENTURY: usize = 0x32;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const D_VRT: u8 = 0x80;

const NS_PER_SEC: u64 = 1_000_000_000;
/// How long before each update UIP is set (the data sheet's t_BUC for a 32.768 kHz base).
const UIP_NS: u64 = 244_000;

/// Broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 0 = Sunday.
    weekday: u8,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the "days from civil" construction:
/// years counted from March so the leap day is last).
fn days_from_civil(y: i64, m: u8, d: u8) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            weekday: (days + 4).rem_euclid(7) as u8,
        }
    }

    fn to_unix(self) -> i64 {
        days_from_civil(self.year, self.month.clamp(1, 12), self.day.clamp(1, 31)) * 86_400
            + i64::from(self.hour.min(23)) * 3600
            + i64::from(self.minute.min(59)) * 60
            + i64::from(self.second.min(59))
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0F)
}

/// The clock chip and its 128 bytes of CMOS RAM.
#[derive(Debug, Clone)]
pub struct Rtc {
    index: u8,
    ram: [u8; 128],
    /// Unix time of the clock at `base_ns` on the device clock.
    base_secs: i64,
    base_ns: u64,
    /// While SET is on: the frozen time the guest is editing.
    frozen: Option<i64>,
    /// Device time up to which periodic, update and alarm events have been flagged.
    checked_ns: u64,
}

impl Rtc {
    /// A clock reading `unix_secs` (UTC) at device time `now_ns`, with NVRAM describing `ram_bytes`
    /// of RAM. Registers as a PC BIOS leaves them: 32.768 kHz base with 1024 Hz periodic rate,
    /// BCD, 24-hour mode, no interrupts enabled.
    pub fn new(unix_secs: i64, now_ns: u64, ram_bytes: u64) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A] = 0x26;
        ram[REG_B] = B_24H;
        ram[REG_D] = D_VRT;
        // Base memory: 640 KiB.
        ram[0x15..0x17].copy_from_slice(&640u16.to_le_bytes());
        // Extended memory from 1 MiB, in KiB, saturating at 64 MiB - 1 KiB.
        let ext_kib = (ram_bytes.saturating_sub(1 << 20) >> 10).min(0xFFFF) as u16;
        ram[0x17..0x19].copy_from_slice(&ext_kib.to_le_bytes());
        ram[0x30..0x32].copy_from_slice(&ext_kib.to_le_bytes());
        // Memory above 16 MiB in 64 KiB blocks.
        let high = (ram_bytes.saturating_sub(16 << 20) >> 16).min(0xFFFF) as u16;
        ram[0x34..0x36].copy_from_slice(&high.to_le_bytes());
        Self {
            index: 0,
            ram,
            base_secs: unix_secs,
            base_ns: now_ns,
            frozen: None,
            checked_ns: now_ns,
        }
    }

    fn binary(&self) -> bool {
        self.ram[REG_B] & B_BINARY != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() { v } else { to_bcd(v) }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.binary() { v } else { from_bcd(v) }
    }

    fn encode_hour(&self, h: u8) -> u8 {
        if self.ram[REG_B] & B_24H != 0 {
            return self.encode(h);
        }
        let pm = if h >= 12 { 0x80 } else { 0 };
        let h12 = match h % 12 {
            0 => 12,
            x => x,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.ram[REG_B] & B_24H != 0 {
            return self.decode(v & 0x7F);
        }
        let h12 = self.decode(v & 0x7F) % 12;
        if v & 0x80 != 0 { h12 + 12 } else { h12 }
    }

    /// The clock's time, whole seconds, at `now`.
    fn secs(&self, now: u64) -> i64 {
        match self.frozen {
            Some(s) => s,
            None => self.base_secs + (now.saturating_sub(self.base_ns) / NS_PER_SEC) as i64,
        }
    }

    /// Device time of the next second boundary (the next update) after `now`.
    fn next_update(&self, now: u64) -> u64 {
        let since = now.saturating_sub(self.base_ns);
        self.base_ns + (since / NS_PER_SEC + 1) * NS_PER_SEC
    }

    /// The periodic interrupt's period, if the rate select and divider make one.
    fn period_ns(&self) -> Option<u64> {
        let rs = u32::from(self.ram[REG_A] & 0x0F);
        // Divider 010 (32.768 kHz time base) is the only one that runs the clock.
        if rs == 0 || (self.ram[REG_A] >> 4) & 7 != 2 {
            return None;
        }
        // Rates 1 and 2 repeat rates 8 and 9 with a 32.768 kHz base.
        let rs = if rs < 3 { rs + 7 } else { rs };
        Some((NS_PER_SEC << (rs - 1)) / 32_768)
    }

    fn time_field(&self, index: usize, now: u64) -> u8 {
        let t = DateTime::from_unix(self.secs(now));
        match index {
            0x00 => self.encode(t.second),
            0x02 => self.encode(t.minute),
            0x04 => self.encode_hour(t.hour),
            0x06 => self.encode(t.weekday + 1),
            0x07 => self.encode(t.day),
            0x08 => self.encode(t.month),
            0x09 => self.encode(t.year.rem_euclid(100) as u8),
            _ => self.encode((t.year.div_euclid(100)).clamp(0, 99) as u8),
        }
    }

    fn set_time_field(&mut self, index: usize, value: u8, now: u64) {
        let mut t = DateTime::from_unix(self.secs(now));
        match index {
            0x00 => t.second = self.decode(value),
            0x02 => t.minute = self.decode(value),
            0x04 => t.hour = self.decode_hour(value),
            0x06 => return, // the day of week is derived from the date
            0x07 => t.day = self.decode(value),
            0x08 => t.month = self.decode(value),
            0x09 => t.year = t.year.div_euclid(100) * 100 + i64::from(self.decode(value) % 100),
            _ => t.year = i64::from(self.decode(value)) * 100 + t.year.rem_euclid(100),
        }
        let secs = t.to_unix();
        match &mut self.frozen {
            Some(f) => *f = secs,
            None => {
                // Writing a running clock restarts its current second.
                self.base_secs = secs;
                self.base_ns = now;
            }
        }
    }

    fn alarm_matches(&self, secs: i64) -> bool {
        let t = DateTime::from_unix(secs);
        let check = |alarm: u8, value: u8| alarm >= 0xC0 || alarm == value;
        check(self.ram[0x01], self.encode(t.second))
            && check(self.ram[0x03], self.encode(t.minute))
            && check(self.ram[0x05], self.encode_hour(t.hour))
    }

    /// Flags the periodic, update-ended and alarm events due by `now` in register C. Returns
    /// true when IRQF rises (one IRQ 8 edge).
    pub fn update(&mut self, now: u64) -> bool {
        let from = self.checked_ns;
        if now <= from {
            return false;
        }
        self.checked_ns = now;
        let mut flags = 0;
        if let Some(p) = self.period_ns() {
            // Periodic edges fall on multiples of the period since the last divider reset.
            let rel = |t: u64| t.saturating_sub(self.base_ns);
            if rel(now) / p > rel(from) / p {
                flags |= C_PF;
            }
        }
        if self.frozen.is_none() {
            let first_update = self.next_update(from);
            if first_update <= now {
                flags |= C_UF;
                // The alarm is compared at each update; check every second that passed, up to
                // a day's worth (an alarm with "don't care" fields matches often).
                let updates = ((now - first_update) / NS_PER_SEC + 1).min(86_400);
                let last = self.secs(now);
                if (0..updates as i64).any(|i| self.alarm_matches(last - i)) {
                    flags |= C_AF;
                }
            }
        }
        self.raise_flags(flags)
    }

    fn raise_flags(&mut self, flags: u8) -> bool {
        let old = self.ram[REG_C];
        let mut c = old | flags;
        let enabled = self.ram[REG_B] & (B_PIE | B_AIE | B_UIE);
        if c & enabled & (C_PF | C_AF | C_UF) != 0 {
            c |= C_IRQF;
        }
        self.ram[REG_C] = c;
        c & C_IRQF != 0 && old & C_IRQF == 0
    }

    /// The next device time at which [`Rtc::update`] can raise the interrupt, if an enabled
    /// event is armed and IRQF is not already up (it stays up until register C is read).
    pub fn next_deadline(&self) -> Option<u64> {
        if self.ram[REG_C] & C_IRQF != 0 {
            return None;
        }
        let b = self.ram[REG_B];
        let now = self.checked_ns;
        let mut next = None::<u64>;
        if b & B_PIE != 0
            && let Some(p) = self.period_ns()
        {
            let rel = now.saturating_sub(self.base_ns);
            next = Some(self.base_ns + (rel / p + 1) * p);
        }
        if b & (B_UIE | B_AIE) != 0 && self.frozen.is_none() {
            let u = self.next_update(now);
            next = Some(next.map_or(u, |n| n.min(u)));
        }
        next
    }

    /// A read of the data port (the register the index port selects).
    pub fn read_data(&mut self, now: u64) -> (u8, bool) {
        let index = usize::from(self.index & 0x7F);
        let irq = self.update(now);
        let value = match index {
            0x00 | 0x02 | 0x04 | 0x06..=0x09 | REG_CENTURY => self.time_field(index, now),
            REG_A => {
                let since = now.saturating_sub(self.base_ns) % NS_PER_SEC;
                let uip = self.frozen.is_none() && since >= NS_PER_SEC - UIP_NS;
                (self.ram[REG_A] & !A_UIP) | if uip { A_UIP } else { 0 }
            }
            REG_C => std::mem::take(&mut self.ram[REG_C]),
            _ => self.ram[index],
        };
        (value, irq)
    }

    /// A write to the data port.
    pub fn write_data(&mut self, value: u8, now: u64) -> bool {
        let index = usize::from(self.index & 0x7F);
        let irq = self.update(now);
        match index {
            0x00 | 0x02 | 0x04 | 0x06..=0x09 | REG_CENTURY => {
                self.set_time_field(index, value, now);
            }
            REG_A => {
                let old_divider = (self.ram[REG_A] >> 4) & 7;
                self.ram[REG_A] = value & !A_UIP;
                if old_divider != 2 && (value >> 4) & 7 == 2 {
                    // Leaving divider reset starts the first update half a second later.
                    let secs = self.secs(now);
                    self.base_secs = secs;
                    self.base_ns = now.saturating_sub(NS_PER_SEC / 2);
                }
            }
            REG_B => {
                let was_set = self.ram[REG_B] & B_SET != 0;
                let mut v = value;
                if v & B_SET != 0 {
                    v &= !B_UIE; // SET clears UIE
                    if !was_set {
                        self.frozen = Some(self.secs(now));
                    }
                } else if let Some(secs) = self.frozen.take() {
                    self.base_secs = secs;
                    self.base_ns = now;
                }
                self.ram[REG_B] = v;
                return self.raise_flags(0) || irq;
            }
            REG_C | REG_D => {} // read-only
            _ => self.ram[index] = value,
        }
        irq
    }

    /// A write to the index port.
    pub fn write_index(&mut self, value: u8) {
        self.index = value;
    }
}

/// The RTC's two ports on the bus, reading time from a [`Clock`] and raising IRQ 8.
pub struct RtcPorts {
    rtc: Arc<Mutex<Rtc>>,
    clock: Arc<dyn Clock>,
    irq: IrqLine,
}

impl RtcPorts {
    /// The ports of `rtc`.
    pub fn new(rtc: Arc<Mutex<Rtc>>, clock: Arc<dyn Clock>, irq: IrqLine) -> Self {
        Self { rtc, clock, irq }
    }
}

impl BusDevice for RtcPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let now = self.clock.now_ns();
        let mut raise = false;
        {
            let mut rtc = self.rtc.lock().unwrap_or_else(|e| e.into_inner());
            for (i, b) in data.iter_mut().enumerate() {
                *b = if offset + i as u64 == 1 {
                    let (v, irq) = rtc.read_data(now);
                    raise |= irq;
                    v
                } else {
                    0xFF // the index port is write-only
                };
            }
        }
        if raise {
            self.irq.raise();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let now = self.clock.now_ns();
        let mut raise = false;
        {
            let mut rtc = self.rtc.lock().unwrap_or_else(|e| e.into_inner());
            for (i, b) in data.iter().enumerate() {
                if offset + i as u64 == 0 {
                    rtc.write_index(*b);
                } else {
                    raise |= rtc.write_data(*b, now);
                }
            }
        }
        if raise {
            self.irq.raise();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    /// 2024-02-29 23:59:58 UTC, a Thursday.
    const LEAP: i64 = 1_709_251_198;

    fn read(rtc: &mut Rtc, index: u8, now: u64) -> u8 {
        rtc.write_index(index);
        rtc.read_data(now).0
    }

    fn write(rtc: &mut Rtc, index: u8, value: u8, now: u64) -> bool {
        rtc.write_index(index);
        rtc.write_data(value, now)
    }

    #[test]
    fn calendar_conversions_round_trip() {
        for secs in [
            0,
            LEAP,
            951_782_400, /* 2000-02-29 */
            4_102_444_800,
            -86_400,
        ] {
            assert_eq!(DateTime::from_unix(secs).to_unix(), secs);
        }
        let t = DateTime::from_unix(LEAP);
        assert_eq!((t.year, t.month, t.day, t.weekday), (2024, 2, 29, 4));
        assert_eq!(
            DateTime::from_unix(0).weekday,
            4,
            "1970-01-01 was a Thursday"
        );
    }

    #[test]
    fn reads_the_time_in_bcd_24h_and_rolls_over_a_leap_day() {
        let mut rtc = Rtc::new(LEAP, 0, 256 << 20);
        assert_eq!(read(&mut rtc, 0x00, 0), 0x58);
        assert_eq!(read(&mut rtc, 0x02, 0), 0x59);
        assert_eq!(read(&mut rtc, 0x04, 0), 0x23);
        assert_eq!(
            read(&mut rtc, 0x06, 0),
            0x05,
            "Thursday is day 5 (Sunday = 1)"
        );
        assert_eq!(read(&mut rtc, 0x07, 0), 0x29);
        assert_eq!(read(&mut rtc, 0x08, 0), 0x02);
        assert_eq!(read(&mut rtc, 0x09, 0), 0x24);
        assert_eq!(read(&mut rtc, 0x32, 0), 0x20);
        let t = 2 * NS_PER_SEC + MS;
        assert_eq!(read(&mut rtc, 0x00, t), 0x00);
        assert_eq!(read(&mut rtc, 0x04, t), 0x00);
        assert_eq!(read(&mut rtc, 0x07, t), 0x01);
        assert_eq!(read(&mut rtc, 0x08, t), 0x03);
    }

    #[test]
    fn binary_and_12_hour_modes_follow_register_b() {
        let mut rtc = Rtc::new(LEAP, 0, 256 << 20);
        write(&mut rtc, 0x0B, B_BINARY, 0); // binary, 12-hour
        assert_eq!(read(&mut rtc, 0x04, 0), 0x80 | 11, "23h is 11 PM");
        assert_eq!(read(&mut rtc, 0x00, 0), 58);
        assert_eq!(read(&mut rtc, 0x09, 0), 24);
        write(&mut rtc, 0x0B, 0, 0); // BCD, 12-hour
        assert_eq!(read(&mut rtc, 0x04, 0), 0x91);
        // Midnight reads as 12 AM.
        let t = 2 * NS_PER_SEC;
        assert_eq!(read(&mut rtc, 0x04, t), 0x12);
    }

    #[test]
    fn set_bit_freezes_the_clock_while_software_writes_it() {
        let mut rtc = Rtc::new(LEAP, 0, 256 << 20);
        write(&mut rtc, 0x0B, B_SET | B_24H, 0);
        write(&mut rtc, 0x09, 0x99, 0);
        write(&mut rtc, 0x08, 0x12, 0);
        write(&mut rtc, 0x07, 0x31, 0);
        write(&mut rtc, 0x04, 0x23, 0);
        write(&mut rtc, 0x02, 0x59, 0);
        write(&mut rtc, 0x00, 0x59, 0);
        write(&mut rtc, 0x32, 0x19, 0);
        // Frozen: five seconds later it still reads what was written.
        assert_eq!(read(&mut rtc, 0x00, 5 * NS_PER_SEC), 0x59);
        assert_eq!(read(&mut rtc, 0x0A, 5 * NS_PER_SEC) & A_UIP, 0);
        write(&mut rtc, 0x0B, B_24H, 5 * NS_PER_SEC);
        let t = 6 * NS_PER_SEC + MS;
        assert_eq!(read(&mut rtc, 0x09, t), 0x00, "1999 rolled into 2000");
        assert_eq!(read(&mut rtc, 0x32, t), 0x20);
        assert_eq!(read(&mut rtc, 0x08, t), 0x01);
        assert_eq!(read(&mut rtc, 0x06, t), 0x07, "2000-01-01 was a Saturday");
    }

    #[test]
    fn update_in_progress_is_set_just_before_each_second() {
        let mut rtc = Rtc::new(LEAP, 0, 256 << 20);
        assert_eq!(read(&mut rtc, 0x0A, 500 * MS), 0x26);
        assert_eq!(read(&mut rtc, 0x0A, NS_PER_SEC - 100_000), 0x26 | A_UIP);
        assert_eq!(read(&mut rtc, 0x0A, NS_PER_SEC + 1000), 0x26);
    }

    #[test]
    fn periodic_interrupt_at_1024_hz_needs_register_c_read_to_rearm() {
        let mut rtc = Rtc::new(LEAP, 0, 256 << 20);
        assert_eq!(rtc.next_deadline(), None, "nothing enabled");
        write(&mut rtc, 0x0B, B_24H | B_PIE, 0);
        let period = NS_PER_SEC / 1024;
        assert_eq!(rtc.next_deadline(), Some(period));
        assert!(!rtc.update(period - 1));
        assert!(rtc.update(period), "IRQF rises");
        assert!(!rtc.update(3 * period), "IRQF stays up until C is read");
        assert_eq!(rtc.next_deadline(), None);
        let c = read(&mut rtc, 0x0C, 3 * period);
        assert_eq!(c & (C_IRQF | C_PF), C_IRQF | C_PF);
        assert_eq!(read(&mut rtc, 0x0C, 3 * period), 0, "reading C cleared it");
        assert_eq!(rtc.next_deadline(), Some(4 * period));
        assert!(rtc.update(4 * period));
        // Rate 15 is 2 Hz.
        read(&mut rtc, 0x0C, 4 * period);
        write(&mut rtc, 0x0A, 0x2F, 4 * period);
        assert_eq!(rtc.next_deadline(), Some(NS_PER_SEC / 2));
    }

    #[test]
    fn flags_without_enables_raise_no_interrupt() {
        // 22:59:58: the alarm registers (00:00:00) do not match in the next seconds.
        let mut rtc = Rtc::new(LEAP - 3600, 0, 256 << 20);
        assert!(!rtc.update(3 * NS_PER_SEC));
        let c = read(&mut rtc, 0x0C, 3 * NS_PER_SEC);
        assert_eq!(c, C_PF | C_UF, "events are flagged, IRQF is not");
        // At midnight the alarm matches, enabled or not (the data sheet sets AF regardless).
        rtc.update(7200 * NS_PER_SEC);
        assert_eq!(read(&mut rtc, 0x0C, 7200 * NS_PER_SEC) & C_AF, C_AF);
    }

    #[test]
    fn update_ended_and_alarm_interrupts() {
        let mut rtc = Rtc::new(LEAP, 0, 256 << 20);
        write(&mut rtc, 0x0B, B_24H | B_UIE, 0);
        assert_eq!(rtc.next_deadline(), Some(NS_PER_SEC));
        assert!(rtc.update(NS_PER_SEC));
        assert_eq!(
            read(&mut rtc, 0x0C, NS_PER_SEC) & (C_IRQF | C_UF | C_AF),
            C_IRQF | C_UF
        );

        // Alarm at 00:00:05 (hours "don't care"): LEAP is 23:59:58, so 7 s later.
        write(&mut rtc, 0x0B, B_24H | B_AIE, NS_PER_SEC);
        write(&mut rtc, 0x01, 0x05, NS_PER_SEC);
        write(&mut rtc, 0x03, 0x00, NS_PER_SEC);
        write(&mut rtc, 0x05, 0xC0, NS_PER_SEC);
        for s in 2..7 {
            assert!(!rtc.update(s * NS_PER_SEC), "no alarm at +{s} s");
            read(&mut rtc, 0x0C, s * NS_PER_SEC);
        }
        assert!(rtc.update(7 * NS_PER_SEC));
        assert_eq!(read(&mut rtc, 0x0C, 7 * NS_PER_SEC) & C_AF, C_AF);
    }

    #[test]
    fn nvram_reports_memory_and_keeps_what_is_written() {
        let mut rtc = Rtc::new(0, 0, 256 << 20);
        let word = |rtc: &mut Rtc, i: u8| {
            u16::from(read(rtc, i, 0)) | (u16::from(read(rtc, i + 1, 0)) << 8)
        };
        assert_eq!(word(&mut rtc, 0x15), 640);
        assert_eq!(word(&mut rtc, 0x17), 0xFFFF, "saturates above 64 MiB");
        assert_eq!(word(&mut rtc, 0x30), 0xFFFF);
        assert_eq!(word(&mut rtc, 0x34), (240 << 20 >> 16) as u16);
        assert_eq!(read(&mut rtc, 0x0D, 0), D_VRT);
        let mut small = Rtc::new(0, 0, 32 << 20);
        assert_eq!(word(&mut small, 0x17), 31 * 1024);
        assert_eq!(word(&mut small, 0x34), 256);
        write(&mut rtc, 0x40, 0xAB, 0);
        assert_eq!(read(&mut rtc, 0x40, 0), 0xAB);
        // The NMI-disable bit in the index does not change the register selected.
        write(&mut rtc, 0x80 | 0x40, 0xCD, 0);
        assert_eq!(read(&mut rtc, 0x40, 0), 0xCD);
        write(&mut rtc, 0x0D, 0, 0);
        assert_eq!(read(&mut rtc, 0x0D, 0), D_VRT, "register D is read-only");
    }

    #[test]
    fn ports_raise_irq8_once_per_rising_irqf() {
        struct Fixed(std::sync::atomic::AtomicU64);
        impl Clock for Fixed {
            fn now_ns(&self) -> u64 {
                self.0.load(std::sync::atomic::Ordering::Relaxed)
            }
        }
        let clock = Arc::new(Fixed(0.into()));
        let rtc = Arc::new(Mutex::new(Rtc::new(LEAP, 0, 256 << 20)));
        let irq = IrqLine::new(RTC_IRQ);
        let mut ports = RtcPorts::new(rtc.clone(), clock.clone(), irq.clone());
        ports.write(0, &[0x0B]);
        ports.write(1, &[B_24H | B_PIE]);
        clock
            .0
            .store(NS_PER_SEC, std::sync::atomic::Ordering::Relaxed);
        ports.write(0, &[0x0C]);
        let mut c = [0u8];
        ports.read(1, &mut c);
        assert_eq!(irq.raised(), 1);
        assert_eq!(c[0] & C_IRQF, C_IRQF);
    }
}
