//! Instruction groups that need more than a line in [`Interp::execute`]: string instructions
//! with their REP prefixes, bit tests and scans, exchanges, stack frames, decimal adjusts,
//! LOOP/JCXZ and BOUND.

use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};
use vmdriver::IoHandler;

use super::alu::{self, Bcd};
use super::{Fault, Interp, Step, gp0, seg_of, unsupported, vector};
use crate::cpu::{SegReg, flags};
use vmdriver::RegionKind;

impl Interp {
    /// Value of the register sized like operand `size` bytes of the accumulator (AL/AX/EAX).
    fn accumulator(&self, size: u32) -> u32 {
        match size {
            1 => self.cpu.gpr[0] & 0xFF,
            2 => self.cpu.gpr[0] & 0xFFFF,
            _ => self.cpu.gpr[0],
        }
    }

    fn set_accumulator(&mut self, size: u32, v: u32) {
        let r = match size {
            1 => Register::AL,
            2 => Register::AX,
            _ => Register::EAX,
        };
        self.set_reg(r, v);
    }

    /// Adds `delta` to general register `n` within an address size of `mask`.
    fn bump(&mut self, n: usize, delta: u32, mask: u32) {
        let g = &mut self.cpu.gpr[n];
        *g = (*g & !mask) | (g.wrapping_add(delta) & mask);
    }

    /// MOVS, STOS, LODS, CMPS, SCAS, INS, OUTS, with REP/REPE/REPNE.
    ///
    /// Each iteration updates ESI/EDI/ECX only after its memory accesses succeed, so a fault in
    /// the middle leaves the registers describing the work left and EIP on the instruction: the
    /// restart carries on where it stopped, as on the CPU.
    pub(super) fn string_op(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        use Mnemonic as M;
        let kinds = [ins.op0_kind(), ins.op1_kind()];
        let a32 = kinds
            .iter()
            .any(|k| matches!(k, OpKind::MemorySegESI | OpKind::MemoryESEDI));
        let amask = if a32 { u32::MAX } else { 0xFFFF };
        let size = ins.memory_size().size() as u32;
        if !(1..=4).contains(&size) {
            return unsupported(format!("'{ins}'"));
        }
        let step = if self.cpu.eflags & flags::DF != 0 {
            size.wrapping_neg()
        } else {
            size
        };
        let src = seg_of(ins.memory_segment());
        let rep = ins.has_rep_prefix() || ins.has_repne_prefix();
        let m = ins.mnemonic();
        let io_op = matches!(
            m,
            M::Insb | M::Insw | M::Insd | M::Outsb | M::Outsw | M::Outsd
        );
        if io_op {
            self.io_permitted(self.cpu.gpr[2] as u16, size as usize, io)?;
        }
        let (esi, edi) = (6, 7);
        let bulk = rep
            && a32
            && matches!(
                m,
                M::Movsb | M::Movsw | M::Movsd | M::Stosb | M::Stosw | M::Stosd
            );
        loop {
            if rep && self.cpu.gpr[1] & amask == 0 {
                break;
            }
            if bulk && self.rep_page_step(matches!(m, M::Movsb | M::Movsw | M::Movsd), size, src)? {
                continue;
            }
            let si = self.cpu.gpr[esi] & amask;
            let di = self.cpu.gpr[edi] & amask;
            let mut compared = false;
            match m {
                M::Movsb | M::Movsw | M::Movsd => {
                    let v = self.read_mem(src, si, size, io)?;
                    self.write_mem(SegReg::Es, di, size, v, io)?;
                    self.bump(esi, step, amask);
                    self.bump(edi, step, amask);
                }
                M::Stosb | M::Stosw | M::Stosd => {
                    self.write_mem(SegReg::Es, di, size, self.accumulator(size), io)?;
                    self.bump(edi, step, amask);
                }
                M::Lodsb | M::Lodsw | M::Lodsd => {
                    let v = self.read_mem(src, si, size, io)?;
                    self.set_accumulator(size, v);
                    self.bump(esi, step, amask);
                }
                M::Cmpsb | M::Cmpsw | M::Cmpsd => {
                    let a = self.read_mem(src, si, size, io)?;
                    let b = self.read_mem(SegReg::Es, di, size, io)?;
                    self.cpu.eflags = alu::sub(a, b, false, size * 8, self.cpu.eflags).1;
                    self.bump(esi, step, amask);
                    self.bump(edi, step, amask);
                    compared = true;
                }
                M::Scasb | M::Scasw | M::Scasd => {
                    let b = self.read_mem(SegReg::Es, di, size, io)?;
                    let a = self.accumulator(size);
                    self.cpu.eflags = alu::sub(a, b, false, size * 8, self.cpu.eflags).1;
                    self.bump(edi, step, amask);
                    compared = true;
                }
                M::Insb | M::Insw | M::Insd => {
                    // The destination is checked before the port is read.
                    self.linear(SegReg::Es, di, size)?;
                    let mut b = [0u8; 4];
                    io.pio_read(self.cpu.gpr[2] as u16, &mut b[..size as usize]);
                    self.watch_port(self.cpu.gpr[2] as u16, size as usize);
                    self.write_mem(SegReg::Es, di, size, u32::from_le_bytes(b), io)?;
                    self.bump(edi, step, amask);
                }
                M::Outsb | M::Outsw | M::Outsd => {
                    let v = self.read_mem(src, si, size, io)?;
                    io.pio_write(self.cpu.gpr[2] as u16, &v.to_le_bytes()[..size as usize]);
                    self.watch_port(self.cpu.gpr[2] as u16, size as usize);
                    self.bump(esi, step, amask);
                }
                _ => return unsupported(format!("'{ins}'")),
            }
            if !rep {
                break;
            }
            self.bump(1, u32::MAX, amask);
            if compared {
                let zf = self.cpu.eflags & flags::ZF != 0;
                if (ins.has_repe_prefix() && !zf) || (ins.has_repne_prefix() && zf) {
                    break;
                }
            }
        }
        Ok(())
    }

