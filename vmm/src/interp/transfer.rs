//! Control transfers between code segments and privilege levels: far JMP/CALL (directly and
//! through call gates, with the stack switch and parameter copy), far RET, IRET, the TSS stack
//! switch used by interrupts, SYSENTER/SYSEXIT, and the TSS I/O permission bitmap.
//!
//! Every transfer that touches more than one register snapshots the state first and puts it
//! back if a check or a stack access faults, so the faulting instruction restarts cleanly.

use vmdriver::IoHandler;

use super::{Fault, Interp, Step, gp0, unsupported, vector};
use crate::cpu::{SegReg, Segment, flags};

/// #TS, invalid TSS.
const TS: u8 = 10;

/// How a task switch was started (it decides the busy bits, NT and the link field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TaskSwitch {
    /// JMP to a TSS or task gate.
    Jmp,
    /// CALL to a TSS or task gate.
    Call,
    /// An interrupt or exception through a task gate.
    Interrupt,
    /// IRET with NT set, back to the task in the link field.
    Iret,
}

/// Where a TSS keeps the state a task switch saves and loads: the 32-bit TSS (descriptor types
/// 9/11) or the 80286's 16-bit TSS (types 1/3), Intel SDM vol. 3 sections 7.2.1 and 7.6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TssFormat {
    wide: bool,
}

impl TssFormat {
    /// The format of a TSS descriptor's type (busy or not), if it is a TSS.
    fn of(access: u8) -> Option<Self> {
        match access & 0x1F {
            0x09 | 0x0B => Some(TssFormat { wide: true }),
            0x01 | 0x03 => Some(TssFormat { wide: false }),
            _ => None,
        }
    }

    /// The smallest limit the processor accepts for a task switch.
    fn min_limit(self) -> u32 {
        if self.wide { 0x67 } else { 0x2B }
    }

    /// Width in bytes of the register fields.
    fn width(self) -> usize {
        if self.wide { 4 } else { 2 }
    }

    /// (stack pointer offset, stack segment offset) for privilege level `dpl`.
    fn stack(self, dpl: u8) -> (u32, u32) {
        let dpl = u32::from(dpl);
        if self.wide {
            (4 + 8 * dpl, 8 + 8 * dpl)
        } else {
            (2 + 4 * dpl, 4 + 4 * dpl)
        }
    }

    /// Offset of EIP; EFLAGS, then the eight general registers follow it field by field.
    fn eip(self) -> usize {
        if self.wide { 0x20 } else { 0x0E }
    }

    /// Offset of a segment selector field (a 16-bit TSS has no FS or GS).
    fn segment(self, s: usize) -> Option<usize> {
        if self.wide {
            Some(0x48 + 4 * s)
        } else {
            [0x22, 0x24, 0x26, 0x28, usize::MAX, usize::MAX]
                .get(s)
                .copied()
                .filter(|&o| o != usize::MAX)
        }
    }

    /// Offset of the LDT selector.
    fn ldt(self) -> usize {
        if self.wide { 0x60 } else { 0x2A }
    }
}

/// Where an interrupt or trap gate leads: the handler's code segment, its offset, and the size
/// of the frame it expects (4 for 32-bit gates, 2 for 286 gates).
#[derive(Debug, Clone, Copy)]
pub(super) struct Handler {
    pub(super) target: Segment,
    pub(super) offset: u32,
    pub(super) size: u32,
}

/// What a transfer may have to put back.
#[derive(Clone, Copy)]
pub(super) struct Saved {
    esp: u32,
    seg: [Segment; 6],
    eip: u32,
    eflags: u32,
}

impl Interp {
    pub(super) fn save(&self) -> Saved {
        Saved {
            esp: self.cpu.gpr[4],
            seg: self.cpu.seg,
            eip: self.cpu.eip,
            eflags: self.cpu.eflags,
        }
    }

    pub(super) fn restore(&mut self, s: Saved) {
        self.cpu.gpr[4] = s.esp;
        self.cpu.seg = s.seg;
        self.cpu.eip = s.eip;
        self.cpu.eflags = s.eflags;
    }

    /// Runs `f`, restoring the snapshot if it fails.
    fn atomically(&mut self, f: impl FnOnce(&mut Self) -> Step) -> Step {
        let saved = self.save();
        let r = f(self);
        if r.is_err() {
            self.restore(saved);
        }
        r
    }

