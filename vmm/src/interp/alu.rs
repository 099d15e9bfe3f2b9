//! Integer arithmetic with the exact EFLAGS results of a P6, for operand sizes of 8, 16 and 32
//! bits. Each function returns the result (truncated to the size) and the new EFLAGS; flags an
//! instruction leaves unchanged are copied from `flags`. Where the manuals call a flag undefined
//! the value chosen is the one QEMU and current Intel parts produce (AF=0 after logic and shifts).

use crate::cpu::flags::{AF, ARITH, CF, OF, PF, SF, ZF};

/// Operand size in bits.
pub type Bits = u32;

fn mask(bits: Bits) -> u32 {
    if bits == 32 {
        u32::MAX
    } else {
        (1 << bits) - 1
    }
}

fn sign(bits: Bits) -> u32 {
    1 << (bits - 1)
}

/// PF, ZF and SF of a result.
fn szp(r: u32, bits: Bits) -> u32 {
    let mut f = 0;
    if (r as u8).count_ones().is_multiple_of(2) {
        f |= PF;
    }
    if r & mask(bits) == 0 {
        f |= ZF;
    }
    if r & sign(bits) != 0 {
        f |= SF;
    }
    f
}

fn set(cond: bool, flag: u32) -> u32 {
    if cond { flag } else { 0 }
}

/// ADD / ADC (`carry` = CF for ADC).
pub fn add(a: u32, b: u32, carry: bool, bits: Bits, flags: u32) -> (u32, u32) {
    let m = mask(bits);
    let wide = u64::from(a & m) + u64::from(b & m) + u64::from(carry);
    let r = wide as u32 & m;
    let f = szp(r, bits)
        | set(wide > u64::from(m), CF)
        | set((a ^ r) & (b ^ r) & sign(bits) != 0, OF)
        | set((a ^ b ^ r) & 0x10 != 0, AF);
    (r, (flags & !ARITH) | f)
}

/// SUB / SBB / CMP (`borrow` = CF for SBB).
pub fn sub(a: u32, b: u32, borrow: bool, bits: Bits, flags: u32) -> (u32, u32) {
    let m = mask(bits);
    let (a, b) = (a & m, b & m);
    let r = a.wrapping_sub(b).wrapping_sub(u32::from(borrow)) & m;
    let f = szp(r, bits)
        | set(u64::from(a) < u64::from(b) + u64::from(borrow), CF)
        | set((a ^ b) & (a ^ r) & sign(bits) != 0, OF)
        | set((a ^ b ^ r) & 0x10 != 0, AF);
    (r, (flags & !ARITH) | f)
}

/// AND / OR / XOR / TEST: CF = OF = 0.
pub fn logic(r: u32, bits: Bits, flags: u32) -> (u32, u32) {
    let r = r & mask(bits);
    (r, (flags & !ARITH) | szp(r, bits))
}

/// INC: like ADD 1, but CF is kept.
pub fn inc(a: u32, bits: Bits, flags: u32) -> (u32, u32) {
    let (r, f) = add(a, 1, false, bits, flags);
    (r, (f & !CF) | (flags & CF))
}

/// DEC: like SUB 1, but CF is kept.
pub fn dec(a: u32, bits: Bits, flags: u32) -> (u32, u32) {
    let (r, f) = sub(a, 1, false, bits, flags);
    (r, (f & !CF) | (flags & CF))
}

/// NEG: 0 - a; CF is set unless a is 0.
pub fn neg(a: u32, bits: Bits, flags: u32) -> (u32, u32) {
    sub(0, a, false, bits, flags)
}

/// The shift and rotate group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shift {
    /// ROL.
    Rol,
    /// ROR.
    Ror,
    /// SHL / SAL.
    Shl,
    /// SHR.
    Shr,
    /// SAR.
    Sar,
}

