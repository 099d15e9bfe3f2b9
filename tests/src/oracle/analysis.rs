//! What the oracle knows about a sequence without running it: which EFLAGS bits are undefined at
//! each instruction (so the comparison can mask them, and the generator never lets a later
//! instruction read one), and which registers hold values in a known range (so the generator can
//! keep every memory operand, string pointer and stack access inside the data buffer).
//!
//! Both come from one forward data-flow pass. Sequences only branch forwards, so the pass visits
//! each instruction once: the state before an instruction is the join of the state falling
//! through into it and of every branch that targets it.

use std::collections::BTreeMap;

use iced_x86::{
    FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
    RflagsBits,
};

/// EFLAGS bits (Intel SDM vol. 1, 3.4.3): the CPU model's own, and their names for reports.
pub mod eflags {
    pub use vmm::cpu::flags::{AC, AF, ARITH, CF, DF, ID, IF, NT, OF, PF, SF, TF, ZF};

    /// Short names of the set bits among the compared ones, for reports.
    pub fn names(v: u32) -> String {
        let all = [
            (CF, "CF"),
            (PF, "PF"),
            (AF, "AF"),
            (ZF, "ZF"),
            (SF, "SF"),
            (TF, "TF"),
            (IF, "IF"),
            (DF, "DF"),
            (OF, "OF"),
            (NT, "NT"),
            (AC, "AC"),
            (ID, "ID"),
        ];
        let set: Vec<&str> = all
            .iter()
            .filter(|(b, _)| v & b != 0)
            .map(|(_, n)| *n)
            .collect();
        if set.is_empty() {
            "-".to_string()
        } else {
            set.join(" ")
        }
    }
}
use eflags::*;

/// Register numbers (the encoding order the snippet runners use).
pub const ECX: usize = 1;
/// ESP.
pub const ESP: usize = 4;
/// EBP.
pub const EBP: usize = 5;
/// ESI.
pub const ESI: usize = 6;
/// EDI.
pub const EDI: usize = 7;

/// The values a register may hold, as an inclusive range (None: anything).
pub type Known = Option<(i64, i64)>;

/// What is known before an instruction runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// EAX..EDI.
    pub regs: [Known; 8],
    /// Arithmetic flags whose value is undefined (the last instruction that wrote them on some
    /// path leading here left them undefined).
    pub undef: u32,
}

impl State {
    /// A state where every register is exactly as given and every flag is defined.
    pub fn exact(gpr: [u32; 8]) -> Self {
        Self {
            regs: gpr.map(|v| Some((i64::from(v), i64::from(v)))),
            undef: 0,
        }
    }

    /// What holds on either path: ranges widen, undefined flags add up.
    pub fn join(&self, other: &State) -> State {
        let mut regs = self.regs;
        for (r, o) in regs.iter_mut().zip(other.regs) {
            *r = match (*r, o) {
                (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
                _ => None,
            };
        }
        State {
            regs,
            undef: self.undef | other.undef,
        }
    }
}

/// How an instruction affects the arithmetic flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlagEffect {
    /// Flags it writes (defined or not).
    pub modified: u32,
    /// Flags it leaves undefined.
    pub undefined: u32,
    /// It may leave every flag unchanged (a count in CL that may be 0, a REP prefix with a count
    /// that may be 0).
    pub conditional: bool,
}

/// iced's RFLAGS bit set as EFLAGS bits.
pub fn eflags_of(r: u32) -> u32 {
    let map = [
        (RflagsBits::OF, OF),
        (RflagsBits::SF, SF),
        (RflagsBits::ZF, ZF),
        (RflagsBits::AF, AF),
        (RflagsBits::CF, CF),
        (RflagsBits::PF, PF),
        (RflagsBits::DF, DF),
        (RflagsBits::IF, IF),
        (RflagsBits::AC, AC),
    ];
    map.iter()
        .filter(|(i, _)| r & i != 0)
        .fold(0, |acc, (_, e)| acc | e)
}

/// Size in bits of operand 0.
fn op0_bits(ins: &Instruction) -> u32 {
    match ins.op0_kind() {
        OpKind::Register => ins.op0_register().size() as u32 * 8,
        OpKind::Memory => ins.memory_size().size() as u32 * 8,
        _ => 32,
    }
}

