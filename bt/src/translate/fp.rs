//! x87, MMX, SSE and SSE2 instructions as translated code.
//!
//! They have the same encoding in 64-bit mode, so most run as themselves, their memory operand
//! made `gs:[32-bit address]` like any other. The guest's x87/SSE state lives in the context's
//! FXSAVE image: the first floating-point instruction of a unit loads it into the host FPU
//! (`fxrstor`) unless an earlier unit already did (the context's `fp_live`), and the exit stub
//! saves it back on every way out of translated code (exits, and host signals, which the kernel
//! returns to the stub with the interrupted FPU state).
//!
//! Only units translated for [`Mode::FPU`] (and [`Mode::SSE`] for SSE and SSE2) do this. The
//! monitor sets those bits only while the instructions cannot fault for the guest's FPU state:
//! CR0.EM and CR0.TS clear (CR4.OSFXSR set for SSE), every x87 and MXCSR exception masked and
//! no x87 error pending. Native execution then never raises #MF or #XM, and the instructions
//! that could unmask an exception (FLDCW, LDMXCSR, FLDENV, FRSTOR, FXRSTOR) stay callouts, as
//! do the ones whose memory layout or pointer fields the host would write in its own terms
//! (FNSTENV, FNSAVE, FXSAVE), FNINIT and MASKMOVQ/MASKMOVDQU (an implicit ES:EDI store).
//!
//! FIP, FOP, FDP and their selectors are the guest's, not the host's: each x87 instruction that
//! records them on the guest CPU stores its guest EIP, FOP and operand offset in the context,
//! and the monitor writes them into the image when it takes the state back.

use iced_x86::{Code, CpuidFeature, Instruction, Mnemonic, OpKind, Register};
use vmdriver::fpu::{is_x87, touches_mmx};
use vmdriver::world::{
    OFF_FP_LIVE, OFF_FX, OFF_X87_DP, OFF_X87_DS, OFF_X87_IP, OFF_X87_OP, X87_RAN,
};

use super::{Emitter, Mode, Rewrite, S1, SAVE_Q, ctx, guest_mem, map_reg, seg_address, set_base};

/// What a native floating-point instruction needs of the unit's mode, and whether it records
/// the x87 pointers; None for instructions that stay callouts.
fn native(ins: &Instruction) -> Option<(u8, bool)> {
    use CpuidFeature as F;
    use Mnemonic as M;
    if ins.has_lock_prefix() {
        return None;
    }
    let ours = ins.cpuid_features().iter().all(|f| {
        matches!(
            f,
            F::FPU | F::FPU287 | F::FPU387 | F::CMOV | F::MMX | F::SSE | F::SSE2
        )
    });
    let x87 = is_x87(ins);
    if !ours || !(x87 || touches_mmx(ins) || has_xmm(ins) || sse(ins)) {
        return None;
    }
    match ins.mnemonic() {
        M::Fninit
        | M::Finit
        | M::Fldcw
        | M::Fnstenv
        | M::Fstenv
        | M::Fldenv
        | M::Fnsave
        | M::Fsave
        | M::Frstor
        | M::Fxsave
        | M::Fxrstor
        | M::Ldmxcsr
        | M::Maskmovq
        | M::Maskmovdqu
        | M::Fneni
        | M::Feni
        | M::Fndisi
        | M::Fdisi
        | M::Fnsetpm
        | M::Fsetpm
        | M::Prefetchnta
        | M::Prefetcht0
        | M::Prefetcht1
        | M::Prefetcht2
        | M::Sfence
        | M::Lfence
        | M::Mfence
        | M::Clflush
        | M::Movnti => return None,
        _ => {}
    }
    if !ins.code().op_code().mode64() {
        return None;
    }
    let need = if sse(ins) || has_xmm(ins) {
        Mode::FPU | Mode::SSE
    } else {
        Mode::FPU
    };
    // The instructions the guest CPU runs without touching FIP/FOP/FDP.
    let pointers = x87
        && !matches!(
            ins.mnemonic(),
            M::Wait | M::Fnclex | M::Fclex | M::Fnstsw | M::Fstsw | M::Fnstcw | M::Fstcw
        );
    Some((need, pointers))
}