    /// Reads `len` bytes of the current TSS at `offset` (an implicit supervisor access).
    fn tss_read(&self, offset: u32, len: u32, io: &mut dyn IoHandler) -> Step<u32> {
        let tr = self.cpu.tr;
        if offset + len - 1 > tr.limit {
            return Err(Fault::Exception(TS, Some(u32::from(tr.selector & !3))));
        }
        let mut b = [0u8; 4];
        self.read_lin(
            tr.base.wrapping_add(offset),
            &mut b[..len as usize],
            false,
            io,
        )?;
        Ok(u32::from_le_bytes(b))
    }

    /// The stack for privilege level `dpl` from the current TSS (32- or 16-bit): (SS, ESP).
    fn tss_stack(&self, dpl: u8, io: &mut dyn IoHandler) -> Step<(u16, u32)> {
        let Some(format) = TssFormat::of(self.cpu.tr.access) else {
            return unsupported("a stack switch with no TSS loaded");
        };
        let (sp_at, ss_at) = format.stack(dpl);
        let esp = self.tss_read(sp_at, format.width() as u32, io)?;
        let ss = self.tss_read(ss_at, 2, io)? as u16;
        Ok((ss, esp))
    }

    /// Checks `selector` as the stack segment for privilege level `cpl` and returns its cache.
    /// Errors are `err_vector` (#TS for stacks from the TSS, #GP for returns), or #SS when the
    /// segment is not present.
    fn stack_segment(
        &self,
        selector: u16,
        cpl: u8,
        err_vector: u8,
        io: &mut dyn IoHandler,
    ) -> Step<Segment> {
        let err = Some(u32::from(selector & !3));
        if selector & !3 == 0 || (selector & 3) as u8 != cpl {
            return Err(Fault::Exception(err_vector, err));
        }
        let seg = Segment::from_descriptor(selector, self.descriptor(selector, io)?);
        let writable_data = seg.access & 0x1A == 0x12;
        if !writable_data || seg.dpl() != cpl {
            return Err(Fault::Exception(err_vector, err));
        }
        if !seg.present() {
            return Err(Fault::Exception(vector::SS, err));
        }
        Ok(seg)
    }

    /// Checks a code-segment descriptor as the target of a return to privilege `rpl`.
    fn return_code_segment(&self, selector: u16, io: &mut dyn IoHandler) -> Step<Segment> {
        let err = Some(u32::from(selector & !3));
        if selector & !3 == 0 {
            return gp0();
        }
        let rpl = (selector & 3) as u8;
        if rpl < self.cpu.cpl() {
            return Err(Fault::Exception(vector::GP, err));
        }
        let seg = Segment::from_descriptor(selector, self.descriptor(selector, io)?);
        let conforming = seg.access & 0x04 != 0;
        if !seg.is_code() || (conforming && seg.dpl() > rpl) || (!conforming && seg.dpl() != rpl) {
            return Err(Fault::Exception(vector::GP, err));
        }
        if !seg.present() {
            return Err(Fault::Exception(vector::NP, err));
        }
        Ok(seg)
    }

    /// Loads CS with `seg` at privilege `cpl` (CS.RPL is the CPL).
    fn set_cs(&mut self, seg: Segment, cpl: u8) {
        self.cpu.seg[SegReg::Cs as usize] = Segment {
            selector: (seg.selector & !3) | u16::from(cpl),
            ..seg
        };
    }

    /// After a return to an outer level: data segment registers the new CPL may not use become
    /// null.
    fn null_outer_segments(&mut self) {
        let cpl = self.cpu.cpl();
        for s in [SegReg::Es, SegReg::Ds, SegReg::Fs, SegReg::Gs] {
            let seg = self.cpu.seg(s);
            let conforming_code = seg.is_code() && seg.access & 0x04 != 0;
            if !conforming_code && seg.dpl() < cpl {
                self.cpu.seg[s as usize] = Segment::default();
            }
        }
    }

    /// Switches to the stack for `new_cpl` from the TSS and pushes the old SS:ESP there (with
    /// `size`-byte pushes); CS must already hold the new privilege level. Returns the old SS:ESP.
    fn switch_to_inner_stack(
        &mut self,
        new_cpl: u8,
        size: u32,
        io: &mut dyn IoHandler,
    ) -> Step<(u16, u32)> {
        let (ss_sel, esp) = self.tss_stack(new_cpl, io)?;
        let ss = self.stack_segment(ss_sel, new_cpl, TS, io)?;
        let old = (self.cpu.seg(SegReg::Ss).selector, self.cpu.gpr[4]);
        self.cpu.seg[SegReg::Ss as usize] = ss;
        self.cpu.gpr[4] = esp;
        self.push(u32::from(old.0), size, io)?;
        self.push(old.1, size, io)?;
        Ok(old)
    }