    /// One page-sized step of REP MOVS/STOS with 32-bit addresses: the elements from the
    /// current one to the end of the page (or pages) they lie in, copied or filled at once.
    /// Returns whether it made progress; when it did not (device memory, data breakpoints, an
    /// element straddling a page, a segment limit inside the step, an overlap the element order
    /// would see), the caller executes one element the slow way. The result is the element
    /// loop's: the first element's checks and faults come first, in its order (source, then
    /// destination); the later elements lie in the same pages (translated once, as the TLB
    /// would) and pass the same checks; an overlapping copy is done at once only in the
    /// direction where reading everything first gives what the element order gives.
    fn rep_page_step(&mut self, movs: bool, size: u32, src: SegReg) -> Step<bool> {
        let count = self.cpu.gpr[1];
        if count < 2 || self.cpu.dr[7] & 0xFF != 0 {
            return Ok(false);
        }
        let down = self.cpu.eflags & flags::DF != 0;
        let user = self.user_access();
        // Elements from linear `lin` on (or down) that lie wholly in its page.
        let room = |lin: u32| -> u32 {
            let at = lin & 0xFFF;
            if at + size > 0x1000 {
                0
            } else if down {
                at / size + 1
            } else {
                (0x1000 - at) / size
            }
        };
        let (si, di) = (self.cpu.gpr[6], self.cpu.gpr[7]);
        let mut n = count.min(room(self.cpu.seg(SegReg::Es).base.wrapping_add(di)));
        if movs {
            n = n.min(room(self.cpu.seg(src).base.wrapping_add(si)));
        }
        if n < 2 {
            return Ok(false);
        }
        let bytes = n * size;
        // The step's lowest offset and its last element's offset, if the range does not wrap
        // around the offset space.
        let ends = |off: u32| -> Option<(u32, u32)> {
            if down {
                let last = off.checked_sub((n - 1) * size)?;
                Some((last, last))
            } else {
                off.checked_add(bytes - 1)?;
                Some((off, off + (n - 1) * size))
            }
        };
        let Some((d_low, d_last)) = ends(di) else {
            return Ok(false);
        };
        let (s_low, s_last) = match (movs, ends(si)) {
            (false, _) => (si, si),
            (true, Some(e)) => e,
            (true, None) => return Ok(false),
        };
        // The first element, as the element loop would access it.
        let s_phys = if movs {
            let lin = self.linear(src, si, size)?;
            let phys = self.translate(lin, false, user)?;
            Some(phys - u64::from(si - s_low))
        } else {
            None
        };
        let lin = self.linear(SegReg::Es, di, size)?;
        let d_phys = self.translate(lin, true, user)? - u64::from(di - d_low);
        // The last element's segment checks cover the ones between (a contiguous range, one
        // alignment); if it fails, the element loop gets there and raises it.
        if self.linear(SegReg::Es, d_last, size).is_err()
            || (movs && self.linear(src, s_last, size).is_err())
        {
            return Ok(false);
        }
        let layout = self.memory.layout();
        let ram = layout
            .region_of(d_phys, bytes as usize)
            .is_some_and(|r| r.kind == RegionKind::Ram);
        if !ram {
            return Ok(false);
        }
        let mut buf = [0u8; 4096];
        let buf = &mut buf[..bytes as usize];
        if let Some(s_phys) = s_phys {
            let len = u64::from(bytes);
            let overlap = s_phys < d_phys + len && d_phys < s_phys + len;
            // Forward with the destination above the source (backward: below it), a later
            // element reads what an earlier one wrote: the element loop does that.
            let order_matters = if down {
                d_phys < s_phys
            } else {
                d_phys > s_phys
            };
            if (overlap && order_matters)
                || layout.region_of(s_phys, bytes as usize).is_none()
                || self.memory.read(s_phys, buf).is_err()
            {
                return Ok(false);
            }
        } else {
            let v = self.accumulator(size).to_le_bytes();
            // Each element lies whole in the buffer (it starts at the step's lowest offset).
            for element in buf.chunks_exact_mut(size as usize) {
                element.copy_from_slice(&v[..size as usize]);
            }
        }
        if self.memory.write(d_phys, buf).is_err() {
            return Ok(false);
        }
        let delta = if down { bytes.wrapping_neg() } else { bytes };
        self.cpu.gpr[7] = di.wrapping_add(delta);
        if movs {
            self.cpu.gpr[6] = si.wrapping_add(delta);
        }
        self.cpu.gpr[1] = count - n;
        Ok(true)
    }