/// Shifts or rotates `a` by `count` (masked to 5 bits, as on every IA-32 since the 80286).
/// A masked count of 0 changes nothing, flags included.
pub fn shift(op: Shift, a: u32, count: u32, bits: Bits, flags: u32) -> (u32, u32) {
    let m = mask(bits);
    let a = a & m;
    let count = count & 0x1F;
    if count == 0 {
        return (a, flags);
    }
    let msb = |v: u32| v & sign(bits) != 0;
    match op {
        Shift::Rol | Shift::Ror => {
            let n = count % bits;
            let r = if n == 0 {
                a
            } else if op == Shift::Rol {
                ((a << n) | (a >> (bits - n))) & m
            } else {
                ((a >> n) | (a << (bits - n))) & m
            };
            let (cf, of) = if op == Shift::Rol {
                let cf = r & 1 != 0;
                (cf, msb(r) ^ cf)
            } else {
                (msb(r), msb(r) ^ (r & (sign(bits) >> 1) != 0))
            };
            (r, (flags & !(CF | OF)) | set(cf, CF) | set(of, OF))
        }
        Shift::Shl => {
            let wide = u64::from(a) << count;
            let r = wide as u32 & m;
            let cf = (wide >> bits) & 1 != 0;
            let f = szp(r, bits) | set(cf, CF) | set(msb(r) ^ cf, OF);
            (r, (flags & !ARITH) | f)
        }
        Shift::Shr => {
            let cf = (u64::from(a) >> (count - 1)) & 1 != 0;
            let r = (u64::from(a) >> count) as u32;
            let f = szp(r, bits) | set(cf, CF) | set(msb(a), OF);
            (r, (flags & !ARITH) | f)
        }
        Shift::Sar => {
            let signed = i64::from(((a << (32 - bits)) as i32) >> (32 - bits));
            let cf = (signed >> (count - 1)) & 1 != 0;
            let r = (signed >> count) as u32 & m;
            let f = szp(r, bits) | set(cf, CF);
            (r, (flags & !ARITH) | f)
        }
    }
}

/// RCL / RCR: rotate through CF. The masked count is taken modulo size+1 for 8- and 16-bit
/// operands. OF is computed as the SDM specifies for 1-bit rotates (and the same formula
/// otherwise, where it is undefined).
pub fn rotate_carry(left: bool, a: u32, count: u32, bits: Bits, flags: u32) -> (u32, u32) {
    let m = mask(bits);
    let a = a & m;
    let masked = count & 0x1F;
    let n = if bits < 32 {
        masked % (bits + 1)
    } else {
        masked
    };
    // A full turn of CF:a moves nothing; like QEMU, leave every flag alone (OF is undefined).
    if n == 0 {
        return (a, flags);
    }
    let msb = |v: u32| v & sign(bits) != 0;
    let cf_in = flags & CF != 0;
    // Rotate the (bits+1)-bit quantity CF:a.
    let wide = (u64::from(cf_in) << bits) | u64::from(a);
    let width = u64::from(bits) + 1;
    let full = (1u64 << width) - 1;
    let n64 = u64::from(n);
    let rotated = if left {
        ((wide << n64) | (wide >> (width - n64))) & full
    } else {
        ((wide >> n64) | (wide << (width - n64))) & full
    };
    let r = rotated as u32 & m;
    let cf = (rotated >> bits) & 1 != 0;
    let of = if left { msb(r) ^ cf } else { msb(a) ^ cf_in };
    (r, (flags & !(CF | OF)) | set(cf, CF) | set(of, OF))
}

/// SHLD (`left`) / SHRD: shifts `a`, filling from `b`. 16-bit counts above 16 shift the 48-bit
/// pattern a:b:a, as Intel processors do (the result is undefined in the manuals).
pub fn double_shift(left: bool, a: u32, b: u32, count: u32, bits: Bits, flags: u32) -> (u32, u32) {
    let m = mask(bits);
    let (a, b) = (a & m, b & m);
    let c = count & 0x1F;
    if c == 0 {
        return (a, flags);
    }
    let msb = |v: u32| v & sign(bits) != 0;
    let (r, cf) = if bits == 32 {
        if left {
            let x = (u64::from(a) << 32) | u64::from(b);
            (((x << c) >> 32) as u32, (x >> (64 - c)) & 1 != 0)
        } else {
            let x = (u64::from(b) << 32) | u64::from(a);
            ((x >> c) as u32, (x >> (c - 1)) & 1 != 0)
        }
    } else if left {
        // a:b:a, most significant first.
        let x = (u64::from(a) << 32) | (u64::from(b) << 16) | u64::from(a);
        (((x << c) >> 32) as u32 & m, (x >> (48 - c)) & 1 != 0)
    } else {
        // a:b:a, least significant first.
        let x = u64::from(a) | (u64::from(b) << 16) | (u64::from(a) << 32);
        ((x >> c) as u32 & m, (x >> (c - 1)) & 1 != 0)
    };
    let f = szp(r, bits) | set(cf, CF) | set(msb(r) ^ msb(a), OF);
    (r, (flags & !ARITH) | f)
}

/// The decimal-adjust group, on AL (and AH for the ASCII adjusts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bcd {
    /// DAA.
    Daa,
    /// DAS.
    Das,
    /// AAA.
    Aaa,
    /// AAS.
    Aas,
}