    /// Far JMP or CALL to `selector:offset` (`size` = operand size in bytes, `next` = the return
    /// address for calls).
    pub(super) fn far_transfer(
        &mut self,
        call: bool,
        selector: u16,
        offset: u32,
        size: u32,
        next: u32,
        io: &mut dyn IoHandler,
    ) -> Step {
        if !self.cpu.protected() || self.cpu.eflags & flags::VM != 0 {
            return self.atomically(|s| {
                if call {
                    let cs = s.cpu.seg(SegReg::Cs).selector;
                    s.push(u32::from(cs), size, io)?;
                    s.push(next, size, io)?;
                }
                let access = s.cpu.seg(SegReg::Cs).access;
                s.cpu.seg[SegReg::Cs as usize] = Segment::real(selector, access);
                s.cpu.eip = if size == 2 { offset & 0xFFFF } else { offset };
                Ok(())
            });
        }
        let err = Some(u32::from(selector & !3));
        if selector & !3 == 0 {
            return gp0();
        }
        let cpl = self.cpu.cpl();
        let rpl = (selector & 3) as u8;
        let raw = self.descriptor(selector, io)?;
        let desc = Segment::from_descriptor(selector, raw);
        if desc.is_code() {
            let conforming = desc.access & 0x04 != 0;
            if (conforming && desc.dpl() > cpl) || (!conforming && (rpl > cpl || desc.dpl() != cpl))
            {
                return Err(Fault::Exception(vector::GP, err));
            }
            if !desc.present() {
                return Err(Fault::Exception(vector::NP, err));
            }
            if offset > desc.limit {
                return gp0();
            }
            return self.atomically(|s| {
                if call {
                    let cs = s.cpu.seg(SegReg::Cs).selector;
                    s.push(u32::from(cs), size, io)?;
                    s.push(next, size, io)?;
                }
                s.set_cs(desc, cpl);
                s.cpu.eip = offset;
                Ok(())
            });
        }
        match desc.access & 0x1F {
            0x04 | 0x0C => {}
            0x01 | 0x09 | 0x03 | 0x0B => {
                if desc.dpl() < cpl || desc.dpl() < rpl {
                    return Err(Fault::Exception(vector::GP, err));
                }
                let kind = if call {
                    TaskSwitch::Call
                } else {
                    TaskSwitch::Jmp
                };
                return self.task_switch(selector, kind, next, None, io);
            }
            0x05 => {
                if desc.dpl() < cpl || desc.dpl() < rpl {
                    return Err(Fault::Exception(vector::GP, err));
                }
                if !desc.present() {
                    return Err(Fault::Exception(vector::NP, err));
                }
                let kind = if call {
                    TaskSwitch::Call
                } else {
                    TaskSwitch::Jmp
                };
                return self.task_switch((raw >> 16) as u16, kind, next, None, io);
            }
            _ => return Err(Fault::Exception(vector::GP, err)),
        }
        // A call gate.
        if desc.dpl() < cpl || desc.dpl() < rpl {
            return Err(Fault::Exception(vector::GP, err));
        }
        if !desc.present() {
            return Err(Fault::Exception(vector::NP, err));
        }
        let gate_size = if desc.access & 0x08 != 0 { 4 } else { 2 };
        let target_sel = (raw >> 16) as u16;
        let target_off = if gate_size == 4 {
            (raw & 0xFFFF) as u32 | ((raw >> 32) as u32 & 0xFFFF_0000)
        } else {
            (raw & 0xFFFF) as u32
        };
        let params = ((raw >> 32) & 0x1F) as u32;
        let terr = Some(u32::from(target_sel & !3));
        if target_sel & !3 == 0 {
            return gp0();
        }
        let target = Segment::from_descriptor(target_sel, self.descriptor(target_sel, io)?);
        let conforming = target.access & 0x04 != 0;
        if !target.is_code() || target.dpl() > cpl || (!call && !conforming && target.dpl() != cpl)
        {
            return Err(Fault::Exception(vector::GP, terr));
        }
        if !target.present() {
            return Err(Fault::Exception(vector::NP, terr));
        }
        if target_off > target.limit {
            return gp0();
        }
        let inner = call && !conforming && target.dpl() < cpl;
        self.atomically(|s| {
            let old_cs = s.cpu.seg(SegReg::Cs).selector;
            if inner {
                // Copy the parameters from the caller's stack before switching.
                let (old_ss, old_esp) = (SegReg::Ss, s.sp());
                let mut copied = [0u32; 31];
                for (i, slot) in copied.iter_mut().enumerate().take(params as usize) {
                    let off = old_esp.wrapping_add(i as u32 * gate_size);
                    *slot = s.read_mem(old_ss, off, gate_size, io)?;
                }
                let new_cpl = target.dpl();
                s.set_cs(target, new_cpl);
                s.switch_to_inner_stack(new_cpl, gate_size, io)?;
                for v in copied[..params as usize].iter().rev() {
                    s.push(*v, gate_size, io)?;
                }
            } else {
                s.set_cs(target, cpl);
            }
            if call {
                s.push(u32::from(old_cs), gate_size, io)?;
                s.push(next, gate_size, io)?;
            }
            s.cpu.eip = target_off;
            Ok(())
        })
    }