    /// BT, BTS, BTR, BTC. With a memory operand and a register bit offset, the offset reaches
    /// any bit of the bit string starting at the operand (a signed offset).
    pub(super) fn bit_test(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        let size = Self::op_size(ins, 0);
        let bits = size * 8;
        let offset = self.read_op(ins, 1, io)?;
        let (value, bit, target) = if ins.op0_kind() == OpKind::Memory {
            let (seg, off) = self.address(ins);
            let off = if ins.op1_kind() == OpKind::Register {
                let signed = if bits == 16 {
                    i64::from(offset as u16 as i16)
                } else {
                    i64::from(offset as i32)
                };
                let units = signed.div_euclid(i64::from(bits));
                off.wrapping_add((units * i64::from(size)) as u32)
            } else {
                off
            };
            let v = self.read_mem(seg, off, size, io)?;
            (v, offset & (bits - 1), Some((seg, off)))
        } else {
            (self.read_op(ins, 0, io)?, offset & (bits - 1), None)
        };
        let was_set = value & (1 << bit) != 0;
        let new = match ins.mnemonic() {
            Mnemonic::Bts => Some(value | (1 << bit)),
            Mnemonic::Btr => Some(value & !(1 << bit)),
            Mnemonic::Btc => Some(value ^ (1 << bit)),
            _ => None,
        };
        if let Some(v) = new {
            match target {
                Some((seg, off)) => self.write_mem(seg, off, size, v, io)?,
                None => self.write_op(ins, 0, v, io)?,
            }
        }
        self.cpu.eflags = (self.cpu.eflags & !flags::CF) | if was_set { flags::CF } else { 0 };
        Ok(())
    }

    /// BSF, BSR: ZF=1 and the destination unchanged for a zero source. Also TZCNT and LZCNT
    /// (F3 0F BC/BD): on a processor without BMI1/LZCNT in CPUID, as this one, the F3 prefix is
    /// ignored and they execute as BSF/BSR (Intel SDM, TZCNT and LZCNT); Linux's `__ffs` relies
    /// on that.
    pub(super) fn bit_scan(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        let src = self.read_op(ins, 1, io)?;
        let bits = Self::op_size(ins, 0) * 8;
        let src = if bits == 32 { src } else { src & 0xFFFF };
        if src == 0 {
            self.cpu.eflags |= flags::ZF;
            return Ok(());
        }
        let index = if matches!(ins.mnemonic(), Mnemonic::Bsf | Mnemonic::Tzcnt) {
            src.trailing_zeros()
        } else {
            31 - src.leading_zeros()
        };
        self.write_op(ins, 0, index, io)?;
        self.cpu.eflags &= !flags::ZF;
        Ok(())
    }