/// DAA/DAS/AAA/AAS on AX (the SDM's pseudo-code). Returns the new AX and EFLAGS.
pub fn bcd_adjust(op: Bcd, ax: u16, flags: u32) -> (u16, u32) {
    let al = ax as u8;
    let ah = (ax >> 8) as u8;
    let af_in = flags & AF != 0;
    let cf_in = flags & CF != 0;
    match op {
        Bcd::Daa | Bcd::Das => {
            let mut r = al;
            let mut cf = false;
            let mut af = false;
            if al & 0xF > 9 || af_in {
                let (v, carry) = if op == Bcd::Daa {
                    al.overflowing_add(6)
                } else {
                    al.overflowing_sub(6)
                };
                r = v;
                cf = cf_in || carry;
                af = true;
            }
            if al > 0x99 || cf_in {
                r = if op == Bcd::Daa {
                    r.wrapping_add(0x60)
                } else {
                    r.wrapping_sub(0x60)
                };
                cf = true;
            }
            let f = szp(u32::from(r), 8) | set(cf, CF) | set(af, AF);
            ((u16::from(ah) << 8) | u16::from(r), (flags & !ARITH) | f)
        }
        Bcd::Aaa | Bcd::Aas => {
            let adjust = al & 0xF > 9 || af_in;
            let ax = if !adjust {
                ax
            } else if op == Bcd::Aaa {
                ax.wrapping_add(0x106)
            } else {
                let ax = ax.wrapping_sub(6);
                ((u16::from((ax >> 8) as u8).wrapping_sub(1)) << 8) | (ax & 0xFF)
            };
            let ax = ax & 0xFF0F;
            let f = szp(u32::from(ax as u8), 8) | set(adjust, CF) | set(adjust, AF);
            (ax, (flags & !ARITH) | f)
        }
    }
}