    /// Far RET (`release` = the immediate: bytes of parameters to drop).
    pub(super) fn far_return(&mut self, size: u32, release: u32, io: &mut dyn IoHandler) -> Step {
        self.atomically(|s| {
            let eip = s.pop(size, io)?;
            let cs = s.pop(size, io)? as u16;
            if !s.cpu.protected() || s.cpu.eflags & flags::VM != 0 {
                let access = s.cpu.seg(SegReg::Cs).access;
                s.cpu.seg[SegReg::Cs as usize] = Segment::real(cs, access);
                s.cpu.eip = eip;
                s.set_sp(s.sp().wrapping_add(release));
                return Ok(());
            }
            let code = s.return_code_segment(cs, io)?;
            if eip > code.limit {
                return gp0();
            }
            let rpl = (cs & 3) as u8;
            s.set_sp(s.sp().wrapping_add(release));
            if rpl > s.cpu.cpl() {
                let esp = s.pop(size, io)?;
                let ss_sel = s.pop(size, io)? as u16;
                let ss = s.stack_segment(ss_sel, rpl, vector::GP, io)?;
                s.set_cs(code, rpl);
                s.cpu.seg[SegReg::Ss as usize] = ss;
                s.cpu.gpr[4] = esp;
                s.set_sp(s.sp().wrapping_add(release));
                s.null_outer_segments();
            } else {
                s.set_cs(code, rpl);
            }
            s.cpu.eip = eip;
            Ok(())
        })
    }

    /// IRET / IRETD (`next` is the address after it, saved for the old task by a task return).
    pub(super) fn iret(&mut self, size: u32, next: u32, io: &mut dyn IoHandler) -> Step {
        if !self.cpu.protected() {
            return self.atomically(|s| {
                let eip = s.pop(size, io)?;
                let cs = s.pop(size, io)? as u16;
                let fl = s.pop(size, io)?;
                let access = s.cpu.seg(SegReg::Cs).access;
                s.cpu.seg[SegReg::Cs as usize] = Segment::real(cs, access);
                s.cpu.eip = eip;
                s.load_flags(fl, size, 0);
                Ok(())
            });
        }
        if self.cpu.eflags & flags::VM != 0 {
            // Only with IOPL 3, and then as in real mode (VM and IOPL stay as they are).
            if self.cpu.iopl() < 3 {
                return gp0();
            }
            return self.atomically(|s| {
                let eip = s.pop(size, io)?;
                let cs = s.pop(size, io)? as u16;
                let fl = s.pop(size, io)?;
                let access = s.cpu.seg(SegReg::Cs).access;
                s.cpu.seg[SegReg::Cs as usize] = Segment::real(cs, access);
                s.cpu.eip = eip & 0xFFFF;
                s.load_flags(fl, size, 3);
                Ok(())
            });
        }
        if self.cpu.eflags & flags::NT != 0 {
            // Back to the task that called this one.
            let mut link = [0u8; 2];
            self.read_lin(self.cpu.tr.base, &mut link, false, io)?;
            return self.task_switch(u16::from_le_bytes(link), TaskSwitch::Iret, next, None, io);
        }
        self.atomically(|s| {
            let old_cpl = s.cpu.cpl();
            let eip = s.pop(size, io)?;
            let cs = s.pop(size, io)? as u16;
            let fl = s.pop(size, io)?;
            if size == 4 && fl & flags::VM != 0 && old_cpl == 0 {
                return s.enter_v86(eip, cs, fl, io);
            }
            let code = s.return_code_segment(cs, io)?;
            if eip > code.limit {
                return gp0();
            }
            let rpl = (cs & 3) as u8;
            if rpl > old_cpl {
                let esp = s.pop(size, io)?;
                let ss_sel = s.pop(size, io)? as u16;
                let ss = s.stack_segment(ss_sel, rpl, vector::GP, io)?;
                s.set_cs(code, rpl);
                s.cpu.seg[SegReg::Ss as usize] = ss;
                s.cpu.gpr[4] = esp;
                s.load_flags(fl, size, old_cpl);
                s.null_outer_segments();
            } else {
                s.set_cs(code, rpl);
                s.load_flags(fl, size, old_cpl);
            }
            s.cpu.eip = eip;
            Ok(())
        })
    }