fn sse(ins: &Instruction) -> bool {
    ins.cpuid_features()
        .iter()
        .any(|f| matches!(f, CpuidFeature::SSE | CpuidFeature::SSE2))
}

fn has_xmm(ins: &Instruction) -> bool {
    (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Register && ins.op_register(i).is_xmm())
}

/// FOP of the x87 instruction in `bytes` (prefixes first): the low three bits of its opcode
/// byte and its ModR/M byte, as the guest CPU records it.
pub(super) fn fop_of(bytes: &[u8]) -> u16 {
    let at = bytes
        .iter()
        .position(|b| (0xD8..=0xDF).contains(b))
        .unwrap_or(0);
    let op = bytes.get(at).copied().unwrap_or(0);
    let modrm = bytes.get(at + 1).copied().unwrap_or(0);
    (u16::from(op & 7) << 8) | u16::from(modrm)
}

/// The host form of `ins`: general registers mapped (ESP is R12D), the memory operand
/// `gs:[32-bit address]`, or `gs:[r8d]` with the context offset of the segment base
/// [`seg_address`] must add into R8D first. None if it cannot be (16-bit addressing, a segment
/// that is not flat-limit).
fn host_form(ins: &Instruction, mode: Mode, esp_delta: i32) -> Option<(Instruction, Option<i32>)> {
    let mut h = *ins;
    let mut base = None;
    for i in 0..h.op_count() {
        match h.op_kind(i) {
            OpKind::Register => {
                let r = h.op_register(i);
                if r.is_gpr32() || r.is_gpr16() {
                    h.set_op_register(i, map_reg(r));
                } else if !(r.is_st() || r.is_mm() || r.is_xmm()) {
                    return None;
                }
            }
            OpKind::Memory => {
                let (m, based) = guest_mem(ins, Some(Register::GS), mode, esp_delta)?;
                set_base(&mut h, &m);
                h.set_segment_prefix(Register::GS);
                if based.is_some() {
                    // `gs:[r8d]`, the whole linear address in R8D.
                    h.set_memory_index(Register::None);
                    h.set_memory_index_scale(1);
                    h.set_memory_displacement32(0);
                    h.set_memory_displ_size(0);
                    base = based;
                } else if m.base == Register::None && m.index == Register::None {
                    h.set_memory_displ_size(4);
                }
            }
            OpKind::Immediate8 => {}
            _ => return None,
        }
    }
    Some((h, base))
}

/// Translates `ins` if it is a floating-point instruction this unit's mode lets run natively;
/// None leaves it to the rest of the translator (which makes it a callout).
pub(super) fn rewrite(e: &mut Emitter, ins: &Instruction) -> Option<Rewrite> {
    let (need, pointers) = native(ins)?;
    if e.mode.0 & need != need {
        return None;
    }
    let (h, based) = host_form(ins, e.mode, e.esp_delta)?;
    let has_mem = (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory);
    let lea = if pointers && has_mem {
        let (m, _) = guest_mem(ins, None, e.mode, e.esp_delta)?;
        Some(Instruction::with2(Code::Lea_r32_m, S1, m))
    } else {
        None
    };
    if !e.fp_loaded {
        load_state(e);
        e.fp_loaded = true;
    }
    if let Some(off) = based {
        seg_address(e, ins, off);
    }
    e.emit(Ok(h));
    if pointers {
        e.store_ctx(OFF_X87_IP, ins.ip32());
        e.store_ctx(OFF_X87_OP, X87_RAN | u32::from(e.fop));
        if let Some(lea) = lea {
            e.emit(lea);
            e.emit(Instruction::with2(Code::Mov_rm32_r32, ctx(OFF_X87_DP), S1));
            e.store_ctx(OFF_X87_DS, ins.memory_segment() as u32);
        }
    }
    Some(Rewrite::Continue)
}