    /// CMPXCHG r/m, r.
    pub(super) fn cmpxchg(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        let size = Self::op_size(ins, 0);
        let dest = self.read_op(ins, 0, io)?;
        let acc = self.accumulator(size);
        let (_, f) = alu::sub(acc, dest, false, size * 8, self.cpu.eflags);
        if f & flags::ZF != 0 {
            let src = self.read_op(ins, 1, io)?;
            self.write_op(ins, 0, src, io)?;
        } else {
            // The processor writes the destination back even when the comparison fails.
            self.write_op(ins, 0, dest, io)?;
            self.set_accumulator(size, dest);
        }
        self.cpu.eflags = f;
        Ok(())
    }

    /// CMPXCHG8B m64.
    pub(super) fn cmpxchg8b(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        if ins.op0_kind() != OpKind::Memory {
            return Err(Fault::Exception(vector::UD, None));
        }
        let (seg, off) = self.address(ins);
        self.linear(seg, off, 8)?;
        let lo = self.read_mem(seg, off, 4, io)?;
        let hi = self.read_mem(seg, off.wrapping_add(4), 4, io)?;
        let g = self.cpu.gpr;
        let equal = lo == g[0] && hi == g[2];
        let (new_lo, new_hi) = if equal { (g[3], g[1]) } else { (lo, hi) };
        self.write_mem(seg, off, 4, new_lo, io)?;
        self.write_mem(seg, off.wrapping_add(4), 4, new_hi, io)?;
        if equal {
            self.cpu.eflags |= flags::ZF;
        } else {
            self.cpu.gpr[0] = lo;
            self.cpu.gpr[2] = hi;
            self.cpu.eflags &= !flags::ZF;
        }
        Ok(())
    }

    /// XADD r/m, r.
    pub(super) fn xadd(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        let size = Self::op_size(ins, 0);
        let dest = self.read_op(ins, 0, io)?;
        let src = self.read_op(ins, 1, io)?;
        let (sum, f) = alu::add(dest, src, false, size * 8, self.cpu.eflags);
        // SRC <- DEST, then DEST <- sum (SDM order: with the same register twice, the sum
        // wins). A memory destination is written first so a fault changes no register.
        let r = ins.op1_register();
        if ins.op0_kind() == OpKind::Memory {
            self.write_op(ins, 0, sum, io)?;
            self.set_reg(r, dest);
        } else {
            self.set_reg(r, dest);
            self.write_op(ins, 0, sum, io)?;
        }
        self.cpu.eflags = f;
        Ok(())
    }

    /// IMUL with two or three operands: truncated signed product, CF=OF=overflow.
    pub(super) fn imul_n(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        let bits = Self::op_size(ins, 0) * 8;
        let (a, b) = if ins.op_count() == 3 {
            (self.read_op(ins, 1, io)?, self.read_op(ins, 2, io)?)
        } else {
            (self.read_op(ins, 0, io)?, self.read_op(ins, 1, io)?)
        };
        let sx = |v: u32| i64::from(((v << (32 - bits)) as i32) >> (32 - bits));
        let product = sx(a) * sx(b);
        let truncated = product as u32
            & if bits == 32 {
                u32::MAX
            } else {
                (1 << bits) - 1
            };
        let overflow = sx(truncated) != product;
        self.write_op(ins, 0, truncated, io)?;
        let f = if overflow { flags::CF | flags::OF } else { 0 };
        self.cpu.eflags = (self.cpu.eflags & !(flags::CF | flags::OF)) | f;
        Ok(())
    }