    /// Loads EFLAGS from an IRET or POPF image under the rules for privilege `cpl`: IOPL only
    /// at CPL 0, IF only at CPL <= IOPL; VM, VIF and VIP are never loaded here.
    pub(super) fn load_flags(&mut self, value: u32, size: u32, cpl: u8) {
        let mut writable = flags::WRITABLE & !(flags::VM | flags::VIF | flags::VIP);
        if self.cpu.protected() {
            if cpl > 0 {
                writable &= !flags::IOPL;
            }
            if cpl > self.cpu.iopl() {
                writable &= !flags::IF;
            }
        }
        if size == 2 {
            writable &= 0xFFFF;
        }
        self.cpu.eflags = (self.cpu.eflags & !writable) | (value & writable) | flags::FIXED;
    }

    /// Delivers through a gate to `target` (a checked, present code segment) at `offset`,
    /// switching to the TSS stack if the handler is more privileged. `eflags` is the image to
    /// push; `ret` the return EIP; `code` the error code.
    pub(super) fn enter_handler(
        &mut self,
        handler: Handler,
        eflags: u32,
        ret: u32,
        code: Option<u32>,
        io: &mut dyn IoHandler,
    ) -> Step {
        let Handler {
            target,
            offset,
            size,
        } = handler;
        if self.cpu.eflags & flags::VM != 0 {
            return self.enter_handler_from_v86(handler, eflags, ret, code, io);
        }
        let cpl = self.cpu.cpl();
        let inner = target.access & 0x04 == 0 && target.dpl() < cpl;
        self.atomically(|s| {
            let old_cs = s.cpu.seg(SegReg::Cs).selector;
            if inner {
                let new_cpl = target.dpl();
                s.set_cs(target, new_cpl);
                s.switch_to_inner_stack(new_cpl, size, io)?;
            } else {
                s.set_cs(target, cpl);
            }
            s.push(eflags, size, io)?;
            s.push(u32::from(old_cs), size, io)?;
            s.push(ret, size, io)?;
            if let Some(c) = code {
                s.push(c, size, io)?;
            }
            s.cpu.eip = offset;
            Ok(())
        })
    }

    /// The rest of an IRET that returns to virtual-8086 mode (EIP, CS and EFLAGS are popped):
    /// pops ESP, SS, ES, DS, FS, GS and loads every segment the real-mode way.
    fn enter_v86(&mut self, eip: u32, cs: u16, fl: u32, io: &mut dyn IoHandler) -> Step {
        let esp = self.pop(4, io)?;
        let ss = self.pop(4, io)? as u16;
        let mut data = [0u16; 4];
        for sel in data.iter_mut() {
            *sel = self.pop(4, io)? as u16;
        }
        // All of EFLAGS is loaded at CPL 0, VM included.
        let writable = flags::WRITABLE & !(flags::VIF | flags::VIP);
        self.cpu.eflags = (self.cpu.eflags & !writable) | (fl & writable) | flags::FIXED;
        let v86 = |sel: u16, access: u8| Segment::real(sel, access);
        self.cpu.seg[SegReg::Cs as usize] = v86(cs, 0xFB);
        self.cpu.seg[SegReg::Ss as usize] = v86(ss, 0xF3);
        for (s, sel) in [SegReg::Es, SegReg::Ds, SegReg::Fs, SegReg::Gs]
            .into_iter()
            .zip(data)
        {
            self.cpu.seg[s as usize] = v86(sel, 0xF3);
        }
        self.cpu.gpr[4] = esp;
        self.cpu.eip = eip & 0xFFFF;
        Ok(())
    }