/// Loads the guest's x87/SSE state into the host FPU unless it is there already; RFLAGS
/// untouched (`jrcxz` on the context's `fp_live`, RCX kept in R13).
fn load_state(e: &mut Emitter) {
    let (load, done) = (e.label(), e.label());
    e.emit(Instruction::with2(
        Code::Mov_r64_rm64,
        SAVE_Q,
        Register::RCX,
    ));
    e.emit(Instruction::with2(
        Code::Mov_r32_rm32,
        Register::ECX,
        ctx(OFF_FP_LIVE),
    ));
    e.emit(Instruction::with_branch(Code::Jrcxz_rel8_64, load));
    e.emit(Instruction::with_branch(Code::Jmp_rel8_64, done));
    e.emit_at(
        Instruction::with1(Code::Fxrstor_m512byte, ctx(OFF_FX)),
        load,
    );
    e.store_ctx(OFF_FP_LIVE, 1);
    e.emit_at(
        Instruction::with2(Code::Mov_r64_rm64, Register::RCX, SAVE_Q),
        done,
    );
}

#[cfg(test)]
mod tests {
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter, Mnemonic};

    use super::super::{CodeSource, Encoded, Mode, translate};
    use vmdriver::world::{
        OFF_DS_BASE, OFF_FP_LIVE, OFF_FX, OFF_SS_BASE, OFF_X87_DP, OFF_X87_IP, OFF_X87_OP, X87_RAN,
    };

    const BASE: u32 = 0x0010_0000;

    struct Bytes(Vec<u8>);
    impl CodeSource for Bytes {
        fn read_code(&self, eip: u32, buf: &mut [u8]) -> usize {
            let off = (eip - BASE) as usize;
            let n = buf.len().min(self.0.len().saturating_sub(off));
            buf[..n].copy_from_slice(&self.0[off..off + n]);
            n
        }
    }

    /// A number as iced's Intel formatter writes it (hex, `h`, a leading 0 before a letter).
    fn hex(n: impl std::fmt::UpperHex) -> String {
        let s = format!("{n:X}h");
        if s.starts_with(|c: char| c.is_ascii_alphabetic()) {
            format!("0{s}")
        } else {
            s
        }
    }

    fn unit(code: &[u8], mode: u8) -> (Encoded, Vec<String>) {
        let e = translate(&Bytes(code.to_vec()), BASE, 1, 0x4000_0000, Mode(mode)).unwrap();
        let mut f = IntelFormatter::new();
        let t = Decoder::with_ip(64, &e.code, 0x4000_0000, DecoderOptions::NONE)
            .into_iter()
            .map(|i| {
                let mut s = String::new();
                f.format(&i, &mut s);
                s
            })
            .collect();
        (e, t)
    }

    /// fld qword [ebx+8]; faddp st(1),st; fstp qword [esp+4]; addps xmm0,xmm1; hlt.
    const CODE: &[u8] = &[
        0xDD, 0x43, 0x08, 0xDE, 0xC1, 0xDD, 0x5C, 0x24, 0x04, 0x0F, 0x58, 0xC1, 0xF4,
    ];

    #[test]
    fn floating_point_runs_natively_after_one_state_load() {
        let (e, t) = unit(CODE, Mode::FPU | Mode::SSE);
        assert_eq!(
            (e.instructions, e.callout),
            (4, Some(Mnemonic::Hlt)),
            "{t:#?}"
        );
        let loads: Vec<_> = t.iter().filter(|l| l.starts_with("fxrstor")).collect();
        assert_eq!(loads, [&format!("fxrstor [r15+{}]", hex(OFF_FX))], "{t:#?}");
        let has = |s: &str| t.iter().any(|l| l == s);
        assert!(
            has(&format!("mov ecx,[r15+{}]", hex(OFF_FP_LIVE))),
            "{t:#?}"
        );
        assert!(has("fld st,qword ptr gs:[ebx+8]"), "{t:#?}");
        assert!(has("faddp"), "{t:#?}");
        assert!(has("fstp qword ptr gs:[r12d+4],st"), "{t:#?}");
        assert!(has("addps xmm0,xmm1"), "{t:#?}");
        // FIP and FOP of each x87 instruction, FDP (the offset, no segment) of fstp's operand.
        assert!(has(&format!(
            "mov dword ptr [r15+{}],{}",
            hex(OFF_X87_IP),
            hex(BASE + 5)
        )));
        let fop = X87_RAN | 0x55C; // DD 5C: opcode bits 101b, ModR/M 5Ch
        assert!(
            has(&format!(
                "mov dword ptr [r15+{}],{}",
                hex(OFF_X87_OP),
                hex(fop)
            )),
            "{t:#?}"
        );
        assert!(has("lea r9d,[r12d+4]"), "{t:#?}");
        assert!(has(&format!("mov [r15+{}],r9d", hex(OFF_X87_DP))), "{t:#?}");
        // No guest RFLAGS clobbered: the load test uses jrcxz.
        assert!(
            !t.iter()
                .any(|l| l.starts_with("cmp") || l.starts_with("test"))
        );
    }

    #[test]
    fn based_segments_add_their_base_and_fdp_stays_the_offset() {
        let (e, t) = unit(
            CODE,
            Mode::FPU | Mode::SSE | Mode::DS_BASED | Mode::SS_BASED,
        );
        assert_eq!((e.instructions, e.callout), (4, Some(Mnemonic::Hlt)));
        let at = |s: &str| {
            t.iter()
                .position(|l| l == s)
                .unwrap_or_else(|| panic!("{s}: {t:#?}"))
        };
        let ds = at(&format!("mov r9d,[r15+{}]", hex(OFF_DS_BASE)));
        assert_eq!(t[ds + 1], "lea r8d,[r9d+ebx+8]");
        assert_eq!(t[ds + 2], "fld st,qword ptr gs:[r8d]");
        // fstp [esp+4]: SS by default.
        let ss = at(&format!("mov r9d,[r15+{}]", hex(OFF_SS_BASE)));
        assert_eq!(t[ss + 1], "lea r8d,[r9d+r12d+4]");
        assert_eq!(t[ss + 2], "fstp qword ptr gs:[r8d],st");
        // FDP is the offset in the segment, as the guest CPU records it.
        at("lea r9d,[r12d+4]");
    }

    #[test]
    fn without_the_mode_bits_they_stay_callouts() {
        let (e, _) = unit(CODE, Mode::FPU);
        assert_eq!((e.instructions, e.callout), (3, Some(Mnemonic::Addps)));
        let (e, t) = unit(CODE, 0);
        assert_eq!((e.instructions, e.callout), (0, Some(Mnemonic::Fld)));
        assert!(!t.iter().any(|l| l.starts_with("fxrstor")));
    }

    #[test]
    fn state_changing_and_layout_dependent_ones_stay_callouts() {
        for (code, m) in [
            (&[0xD9, 0x2B][..], Mnemonic::Fldcw),
            (&[0x0F, 0xAE, 0x13], Mnemonic::Ldmxcsr),
            (&[0xD9, 0x33], Mnemonic::Fnstenv),
            (&[0xDD, 0x33], Mnemonic::Fnsave),
            (&[0x0F, 0xAE, 0x03], Mnemonic::Fxsave),
            (&[0xDB, 0xE3], Mnemonic::Fninit),
            (&[0xD9, 0x23], Mnemonic::Fldenv),
            (&[0xDD, 0x23], Mnemonic::Frstor),
        ] {
            let (e, _) = unit(code, Mode::FPU | Mode::SSE);
            assert_eq!((e.instructions, e.callout), (0, Some(m)), "{code:02x?}");
        }
    }
}