    /// ENTER imm16, imm8.
    pub(super) fn enter(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        let size = if ins.code() == Code::Enterw_imm16_imm8 {
            2
        } else {
            4
        };
        let alloc = u32::from(ins.immediate16());
        let level = u32::from(ins.immediate8_2nd()) & 0x1F;
        let saved = (self.cpu.gpr[4], self.cpu.gpr[5]);
        let result = (|| {
            let ebp = self.cpu.gpr[5];
            self.push(ebp, size, io)?;
            let frame = self.sp();
            let mut walk = ebp;
            for _ in 1..level {
                walk = walk.wrapping_sub(size);
                let off = if self.stack_big() {
                    walk
                } else {
                    walk & 0xFFFF
                };
                let v = self.read_mem(SegReg::Ss, off, size, io)?;
                self.push(v, size, io)?;
            }
            if level > 0 {
                self.push(frame, size, io)?;
            }
            let sp = self.sp().wrapping_sub(alloc);
            let sp = if self.stack_big() { sp } else { sp & 0xFFFF };
            // The new stack top must be writable: check it before committing.
            if alloc > 0 {
                self.linear(SegReg::Ss, sp, 1)?;
            }
            if size == 2 {
                self.set_reg(Register::BP, frame);
            } else {
                self.cpu.gpr[5] = frame;
            }
            self.set_sp(sp);
            Ok(())
        })();
        if result.is_err() {
            (self.cpu.gpr[4], self.cpu.gpr[5]) = saved;
        }
        result
    }

    /// LEAVE.
    pub(super) fn leave(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        let size = if ins.code() == Code::Leavew { 2 } else { 4 };
        let saved = self.cpu.gpr[4];
        let bp = self.cpu.gpr[5];
        self.set_sp(bp);
        match self.pop(size, io) {
            Ok(v) => {
                if size == 2 {
                    self.set_reg(Register::BP, v);
                } else {
                    self.cpu.gpr[5] = v;
                }
                Ok(())
            }
            Err(f) => {
                self.cpu.gpr[4] = saved;
                Err(f)
            }
        }
    }

    /// PUSHA/PUSHAD and POPA/POPAD.
    pub(super) fn push_pop_all(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        let size = if matches!(ins.mnemonic(), Mnemonic::Pushad | Mnemonic::Popad) {
            4
        } else {
            2
        };
        let mask = if size == 4 { u32::MAX } else { 0xFFFF };
        let saved = self.cpu.gpr;
        let result = (|| {
            if matches!(ins.mnemonic(), Mnemonic::Pusha | Mnemonic::Pushad) {
                let regs = self.cpu.gpr;
                for v in regs {
                    self.push(v & mask, size, io)?;
                }
            } else {
                for n in (0..8).rev() {
                    let v = self.pop(size, io)?;
                    if n != 4 {
                        let g = &mut self.cpu.gpr[n];
                        *g = (*g & !mask) | (v & mask);
                    }
                }
            }
            Ok(())
        })();
        if result.is_err() {
            self.cpu.gpr = saved;
        }
        result
    }

    /// DAA, DAS, AAA, AAS, AAM, AAD.
    pub(super) fn decimal(&mut self, ins: &Instruction) -> Step {
        let ax = self.cpu.gpr[0] as u16;
        let fl = self.cpu.eflags;
        let (ax, f) = match ins.mnemonic() {
            Mnemonic::Daa => alu::bcd_adjust(Bcd::Daa, ax, fl),
            Mnemonic::Das => alu::bcd_adjust(Bcd::Das, ax, fl),
            Mnemonic::Aaa => alu::bcd_adjust(Bcd::Aaa, ax, fl),
            Mnemonic::Aas => alu::bcd_adjust(Bcd::Aas, ax, fl),
            Mnemonic::Aam => {
                let base = ins.immediate8();
                if base == 0 {
                    return Err(Fault::Exception(vector::DE, None));
                }
                let al = ax as u8;
                let ax = (u16::from(al / base) << 8) | u16::from(al % base);
                (ax, alu::logic(u32::from(ax as u8), 8, fl).1)
            }
            Mnemonic::Aad => {
                let base = ins.immediate8();
                let al = (ax as u8).wrapping_add(((ax >> 8) as u8).wrapping_mul(base));
                (u16::from(al), alu::logic(u32::from(al), 8, fl).1)
            }
            _ => return unsupported(format!("'{ins}'")),
        };
        self.set_reg(Register::AX, u32::from(ax));
        self.cpu.eflags = f;
        Ok(())
    }