    /// Interrupt or exception delivery out of virtual-8086 mode: only to a ring-0,
    /// non-conforming handler, on the TSS ring-0 stack, saving and then nulling the data
    /// segment registers.
    fn enter_handler_from_v86(
        &mut self,
        handler: Handler,
        eflags: u32,
        ret: u32,
        code: Option<u32>,
        io: &mut dyn IoHandler,
    ) -> Step {
        let Handler {
            target,
            offset,
            size,
        } = handler;
        if target.dpl() != 0 || target.access & 0x04 != 0 {
            return Err(Fault::Exception(
                vector::GP,
                Some(u32::from(target.selector & !3)),
            ));
        }
        self.atomically(|s| {
            let old = s.save();
            let (ss_sel, esp) = s.tss_stack(0, io)?;
            let ss = s.stack_segment(ss_sel, 0, TS, io)?;
            // Leave virtual-8086 mode first, so the pushes are supervisor accesses.
            s.cpu.eflags &= !flags::VM;
            s.set_cs(target, 0);
            s.cpu.seg[SegReg::Ss as usize] = ss;
            s.cpu.gpr[4] = esp;
            for seg in [SegReg::Gs, SegReg::Fs, SegReg::Ds, SegReg::Es] {
                s.push(u32::from(old.seg[seg as usize].selector), size, io)?;
            }
            s.push(u32::from(old.seg[SegReg::Ss as usize].selector), size, io)?;
            s.push(old.esp, size, io)?;
            s.push(eflags, size, io)?;
            s.push(u32::from(old.seg[SegReg::Cs as usize].selector), size, io)?;
            s.push(ret, size, io)?;
            if let Some(c) = code {
                s.push(c, size, io)?;
            }
            for seg in [SegReg::Es, SegReg::Ds, SegReg::Fs, SegReg::Gs] {
                s.cpu.seg[seg as usize] = Segment::default();
            }
            s.cpu.eip = offset;
            Ok(())
        })
    }