/// The masked (5-bit) count of a shift, rotate or double shift: Some when it is an immediate,
/// None when it is CL.
fn shift_count(ins: &Instruction) -> Option<u32> {
    let last = ins.op_count().checked_sub(1)?;
    if last == 0 {
        return Some(1);
    }
    match ins.op_kind(last) {
        OpKind::Immediate8 => Some(u32::from(ins.immediate8()) & 0x1F),
        _ => None,
    }
}

/// Flags a shift, rotate or double shift by a masked count `c` (1..=31) of a `bits`-wide operand
/// leaves undefined. Intel SDM vol. 2:
/// - SAL/SAR/SHL/SHR: "the OF flag is affected only on 1-bit shifts"; "for a non-zero count, the
///   AF flag is undefined"; CF "is undefined for SHL and SHR instructions where the count is
///   greater than or equal to the size (in bits) of the destination operand".
/// - RCL/RCR/ROL/ROR: "the OF flag is defined only for the 1-bit rotates; it is undefined in all
///   other cases"; SF, ZF, AF, PF are not affected.
/// - SHLD/SHRD: "for a 1-bit shift, the OF flag is set if a sign change occurred; otherwise, it
///   is cleared. For shifts greater than 1 bit, the OF flag is undefined"; "the AF flag is
///   undefined"; "if the count operand is greater than the operand size, the flags are
///   undefined" (all six; the destination too, so the generator never does that).
fn shift_undefined(m: Mnemonic, c: u32, bits: u32) -> u32 {
    let of = if c > 1 { OF } else { 0 };
    match m {
        Mnemonic::Shl | Mnemonic::Sal | Mnemonic::Shr => {
            AF | of | if bits < 32 && c >= bits { CF } else { 0 }
        }
        Mnemonic::Sar => AF | of,
        Mnemonic::Rol | Mnemonic::Ror | Mnemonic::Rcl | Mnemonic::Rcr => of,
        Mnemonic::Shld | Mnemonic::Shrd => AF | of | if c > bits { ARITH } else { 0 },
        _ => 0,
    }
}

/// The flags `ins` leaves undefined, by the Intel SDM vol. 2 ("Flags Affected" of each
/// instruction) — the table the comparison masks with:
///
/// | instruction | undefined |
/// |---|---|
/// | MUL, IMUL (all forms) | SF ZF AF PF |
/// | DIV, IDIV | CF OF SF ZF AF PF |
/// | AND, OR, XOR, TEST | AF |
/// | shifts, rotates, SHLD, SHRD | see [`shift_undefined`]; none for a count of 0 |
/// | BSF, BSR | CF OF SF AF PF |
/// | BT, BTS, BTR, BTC | OF SF AF PF |
/// | AAA, AAS | OF SF ZF PF |
/// | DAA, DAS | OF |
/// | AAM, AAD | OF AF CF |
/// | anything else | what iced-x86's tables say (none for the integer instructions above) |
pub fn flag_effect(ins: &Instruction) -> FlagEffect {
    use Mnemonic as M;
    let modified = eflags_of(ins.rflags_modified()) & ARITH;
    let rep = ins.is_string_instruction()
        && (ins.has_rep_prefix() || ins.has_repe_prefix() || ins.has_repne_prefix());
    let fx = |undefined: u32| FlagEffect {
        modified: modified | undefined,
        undefined,
        conditional: rep,
    };
    let m = ins.mnemonic();
    match m {
        M::Shl
        | M::Sal
        | M::Shr
        | M::Sar
        | M::Rol
        | M::Ror
        | M::Rcl
        | M::Rcr
        | M::Shld
        | M::Shrd => {
            let bits = op0_bits(ins);
            match shift_count(ins) {
                Some(0) => FlagEffect {
                    modified: 0,
                    undefined: 0,
                    conditional: false,
                },
                Some(c) => fx(shift_undefined(m, c, bits)),
                None => {
                    let u = (1..32).fold(0, |u, c| u | shift_undefined(m, c, bits));
                    FlagEffect {
                        modified: modified | u,
                        undefined: u,
                        conditional: true,
                    }
                }
            }
        }
        M::Mul | M::Imul => fx(SF | ZF | AF | PF),
        M::Div | M::Idiv => fx(ARITH),
        M::And | M::Or | M::Xor | M::Test => fx(AF),
        M::Bsf | M::Bsr => fx(CF | OF | SF | AF | PF),
        M::Bt | M::Bts | M::Btr | M::Btc => fx(OF | SF | AF | PF),
        M::Aaa | M::Aas => fx(OF | SF | ZF | PF),
        M::Daa | M::Das => fx(OF),
        M::Aam | M::Aad => fx(OF | AF | CF),
        _ => fx(eflags_of(ins.rflags_undefined()) & ARITH),
    }
}