/// Evaluates condition code `cc` (the low nibble of Jcc/SETcc/CMOVcc opcodes) against `flags`.
pub fn condition(cc: u8, flags: u32) -> bool {
    let f = |bit| flags & bit != 0;
    let base = match cc >> 1 {
        0 => f(OF),
        1 => f(CF),
        2 => f(ZF),
        3 => f(CF) || f(ZF),
        4 => f(SF),
        5 => f(PF),
        6 => f(SF) != f(OF),
        _ => f(ZF) || (f(SF) != f(OF)),
    };
    base != (cc & 1 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::flags::FIXED;

    const F: u32 = FIXED;

    #[test]
    fn add_sets_carry_overflow_and_aux() {
        assert_eq!(add(0xFF, 1, false, 8, F), (0, F | CF | ZF | PF | AF));
        assert_eq!(add(0x7F, 1, false, 8, F), (0x80, F | OF | SF | AF));
        assert_eq!(add(0xFFFF_FFFF, 0, true, 32, F), (0, F | CF | ZF | PF | AF));
        assert_eq!(add(0x1234, 0x1111, false, 16, F).0, 0x2345);
    }

    #[test]
    fn sub_and_cmp_borrow() {
        assert_eq!(sub(0, 1, false, 8, F), (0xFF, F | CF | SF | PF | AF));
        assert_eq!(sub(0x80, 1, false, 8, F), (0x7F, F | OF | AF));
        assert_eq!(sub(5, 5, false, 32, F), (0, F | ZF | PF));
        assert_eq!(sub(5, 4, true, 32, F), (0, F | ZF | PF));
        assert_eq!(sub(5, 5, true, 32, F).1 & CF, CF);
    }

    #[test]
    fn inc_dec_keep_carry() {
        assert_eq!(inc(0xFF, 8, F | CF), (0, F | CF | ZF | PF | AF));
        assert_eq!(dec(0, 32, F), (0xFFFF_FFFF, F | SF | PF | AF));
    }

    #[test]
    fn logic_clears_carry_and_overflow() {
        assert_eq!(logic(0x80, 8, F | CF | OF | AF), (0x80, F | SF));
        assert_eq!(logic(0x1_0000, 16, F), (0, F | ZF | PF));
    }

    #[test]
    fn neg_of_zero_clears_carry() {
        assert_eq!(neg(0, 32, F | CF), (0, F | ZF | PF));
        assert_eq!(neg(1, 32, F).1 & CF, CF);
        assert_eq!(neg(0x80, 8, F), (0x80, F | CF | OF | SF));
    }

    #[test]
    fn shifts_and_rotates() {
        assert_eq!(shift(Shift::Shl, 0x80, 1, 8, F), (0, F | CF | ZF | PF | OF));
        assert_eq!(shift(Shift::Shr, 0x81, 1, 8, F), (0x40, F | CF | OF));
        assert_eq!(shift(Shift::Sar, 0x80, 7, 8, F), (0xFF, F | SF | PF));
        assert_eq!(shift(Shift::Sar, 0x8000_0000, 31, 32, F).0, 0xFFFF_FFFF);
        assert_eq!(shift(Shift::Rol, 0x8000_0001, 4, 32, F), (0x18, F));
        assert_eq!(shift(Shift::Rol, 0x8000_0000, 1, 32, F), (1, F | CF | OF));
        assert_eq!(shift(Shift::Ror, 1, 1, 8, F), (0x80, F | CF | OF));
        // 8-bit rotate by 8: value unchanged, CF from the result.
        assert_eq!(shift(Shift::Rol, 0x81, 8, 8, F), (0x81, F | CF));
        // Count masked to 5 bits: 32 means 0, nothing changes.
        assert_eq!(shift(Shift::Shl, 1, 32, 32, F | OF), (1, F | OF));
        // 8-bit shift past the width.
        assert_eq!(shift(Shift::Shl, 0xFF, 9, 8, F).0, 0);
    }

    #[test]
    fn rotates_through_carry() {
        assert_eq!(rotate_carry(true, 0x80, 1, 8, F), (0, F | CF | OF));
        assert_eq!(rotate_carry(true, 0, 1, 8, F | CF), (1, F));
        assert_eq!(rotate_carry(false, 1, 1, 8, F), (0, F | CF));
        assert_eq!(rotate_carry(false, 0, 1, 8, F | CF), (0x80, F | OF));
        // 8-bit by 9 is a full turn of CF:a: nothing moves, flags keep CF.
        assert_eq!(rotate_carry(true, 0x5A, 9, 8, F | CF), (0x5A, F | CF));
        assert_eq!(rotate_carry(true, 0x8000_0000, 1, 32, F).0, 0);
        assert_eq!(rotate_carry(false, 0x1234, 0, 16, F | OF), (0x1234, F | OF));
    }

    #[test]
    fn double_shifts() {
        assert_eq!(
            double_shift(true, 0x1234_5678, 0x9ABC_DEF0, 8, 32, F).0,
            0x3456_789A
        );
        assert_eq!(
            double_shift(false, 0x1234_5678, 0x9ABC_DEF0, 8, 32, F).0,
            0xF012_3456
        );
        let (r, f) = double_shift(true, 0x8000_0000, 0, 1, 32, F);
        assert_eq!((r, f & (CF | OF | ZF)), (0, CF | OF | ZF));
        assert_eq!(double_shift(true, 0x1234, 0xABCD, 4, 16, F).0, 0x234A);
        assert_eq!(double_shift(false, 0x1234, 0xABCD, 4, 16, F).0, 0xD123);
        assert_eq!(double_shift(true, 7, 7, 0, 32, F | CF), (7, F | CF));
    }

    #[test]
    fn decimal_adjusts() {
        // 0x19 + 0x28 = 0x41 with AF: DAA gives 0x47.
        assert_eq!(bcd_adjust(Bcd::Daa, 0x41, F | AF), (0x47, F | AF | PF));
        // 0x99 + 0x01 = 0x9A: DAA gives 0x00 with CF.
        assert_eq!(bcd_adjust(Bcd::Daa, 0x9A, F).0, 0x00);
        assert_ne!(bcd_adjust(Bcd::Daa, 0x9A, F).1 & CF, 0);
        // 0x47 - 0x28 = 0x1F with AF: DAS gives 0x19.
        assert_eq!(bcd_adjust(Bcd::Das, 0x1F, F | AF).0, 0x19);
        // '9' + '5' = 0x6E: AAA gives AX = 0x0104.
        assert_eq!(bcd_adjust(Bcd::Aaa, 0x006E, F), (0x0104, F | AF | CF));
        // AAS after 0x03 - 0x08 = 0xFB with AF: AX 0x01FB -> 0x0005.
        assert_eq!(bcd_adjust(Bcd::Aas, 0x01FB, F | AF).0, 0x0005);
        assert_eq!(bcd_adjust(Bcd::Aaa, 0x0005, F), (0x0005, F | PF));
    }

    #[test]
    fn conditions() {
        assert!(condition(0x4, ZF)); // E
        assert!(!condition(0x5, ZF)); // NE
        assert!(condition(0x2, CF)); // B
        assert!(condition(0x6, ZF)); // BE
        assert!(condition(0xC, SF)); // L
        assert!(!condition(0xC, SF | OF));
        assert!(condition(0xF, 0)); // G
        assert!(!condition(0xF, ZF));
    }
}