    /// Switches to the task whose TSS `selector` names (Intel SDM vol. 3, section 7.3): saves
    /// the current state into the current TSS, updates busy bits, NT and the link field as
    /// `kind` requires, and loads the new task's state (CR3, LDTR, EFLAGS, EIP, registers,
    /// segments). `ret` is the EIP saved for the old task; `code` an error code to push on the
    /// new task's stack. Faults after the new TR is loaded belong to the new task.
    pub(super) fn task_switch(
        &mut self,
        selector: u16,
        kind: TaskSwitch,
        ret: u32,
        code: Option<u32>,
        io: &mut dyn IoHandler,
    ) -> Step {
        let err = Some(u32::from(selector & !3));
        if selector & 4 != 0 {
            return Err(Fault::Exception(vector::GP, err));
        }
        let raw = self.descriptor(selector, io)?;
        let new = Segment::from_descriptor(selector, raw);
        let Some(format) = TssFormat::of(new.access) else {
            return Err(Fault::Exception(vector::GP, err));
        };
        let busy = new.access & 0x02 != 0;
        if (kind == TaskSwitch::Iret) != busy {
            let v = if kind == TaskSwitch::Iret {
                TS
            } else {
                vector::GP
            };
            return Err(Fault::Exception(v, err));
        }
        if !new.present() {
            return Err(Fault::Exception(vector::NP, err));
        }
        if new.limit < format.min_limit() {
            return Err(Fault::Exception(TS, err));
        }
        let Some(old_format) =
            TssFormat::of(self.cpu.tr.access).filter(|f| self.cpu.tr.limit >= f.min_limit())
        else {
            return unsupported("a task switch with no valid current TSS");
        };
        // Read the whole new TSS before anything changes.
        let mut image = [0u8; 0x68];
        let image = &mut image[..format.min_limit() as usize + 1];
        self.read_lin(new.base, image, false, io)?;
        let width = format.width();
        let field = |off: usize| {
            let mut b = [0u8; 4];
            b[..width].copy_from_slice(&image[off..off + width]);
            u32::from_le_bytes(b)
        };

        // Save the outgoing task: EIP, EFLAGS, the general registers, the selectors.
        let old_tr = self.cpu.tr;
        let mut out_flags = self.cpu.eflags;
        if kind == TaskSwitch::Iret {
            out_flags &= !flags::NT;
        }
        let w = old_format.width();
        let start = old_format.eip();
        // From EIP up to the LDT selector, which a task switch never writes.
        let mut save = vec![0u8; old_format.ldt() - start];
        let mut put = |off: usize, v: u32, len: usize| {
            save[off - start..off - start + len].copy_from_slice(&v.to_le_bytes()[..len])
        };
        put(start, ret, w);
        put(start + w, out_flags, w);
        for (i, v) in self.cpu.gpr.iter().enumerate() {
            put(start + (2 + i) * w, *v, w);
        }
        for (i, seg) in self.cpu.seg.iter().enumerate() {
            if let Some(off) = old_format.segment(i) {
                put(off, u32::from(seg.selector), 2);
            }
        }
        self.write_lin(old_tr.base.wrapping_add(start as u32), &save, false, io)?;

        // Busy bits and the link.
        let set_busy = |s: &mut Self, sel: u16, on: bool, io: &mut dyn IoHandler| -> Step {
            let addr = s.cpu.gdtr.base.wrapping_add(u32::from(sel & !7)) + 5;
            let mut b = [0u8];
            s.read_lin(addr, &mut b, false, io)?;
            b[0] = if on { b[0] | 0x02 } else { b[0] & !0x02 };
            s.write_lin(addr, &b, false, io)
        };
        if matches!(kind, TaskSwitch::Jmp | TaskSwitch::Iret) {
            set_busy(self, old_tr.selector, false, io)?;
        }
        if kind != TaskSwitch::Iret {
            set_busy(self, selector, true, io)?;
        }
        let mut new_flags = field(format.eip() + width);
        if matches!(kind, TaskSwitch::Call | TaskSwitch::Interrupt) {
            self.write_lin(
                new.base,
                &u32::from(old_tr.selector).to_le_bytes()[..2],
                false,
                io,
            )?;
            new_flags |= flags::NT;
        }

        // Load the incoming task.
        self.cpu.tr = Segment {
            access: new.access | 0x02,
            ..new
        };
        self.cpu.cr0 |= crate::cpu::cr0::TS;
        // Breakpoints enabled locally (L0-L3, LE) belong to the old task (SDM vol. 3, 18.2.4).
        self.cpu.dr[7] &= !0x155;
        // A 16-bit TSS has no CR3: the address space stays.
        if format.wide {
            let cr3 = u32::from_le_bytes(image[0x1C..0x20].try_into().expect("4 bytes"));
            self.cpu.cr3 = cr3;
            if self.paging() {
                if self.cpu.cr4 & crate::cpu::cr4::PAE != 0 {
                    self.load_pdptes(cr3)?;
                }
                self.flush_tlb(true);
            }
        }
        self.cpu.eip = field(format.eip());
        self.cpu.eflags = (new_flags & flags::WRITABLE) | flags::FIXED;
        for i in 0..8 {
            // From a 16-bit TSS the upper halves read as ones (as Bochs documents the 286
            // TSS load; the manuals leave them unspecified).
            let v = field(format.eip() + (2 + i) * width);
            self.cpu.gpr[i] = if format.wide { v } else { 0xFFFF_0000 | v };
        }
        let sel = |s: SegReg| {
            format.segment(s as usize).map_or(0, |off| {
                u16::from_le_bytes(image[off..off + 2].try_into().expect("2 bytes"))
            })
        };
        let ldt = u16::from_le_bytes(image[format.ldt()..format.ldt() + 2].try_into().expect("2"));
        if self.cpu.eflags & flags::VM != 0 {
            for s in SegReg::ALL {
                let access = if s == SegReg::Cs { 0xFB } else { 0xF3 };
                self.cpu.seg[s as usize] = Segment::real(sel(s), access);
            }
            self.load_task_ldt(ldt, io)?;
        } else {
            self.load_task_ldt(ldt, io)?;
            // CS first: it fixes the new CPL the other checks use.
            let cs_sel = sel(SegReg::Cs);
            let cs_err = Some(u32::from(cs_sel & !3));
            if cs_sel & !3 == 0 {
                return Err(Fault::Exception(TS, cs_err));
            }
            let cs = Segment::from_descriptor(cs_sel, self.descriptor(cs_sel, io)?);
            if !cs.is_code() {
                return Err(Fault::Exception(TS, cs_err));
            }
            if !cs.present() {
                return Err(Fault::Exception(vector::NP, cs_err));
            }
            let cpl = (cs_sel & 3) as u8;
            self.cpu.seg[SegReg::Cs as usize] = cs;
            let ss = self.stack_segment(sel(SegReg::Ss), cpl, TS, io)?;
            self.cpu.seg[SegReg::Ss as usize] = ss;
            for s in [SegReg::Es, SegReg::Ds, SegReg::Fs, SegReg::Gs] {
                self.load_segment(s, sel(s), io).map_err(|f| match f {
                    Fault::Exception(vector::GP, c) => Fault::Exception(TS, c),
                    other => other,
                })?;
            }
        }
        if let Some(c) = code {
            let size = if self.cpu.seg(SegReg::Cs).big { 4 } else { 2 };
            self.push(c, size, io)?;
        }
        Ok(())
    }