/// The arithmetic flags `ins` reads.
pub fn flags_read(ins: &Instruction) -> u32 {
    eflags_of(ins.rflags_read()) & ARITH
}

fn gpr(r: Register) -> Option<usize> {
    let f = r.full_register32();
    f.is_gpr32().then(|| f.number())
}

fn shift(k: Known, by: i64) -> Known {
    k.map(|(l, h)| (l + by, h + by))
}

/// The state after `ins` runs from state `s`.
pub fn transfer(ins: &Instruction, s: &State, info: &mut InstructionInfoFactory) -> State {
    use Mnemonic as M;
    let fx = flag_effect(ins);
    let mut out = s.clone();
    out.undef = (s.undef & !fx.modified) | fx.undefined;

    let mut written = [false; 8];
    for u in info.info(ins).used_registers() {
        let writes = matches!(
            u.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        );
        if let (true, Some(i)) = (writes, gpr(u.register())) {
            written[i] = true;
        }
    }
    for (r, w) in out.regs.iter_mut().zip(written) {
        if w {
            *r = None;
        }
    }

    let m = ins.mnemonic();
    if m == M::Mov
        && ins.op0_kind() == OpKind::Register
        && ins.op0_register().is_gpr32()
        && ins.op1_kind() == OpKind::Immediate32
    {
        let v = i64::from(ins.immediate32());
        out.regs[ins.op0_register().number()] = Some((v, v));
    }

    let inc = i64::from(ins.stack_pointer_increment());
    if m == M::Leave {
        out.regs[ESP] = shift(s.regs[EBP], 4);
        out.regs[EBP] = None;
    } else if inc != 0 && !(m == M::Pop && gpr(ins.op0_register()) == Some(ESP)) {
        out.regs[ESP] = shift(s.regs[ESP], inc);
        if m == M::Enter {
            out.regs[EBP] = shift(s.regs[ESP], -4);
        }
    }

    if ins.is_string_instruction() {
        let size = ins.memory_size().size() as i64;
        let rep = ins.has_rep_prefix() || ins.has_repe_prefix() || ins.has_repne_prefix();
        let count = if rep {
            s.regs[ECX].map(|(_, h)| h)
        } else {
            Some(1)
        };
        let advance = |k: Known| match (k, count) {
            (Some((l, h)), Some(c)) if c >= 0 => Some((l - size * c, h + size * c)),
            _ => None,
        };
        for r in [ESI, EDI] {
            if written[r] {
                out.regs[r] = advance(s.regs[r]);
            }
        }
        if rep {
            out.regs[ECX] = s.regs[ECX].and_then(|(l, h)| (l >= 0).then_some((0, h)));
        }
    }

    if ins.is_loop() {
        out.regs[ECX] = s.regs[ECX].and_then(|(l, h)| (l >= 1).then_some((l - 1, h - 1)));
    }

    if fx.conditional {
        out = s.join(&out);
    }
    out
}

/// Whether `ins` may continue at its near branch target.
pub fn is_branch(ins: &Instruction) -> bool {
    matches!(
        ins.flow_control(),
        FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch
    ) && matches!(ins.op0_kind(), OpKind::NearBranch32 | OpKind::NearBranch16)
}

/// The result of [`analyze`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    /// For each instruction, the flags undefined before it runs.
    pub before: Vec<u32>,
    /// The flags undefined at the end of the sequence.
    pub end: u32,
    /// The first instruction that reads a flag that may be undefined (the sequence is then not
    /// comparable).
    pub bad_read: Option<usize>,
}