    /// LOOP, LOOPE, LOOPNE, JCXZ, JECXZ: returns whether to branch.
    pub(super) fn loop_branch(&mut self, ins: &Instruction) -> bool {
        let ecx = matches!(
            ins.code(),
            Code::Loop_rel8_16_ECX
                | Code::Loop_rel8_32_ECX
                | Code::Loope_rel8_16_ECX
                | Code::Loope_rel8_32_ECX
                | Code::Loopne_rel8_16_ECX
                | Code::Loopne_rel8_32_ECX
                | Code::Jecxz_rel8_16
                | Code::Jecxz_rel8_32
        );
        let mask = if ecx { u32::MAX } else { 0xFFFF };
        let zf = self.cpu.eflags & flags::ZF != 0;
        match ins.mnemonic() {
            Mnemonic::Jcxz | Mnemonic::Jecxz => self.cpu.gpr[1] & mask == 0,
            m => {
                self.bump(1, u32::MAX, mask);
                let more = self.cpu.gpr[1] & mask != 0;
                match m {
                    Mnemonic::Loope => more && zf,
                    Mnemonic::Loopne => more && !zf,
                    _ => more,
                }
            }
        }
    }

    /// BOUND r, m: #BR when the signed index lies outside [lower, upper].
    pub(super) fn bound(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        if ins.op1_kind() != OpKind::Memory {
            return Err(Fault::Exception(vector::UD, None));
        }
        let size = ins.op0_register().size() as u32;
        let (seg, off) = self.address(ins);
        let lower = self.read_mem(seg, off, size, io)?;
        let upper = self.read_mem(seg, off.wrapping_add(size), size, io)?;
        let sx = |v: u32| {
            if size == 2 {
                i32::from(v as u16 as i16)
            } else {
                v as i32
            }
        };
        let index = sx(self.reg(ins.op0_register()));
        if index < sx(lower) || index > sx(upper) {
            return Err(Fault::Exception(vector::BR, None));
        }
        Ok(())
    }

    /// LDS, LES, LFS, LGS, LSS: a far pointer (offset, then selector) from memory into a
    /// general register and a segment register. The selector loads first, with the checks of a
    /// MOV to that register; the general register changes only if the load succeeds.
    pub(super) fn load_far_pointer(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        if ins.op1_kind() != OpKind::Memory {
            return Err(Fault::Exception(vector::UD, None));
        }
        let (selector, offset, _) = self.far_pointer(ins, io)?;
        let seg = match ins.mnemonic() {
            Mnemonic::Les => SegReg::Es,
            Mnemonic::Lfs => SegReg::Fs,
            Mnemonic::Lgs => SegReg::Gs,
            Mnemonic::Lss => SegReg::Ss,
            _ => SegReg::Ds,
        };
        self.load_segment(seg, selector, io)?;
        self.set_reg(ins.op0_register(), offset);
        Ok(())
    }

    /// ARPL: raises the RPL of the destination selector to the source's, setting ZF when it
    /// did. Always a word operation (a register destination keeps its upper half); #UD outside
    /// protected mode.
    pub(super) fn arpl(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        if !self.cpu.protected() || self.cpu.eflags & flags::VM != 0 {
            return Err(Fault::Exception(vector::UD, None));
        }
        let src = self.reg(ins.op1_register()) as u16;
        let dest = match ins.op0_kind() {
            OpKind::Register => self.reg(ins.op0_register()) as u16,
            _ => {
                let (seg, off) = self.address(ins);
                self.read_mem(seg, off, 2, io)? as u16
            }
        };
        let raise = dest & 3 < src & 3;
        if raise {
            let v = (dest & !3) | (src & 3);
            match ins.op0_kind() {
                OpKind::Register => {
                    let r = ins.op0_register();
                    let upper = self.reg(r) & 0xFFFF_0000;
                    self.set_reg(r, upper | u32::from(v));
                }
                _ => {
                    let (seg, off) = self.address(ins);
                    self.write_mem(seg, off, 2, u32::from(v), io)?;
                }
            }
        }
        self.cpu.eflags = (self.cpu.eflags & !flags::ZF) | if raise { flags::ZF } else { 0 };
        Ok(())
    }

    /// LAHF, SAHF.
    pub(super) fn ah_flags(&mut self, ins: &Instruction) {
        const LOW: u32 = flags::SF | flags::ZF | flags::AF | flags::PF | flags::CF;
        if ins.mnemonic() == Mnemonic::Lahf {
            let v = (self.cpu.eflags & LOW) | flags::FIXED;
            self.set_reg(Register::AH, v);
        } else {
            let ah = self.reg(Register::AH);
            self.cpu.eflags = (self.cpu.eflags & !LOW) | (ah & LOW);
        }
    }

    /// Checks privileged instructions: CPL must be 0.
    pub(super) fn require_cpl0(&self) -> Step {
        if self.cpu.cpl() != 0 {
            return gp0();
        }
        Ok(())
    }
}