    /// Loads LDTR from a new task's TSS (a null selector leaves it unusable).
    fn load_task_ldt(&mut self, selector: u16, io: &mut dyn IoHandler) -> Step {
        let err = Some(u32::from(selector & !3));
        if selector & !3 == 0 {
            self.cpu.ldtr = Segment {
                selector,
                access: 0x02,
                ..Segment::default()
            };
            return Ok(());
        }
        if selector & 4 != 0 {
            return Err(Fault::Exception(TS, err));
        }
        let seg = Segment::from_descriptor(selector, self.descriptor(selector, io)?);
        if seg.access & 0x1F != 0x02 {
            return Err(Fault::Exception(TS, err));
        }
        if !seg.present() {
            return Err(Fault::Exception(TS, err));
        }
        self.cpu.ldtr = seg;
        Ok(())
    }

    /// Whether the current task may access `size` ports at `port`: always at CPL <= IOPL outside
    /// virtual-8086 mode, otherwise only if the TSS I/O permission bitmap clears every bit.
    pub(super) fn io_permitted(&self, port: u16, size: usize, io: &mut dyn IoHandler) -> Step {
        let v86 = self.cpu.eflags & flags::VM != 0;
        if !self.cpu.protected() || (!v86 && self.cpu.cpl() <= self.cpu.iopl()) {
            return Ok(());
        }
        let tr = self.cpu.tr;
        if tr.access & 0x0F != 0x0B || tr.limit < 0x67 {
            return gp0();
        }
        let base = self
            .tss_read(0x66, 2, io)
            .map_err(|_| Fault::Exception(vector::GP, Some(0)))?;
        let byte = base + u32::from(port) / 8;
        if byte + 1 > tr.limit {
            return gp0();
        }
        let bits = self.tss_read(byte, 2, io)?;
        let mask = ((1u32 << size) - 1) << (port & 7);
        if bits & mask != 0 {
            return gp0();
        }
        Ok(())
    }

    /// SYSENTER: to CPL 0 at SYSENTER_CS:SYSENTER_EIP with the stack SYSENTER_CS+8:SYSENTER_ESP.
    pub(super) fn sysenter(&mut self) -> Step {
        let cs = self.msr(0x174) as u16 & !3;
        if !self.cpu.protected() || cs == 0 {
            return gp0();
        }
        self.cpu.eflags &= !(flags::VM | flags::IF | flags::RF);
        self.cpu.seg[SegReg::Cs as usize] = Segment::flat(cs, 0x9B);
        self.cpu.seg[SegReg::Ss as usize] = Segment::flat(cs + 8, 0x93);
        self.cpu.gpr[4] = self.msr(0x175) as u32;
        self.cpu.eip = self.msr(0x176) as u32;
        Ok(())
    }

    /// SYSEXIT: to CPL 3 at SYSENTER_CS+16:EDX with the stack SYSENTER_CS+24:ECX.
    pub(super) fn sysexit(&mut self) -> Step {
        let cs = self.msr(0x174) as u16 & !3;
        if !self.cpu.protected() || self.cpu.cpl() != 0 || cs == 0 {
            return gp0();
        }
        self.cpu.seg[SegReg::Cs as usize] = Segment::flat((cs + 16) | 3, 0xFB);
        self.cpu.seg[SegReg::Ss as usize] = Segment::flat((cs + 24) | 3, 0xF3);
        self.cpu.gpr[4] = self.cpu.gpr[1];
        self.cpu.eip = self.cpu.gpr[2];
        Ok(())
    }

    /// An MSR's current value (0 if never written).
    pub(super) fn msr(&self, index: u32) -> u64 {
        self.cpu.msrs.get(&index).copied().unwrap_or(0)
    }
}