/// Runs the data-flow pass over decoded `instrs` (with their IPs) from `initial`.
pub fn analyze(instrs: &[Instruction], initial: &State) -> Analysis {
    let mut info = InstructionInfoFactory::new();
    let mut pending: BTreeMap<u64, State> = BTreeMap::new();
    let mut cur = initial.clone();
    let mut before = Vec::with_capacity(instrs.len());
    let mut bad_read = None;
    for (i, ins) in instrs.iter().enumerate() {
        if let Some(p) = pending.remove(&ins.ip()) {
            cur = cur.join(&p);
        }
        before.push(cur.undef);
        if bad_read.is_none() && flags_read(ins) & cur.undef != 0 {
            bad_read = Some(i);
        }
        let out = transfer(ins, &cur, &mut info);
        if is_branch(ins) {
            let t = ins.near_branch_target();
            let joined = match pending.remove(&t) {
                Some(p) => p.join(&out),
                None => out.clone(),
            };
            pending.insert(t, joined);
        }
        // An unconditional JMP falls through too, as far as this pass knows: joining more
        // paths only masks more.
        cur = out;
    }
    let end = pending.values().fold(cur, |acc, p| acc.join(p)).undef;
    Analysis {
        before,
        end,
        bad_read,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn decode(
        f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
    ) -> Vec<Instruction> {
        let mut a = CodeAssembler::new(32).unwrap();
        f(&mut a).unwrap();
        let code = a.assemble(0x1000).unwrap();
        Decoder::with_ip(32, &code, 0x1000, DecoderOptions::NONE)
            .into_iter()
            .collect()
    }

    #[test]
    fn the_last_writer_decides_whether_a_flag_is_undefined() {
        let ins = decode(|a| {
            a.mul(ebx)?;
            a.add(eax, 1)?;
            a.mul(ecx)
        });
        let r = analyze(&ins, &State::exact([0; 8]));
        assert_eq!(r.before, [0, SF | ZF | AF | PF, 0]);
        assert_eq!(r.end, SF | ZF | AF | PF);
        assert_eq!(r.bad_read, None);
    }

    #[test]
    fn shift_counts_decide_of_af_and_cf() {
        let end = |f: fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>| {
            analyze(&decode(f), &State::exact([0; 8])).end
        };
        assert_eq!(end(|a| a.shl(eax, 1)), AF);
        assert_eq!(end(|a| a.shl(eax, 3)), AF | OF);
        assert_eq!(
            end(|a| a.shl(eax, 32)),
            0,
            "a masked count of 0 changes nothing"
        );
        assert_eq!(end(|a| a.shr(al, 9)), AF | OF | CF);
        assert_eq!(end(|a| a.rol(eax, 1)), 0);
        assert_eq!(end(|a| a.rcr(eax, cl)), OF);
        assert_eq!(end(|a| a.shld(ax, bx, 17)), ARITH);
    }

    #[test]
    fn a_flag_read_after_an_undefining_writer_is_found() {
        let ins = decode(|a| {
            a.imul_2(eax, ebx)?;
            a.sete(cl)
        });
        assert_eq!(analyze(&ins, &State::exact([0; 8])).bad_read, Some(1));
        let ins = decode(|a| {
            a.imul_2(eax, ebx)?;
            a.setc(cl)
        });
        assert_eq!(
            analyze(&ins, &State::exact([0; 8])).bad_read,
            None,
            "CF is defined"
        );
    }

    #[test]
    fn a_skipped_writer_still_counts_on_the_path_that_runs_it() {
        let ins = decode(|a| {
            let mut l = a.create_label();
            a.jne(l)?;
            a.bsf(eax, ebx)?;
            a.set_label(&mut l)?;
            a.nop()
        });
        let r = analyze(&ins, &State::exact([0; 8]));
        assert_eq!(r.before[2], CF | OF | SF | AF | PF);
    }

    #[test]
    fn pointers_move_with_the_stack_and_string_instructions() {
        let mut gpr = [0u32; 8];
        gpr[ESP] = 0x1000;
        gpr[ESI] = 0x2000;
        let ins = decode(|a| {
            a.push(eax)?;
            a.mov(ecx, 3u32)?;
            a.rep().movsd()?;
            a.enter(8, 0)?;
            a.leave()
        });
        let mut info = InstructionInfoFactory::new();
        let mut s = State::exact(gpr);
        let mut seen = Vec::new();
        for i in &ins {
            s = transfer(i, &s, &mut info);
            seen.push((s.regs[ESP], s.regs[ESI], s.regs[ECX], s.regs[EBP]));
        }
        assert_eq!(seen[0].0, Some((0xFFC, 0xFFC)));
        assert_eq!(seen[2].1, Some((0x2000 - 12, 0x2000 + 12)));
        assert_eq!(seen[2].2, Some((0, 3)));
        assert_eq!(seen[3].0, Some((0xFFC - 12, 0xFFC - 12)));
        assert_eq!(seen[3].3, Some((0xFF8, 0xFF8)));
        assert_eq!(seen[4].0, Some((0xFFC, 0xFFC)), "LEAVE: ESP = EBP + 4");
        assert_eq!(seen[4].3, None);
    }
}
