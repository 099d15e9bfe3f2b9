//! Translating one unit: guest 32-bit code decoded with iced-x86, rewritten under the contract of
//! DESIGN.md §4, and re-encoded for 64-bit mode with iced's `BlockEncoder`.
//!
//! A unit is a run of guest instructions in one 4 KiB page. It starts with the exit-request poll
//! (`mov r11d, [r15+OFF_POLL]`: a load from a page the monitor revokes to make translated code
//! leave) and the retired-instruction count (`lea r14, [r14+n]`), then the translated
//! instructions, and ends at the first control transfer, callout, page end or the instruction
//! cap. Every host instruction is tagged with the guest instruction it belongs to; the
//! encoder's new-instruction offsets turn the tags into the host-offset → guest-EIP map that
//! makes faults precise.
//!
//! How each guest instruction is translated:
//! - **Ident**: the same instruction in 64-bit mode, with guest ESP replaced by R12D and its
//!   memory operand addressed as `gs:[32-bit address]` (a 0x67 address-size prefix, so the
//!   address wraps modulo 4 GiB inside the window).
//! - **Rewritten**: forms that do not exist or mean something else in 64-bit mode (`inc`/`dec`
//!   0x40–0x4F, the moffs forms of `mov`), every stack operation (push, pop, pusha, popa,
//!   leave, call, ret) expanded against R12D, and MOVS/STOS/LODS/CMPS/SCAS as loads and
//!   stores through GS. Each expansion performs every access that may fault before it changes
//!   any guest register, so a fault restarts the guest instruction. With REP/REPE/REPNE the
//!   string instruction is a loop that polls for exit requests between iterations and updates
//!   ECX/ESI/EDI after each: a fault or a slice's end leaves it part done, as on the CPU.
//! - **Folded ESP**: a stack operation does not move R12D itself. The unit keeps a pending
//!   delta d (guest ESP = R12D + d): stack accesses address `gs:[r12d+d+off]` and change only
//!   d, ESP-based memory operands take d into their displacement, and
//!   `Emitter::sync_esp` (`lea r12d,[r12d+d]`, flags untouched) runs only before ESP is used
//!   as a register and before every exit of the unit. Each map entry records the d of its host
//!   instruction, so the monitor restarts a faulting instruction with ESP = R12D + d.
//! - **Segment bases**: CS is flat whenever translated code runs; DS, ES and SS are writable,
//!   expand-up data segments with a 4 GiB limit and any base, FS and GS may be (the mode bits
//!   say which bases are non-zero or usable). An operand through a segment with a base gets it
//!   added from the context with `mov`/`lea` only (flags untouched), in 32 bits: `lea r8d` of
//!   base + offset for ordinary operands, `gs:[r10d+esi]`/`gs:[r10d+edi]` for string
//!   instructions, and `gs:[r11d+r12d+d+off]` for stack operations (R11D holds SS.base from
//!   the unit's first stack access on). The linear address wraps modulo 4 GiB as the guest's
//!   does and stays in the window.
//! - **Control flow**: direct jumps and branches end the unit in patchable `jmp`/`jcc rel32`
//!   slots that first lead to an exit and are chained to the target unit once it exists;
//!   indirect jumps, calls and returns go through a flag-preserving lookup table.
//! - **Callout**: everything else — privileged and sensitive instructions, segment loads,
//!   INS/OUTS, REP MOVS/STOS (and other REP string instructions in an STI's shadow),
//!   FS/GS-relative operands whose
//!   segment is not flat, 16-bit addressing, x87/SSE where the mode does not let them run
//!   natively — ends the unit with an exit asking the interpreter to execute that one
//!   instruction.

mod fp;

use std::sync::OnceLock;

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, ConditionCode, Decoder, DecoderOptions, Instruction,
    InstructionBlock, MemoryOperand, Mnemonic, OpKind, Register,
};
use vmdriver::world::{
    OFF_DF_STEP, OFF_DS_BASE, OFF_ES_BASE, OFF_EXIT_EIP, OFF_EXIT_REASON, OFF_EXIT_SLOT,
    OFF_EXIT_STUB, OFF_EXIT_UNIT, OFF_FS_BASE, OFF_GS_BASE, OFF_IRQ_PENDING, OFF_LOOKUP,
    OFF_LOOKUP_HITS, OFF_POLL, OFF_RELOAD, OFF_SEGMENT_RELOADS, OFF_SELECTORS, OFF_SS_BASE,
    OFF_SYSFLAGS, OFF_VIF, RELOAD_ADDRESS, RELOAD_KEY, RELOAD_NEG_DESCRIPTOR, RELOAD_SIZE, reason,
};

/// What a unit may assume about the CPU it runs on: part of its key in the cache, so a unit
/// only runs in the mode it was translated for (the monitor enters units of the current mode;
/// chains link units of one mode; the lookup table is emptied when the mode changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mode(pub u8);

impl Mode {
    /// CPL 0: CLI, STI and PUSHF run inline on the virtual IF in the context.
    pub const CPL0: u8 = 1;
    /// FS is a present, writable, expand-up data segment with a 4 GiB limit: FS-relative
    /// operands only need its base (from the context) added.
    pub const FS_FLAT: u8 = 2;
    /// GS likewise.
    pub const GS_FLAT: u8 = 4;
    /// x87 and MMX instructions run natively (see the `fp` module): CR0.EM and CR0.TS clear,
    /// every x87 and MXCSR exception masked, no x87 error pending.
    pub const FPU: u8 = 8;
    /// SSE and SSE2 instructions too (CR4.OSFXSR set as well).
    pub const SSE: u8 = 16;
    /// DS has a non-zero base, which DS-relative operands add from the context. DS, ES and SS
    /// are always present, writable, expand-up data segments with a 4 GiB limit while
    /// translated code runs; without this bit a unit assumes DS.base is 0.
    pub const DS_BASED: u8 = 32;
    /// ES likewise (the destination of string instructions).
    pub const ES_BASED: u8 = 64;
    /// SS likewise: stack operations and EBP/ESP-based operands.
    pub const SS_BASED: u8 = 128;

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    /// Whether units of this mode add a non-zero DS, ES or SS base.
    pub fn segment_bases(self) -> bool {
        self.has(Self::DS_BASED | Self::ES_BASED | Self::SS_BASED)
    }
}

/// The exit unit of a callout from the middle of a unit (whose exit slot then holds the
/// instruction's mnemonic, `Mnemonic as u32`).
pub const MID_UNIT: u32 = u32::MAX;

/// Most guest instructions in one unit.
pub const MAX_INSTRUCTIONS: usize = 48;

/// The first offset in a page from which an instruction (at most 15 bytes) may run on into
/// the next page.
pub const CROSS_FROM: u32 = 0x1000 - 14;

/// Whether an instruction at `eip` may run on into the next page: code there depends on that
/// page's mapping too.
pub fn may_cross_page(eip: u32) -> bool {
    eip & 0xFFF >= CROSS_FROM
}

/// Errors translating a unit (bugs in the translator, never guest behaviour).
#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    /// iced could not build or encode an instruction.
    #[error("the translator could not encode the unit at {eip:#010x}: {message}")]
    Encode {
        /// The unit's guest EIP.
        eip: u32,
        /// iced's message.
        message: String,
    },
}

/// A patchable rel32 jump at the end of a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Offset of the rel32 field from the start of the unit.
    pub rel32_offset: u32,
    /// The guest EIP it leads to.
    pub target: u32,
}

/// One entry of the host-offset → guest-EIP map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Offset of the host instruction from the start of the unit.
    pub host_offset: u32,
    /// The guest instruction it belongs to.
    pub guest_eip: u32,
    /// Its index among the unit's translated instructions (how many retired before it).
    pub index: u32,
    /// Guest ESP minus R12D while this host instruction runs, as seen from the start of its
    /// guest instruction: stack operations inside a unit fold their ESP moves into a pending
    /// delta, so a fault here restarts the guest instruction with ESP = R12D + this.
    pub esp_delta: i32,
}

/// An encoded unit, ready to be placed at the address it was encoded for.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Host code.
    pub code: Vec<u8>,
    /// Host-offset → guest-EIP map, sorted by host offset.
    pub map: Vec<MapEntry>,
    /// Patchable exits.
    pub slots: Vec<Slot>,
    /// Guest instructions translated (the callout that may end the unit is not one).
    pub instructions: u32,
    /// One past the last guest byte the unit covers.
    pub guest_end: u32,
    /// The instruction the unit ends with a callout for, if any.
    pub callout: Option<Mnemonic>,
    /// Whether the unit's (one) instruction runs on into the next page: the unit then depends
    /// on that page's code too.
    pub crosses: bool,
    /// Stack-pointer moves of the unit's stack operations (push, pop, call, ret, ...).
    pub esp_moves: u32,
    /// `lea r12d` updates emitted to bring R12D up to date with them: the rest were folded.
    pub esp_updates: u32,
}

/// Host registers translated code uses for itself (never guest state).
const GUEST_ESP: Register = Register::R12D;
const S0: Register = Register::R8D;
const S0Q: Register = Register::R8;
const S1Q: Register = Register::R9;
const S1: Register = Register::R9D;
const S2Q: Register = Register::R10;
const S3Q: Register = Register::R11;
const S3: Register = Register::R11D;
/// Holds SS.base in units translated for [`Mode::SS_BASED`], loaded by the unit's first SS
/// access (see [`Emitter::ss_mem`]).
const SS_REG: Register = S3;
/// The segment base of a string instruction's source or destination (see [`string_op`]).
const STR_BASE: Register = Register::R10D;
/// The ES base of a REP string instruction whose source segment has a base too (in
/// [`STR_BASE`]); only inside the REP loop, which needs no RCX save (see [`string_op`]).
const REP_DST_BASE: Register = Register::R13D;
const SAVE_Q: Register = Register::R13;
const COUNT_Q: Register = Register::R14;
const CTX: Register = Register::R15;

fn ctx(off: i32) -> MemoryOperand {
    MemoryOperand::with_base_displ(CTX, i64::from(off))
}

/// `gs:[base + disp]` with 32-bit addressing.
fn gs_mem(base: Register, disp: i32) -> MemoryOperand {
    MemoryOperand::new(
        base,
        Register::None,
        1,
        i64::from(disp),
        4,
        false,
        Register::GS,
    )
}

/// Host code copied into a unit as it is: the placeholder instruction at `index` in the
/// unit's list stands for `len` bytes from `start` of the unit's raw bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawSpan {
    pub index: usize,
    pub start: u32,
    pub len: u32,
}

/// A host code sequence every unit emits the same way but for a few 32-bit immediates (the
/// lookup after an indirect branch, a slot's trampoline), encoded once and copied into units
/// as raw byte spans: most of a unit's host instructions are these sequences, and encoding them
/// instruction by instruction was most of the cost of translating a unit.
struct Template {
    code: Vec<u8>,
    /// Offsets of the imm32 fields to fill in, in the order of the values given.
    patches: Vec<usize>,
}

impl Template {
    /// Encodes what `build` emits (position-independent: branches only to its own labels);
    /// `build` returns the indices of the instructions whose trailing imm32 are the patch
    /// fields. The sequences are fixed host code, so one that does not encode that way is a
    /// bug in the translator (every unit test translating a branch would fail), not something
    /// a guest can cause.
    fn build(build: impl FnOnce(&mut Emitter) -> Vec<usize>) -> Template {
        let mut e = Emitter::new(0, Mode::default(), 0);
        let indices = build(&mut e);
        assert!(e.err.is_none(), "a template failed to encode: {:?}", e.err);
        let block = crate::encode::encode(&e.out, &[], &[], 0)
            .expect("a template is position-independent, its branches to its own labels");
        let patches = indices
            .into_iter()
            .map(|idx| {
                let start = block.offsets[idx] as usize;
                let mut d = Decoder::with_ip(64, &block.code[start..], 0, DecoderOptions::NONE);
                let ins = d.decode();
                let c = d.get_constant_offsets(&ins);
                assert!(
                    c.has_immediate() && c.immediate_size() == 4,
                    "a template's patch field is not an imm32: {ins}"
                );
                start + c.immediate_offset()
            })
            .collect();
        Template {
            code: block.code,
            patches,
        }
    }
}

/// The host instructions of a unit being built, each tagged with its guest instruction.
struct Emitter {
    out: Vec<Instruction>,
    /// Host code copied in rather than encoded (see [`Template`]): (index in `out` of its
    /// placeholder, start in `raw_bytes`, length), in the order of `out`.
    raw: Vec<RawSpan>,
    raw_bytes: Vec<u8>,
    /// (guest EIP, index, pending ESP delta) of each host instruction.
    tags: Vec<(u32, u32, i32)>,
    next_ip: u64,
    /// (index of the slot's `db` instruction, offset of rel32 in it, trampoline label, target).
    slots: Vec<(usize, u32, u64, u32)>,
    tag: (u32, u32),
    err: Option<String>,
    mode: Mode,
    unit_id: u32,
    /// The guest's x87/SSE state is in the host FPU from here on in the unit.
    fp_loaded: bool,
    /// FOP of the instruction being translated (if it is an x87 one).
    fop: u16,
    /// Guest ESP minus R12D: stack operations move only this, and [`Emitter::sync_esp`]
    /// brings R12D up to date before anything that needs ESP as a value and before every exit.
    esp_delta: i32,
    /// Stack-pointer moves (see [`Encoded::esp_moves`]).
    esp_moves: u32,
    /// R12D updates emitted (see [`Encoded::esp_updates`]).
    esp_updates: u32,
    /// [`SS_REG`] holds SS.base from here on in the unit.
    ss_loaded: bool,
    /// The instruction being translated is in an inline STI's interrupt shadow.
    in_shadow: bool,
    /// Exits from inside the unit ([`Emitter::mid_unit_callout`]): (index of their
    /// `lea r14` instruction, index of their guest instruction), for the count of guest
    /// instructions that did not retire, known once the unit is complete.
    uncounts: Vec<(usize, u32)>,
}

impl Emitter {
    fn new(eip: u32, mode: Mode, unit_id: u32) -> Self {
        Self {
            out: Vec::with_capacity(128),
            raw: Vec::new(),
            raw_bytes: Vec::new(),
            tags: Vec::with_capacity(128),
            next_ip: 0x1000,
            slots: Vec::new(),
            tag: (eip, 0),
            err: None,
            mode,
            unit_id,
            fp_loaded: false,
            fop: 0,
            esp_delta: 0,
            esp_moves: 0,
            esp_updates: 0,
            ss_loaded: false,
            in_shadow: false,
            uncounts: Vec::new(),
        }
    }

    /// Drops every host instruction from index `len` on (and the slots among them).
    fn truncate(&mut self, len: usize) {
        self.out.truncate(len);
        self.tags.truncate(len);
        self.raw.retain(|r| r.index < len);
        self.slots.retain(|s| s.0 < len);
        self.uncounts.retain(|u| u.0 < len);
    }

    fn label(&mut self) -> u64 {
        self.next_ip += 1;
        self.next_ip
    }

    fn push_at(&mut self, mut ins: Instruction, ip: u64) -> usize {
        ins.set_ip(ip);
        self.out.push(ins);
        self.tags.push((self.tag.0, self.tag.1, self.esp_delta));
        self.out.len() - 1
    }

    fn push(&mut self, ins: Instruction) -> usize {
        let ip = self.label();
        self.push_at(ins, ip)
    }

    fn emit(&mut self, r: Result<Instruction, iced_x86::IcedError>) -> usize {
        match r {
            Ok(ins) => self.push(ins),
            Err(e) => {
                self.err.get_or_insert(e.to_string());
                self.push(Instruction::with(Code::Nopd))
            }
        }
    }

    fn emit_at(&mut self, r: Result<Instruction, iced_x86::IcedError>, ip: u64) -> usize {
        match r {
            Ok(ins) => self.push_at(ins, ip),
            Err(e) => {
                self.err.get_or_insert(e.to_string());
                self.push_at(Instruction::with(Code::Nopd), ip)
            }
        }
    }

    /// `mov dword [r15+off], imm` (the index of the instruction).
    fn store_ctx(&mut self, off: i32, value: u32) -> usize {
        self.emit(Instruction::with2(Code::Mov_rm32_imm32, ctx(off), value))
    }

    fn jmp_exit_stub(&mut self) {
        self.emit(Instruction::with1(Code::Jmp_rm64, ctx(OFF_EXIT_STUB)));
    }

    /// An exit asking the interpreter to execute the instruction at `eip` (the unit is named
    /// so the monitor can count the callout by the mnemonic it recorded).
    fn callout(&mut self, eip: u32) {
        self.sync_esp();
        self.store_ctx(OFF_EXIT_EIP, eip);
        self.store_ctx(OFF_EXIT_UNIT, self.unit_id);
        self.store_ctx(OFF_EXIT_REASON, reason::CALLOUT);
        self.jmp_exit_stub();
    }

    /// A callout for the instruction being translated from the middle of the unit, on a path
    /// the code after it does not take: the pending ESP delta is brought into R12D on this path
    /// only, and the unit's instructions from this one on are taken back off the retired count
    /// (the unit counted them all at its entry; the interpreter counts this one). No unit
    /// names the instruction: the exit carries [`MID_UNIT`] as its unit and the instruction's
    /// mnemonic (`m`, as a number) as its slot, for the monitor's callout counters.
    fn mid_unit_callout(&mut self, m: Mnemonic) {
        let (delta, updates) = (self.esp_delta, self.esp_updates);
        let idx = self.emit(Instruction::with2(
            Code::Lea_r64_m,
            COUNT_Q,
            MemoryOperand::with_base_displ(COUNT_Q, 0),
        ));
        self.uncounts.push((idx, self.tag.1));
        self.sync_esp();
        self.store_ctx(OFF_EXIT_EIP, self.tag.0);
        self.store_ctx(OFF_EXIT_UNIT, MID_UNIT);
        self.store_ctx(OFF_EXIT_SLOT, m as u32);
        self.store_ctx(OFF_EXIT_REASON, reason::CALLOUT);
        self.jmp_exit_stub();
        (self.esp_delta, self.esp_updates) = (delta, updates);
    }

    /// Goes on past this point only if RCX-free scratch `value` (a 64-bit register) is 0;
    /// otherwise leaves with [`Emitter::mid_unit_callout`] for the instruction (mnemonic `m`).
    /// RFLAGS untouched (`jrcxz`, RCX kept in R13); clobbers `value`.
    fn callout_unless_zero(&mut self, value: Register, m: Mnemonic) {
        let zero = self.label();
        self.emit(Instruction::with2(
            Code::Mov_r64_rm64,
            SAVE_Q,
            Register::RCX,
        ));
        self.emit(Instruction::with2(Code::Mov_r64_rm64, Register::RCX, value));
        self.emit(Instruction::with_branch(Code::Jrcxz_rel8_64, zero));
        self.emit(Instruction::with2(
            Code::Mov_r64_rm64,
            Register::RCX,
            SAVE_Q,
        ));
        self.mid_unit_callout(m);
        self.emit_at(
            Instruction::with2(Code::Mov_r64_rm64, Register::RCX, SAVE_Q),
            zero,
        );
    }

    /// The reload fast path for a load of segment register `seg` (iced's DS, ES, FS or GS)
    /// with the selector zero-extended in R9: unless the selector is the one the register
    /// holds and the GDT still has the exact descriptor bytes it was loaded from (the monitor
    /// armed [`vmdriver::world::SegmentReload`] only where a load of those at CPL 0 would then
    /// change nothing), the interpreter does the full load. The GDT read goes through the
    /// window like any guest access: a fault there restarts the instruction in the
    /// interpreter. `m` is the instruction's mnemonic. RFLAGS untouched; clobbers R9, R10.
    fn segment_reload(&mut self, seg: Register, m: Mnemonic) {
        let at = OFF_RELOAD + RELOAD_SIZE * seg.number() as i32;
        self.emit(Instruction::with2(
            Code::Mov_r64_rm64,
            S2Q,
            ctx(at + RELOAD_KEY),
        ));
        // key = !selector: key + selector + 1 is 0 exactly when they match.
        self.emit(Instruction::with2(
            Code::Lea_r64_m,
            S2Q,
            MemoryOperand::new(S2Q, S1Q, 1, 1, 1, false, Register::None),
        ));
        self.callout_unless_zero(S2Q, m);
        self.emit(Instruction::with2(
            Code::Mov_r32_rm32,
            S1,
            ctx(at + RELOAD_ADDRESS),
        ));
        self.emit(Instruction::with2(Code::Mov_r64_rm64, S1Q, gs_at(S1)));
        self.emit(Instruction::with2(
            Code::Mov_r64_rm64,
            S2Q,
            ctx(at + RELOAD_NEG_DESCRIPTOR),
        ));
        self.emit(Instruction::with2(
            Code::Lea_r64_m,
            S2Q,
            MemoryOperand::new(S1Q, S2Q, 1, 0, 0, false, Register::None),
        ));
        self.callout_unless_zero(S2Q, m);
        self.emit(Instruction::with2(
            Code::Mov_r64_rm64,
            S1Q,
            ctx(OFF_SEGMENT_RELOADS),
        ));
        self.emit(Instruction::with2(
            Code::Lea_r64_m,
            S1Q,
            MemoryOperand::with_base_displ(S1Q, 1),
        ));
        self.emit(Instruction::with2(
            Code::Mov_rm64_r64,
            ctx(OFF_SEGMENT_RELOADS),
            S1Q,
        ));
    }

    /// An exit asking the monitor to execute the instruction at `eip` in an STI's interrupt
    /// shadow.
    fn sti_shadow_exit(&mut self, eip: u32) {
        self.sync_esp();
        self.store_ctx(OFF_EXIT_EIP, eip);
        self.store_ctx(OFF_EXIT_REASON, reason::STI_SHADOW);
        self.jmp_exit_stub();
    }

    /// Leaves for the monitor (continuing at `next`) when an interrupt waits for IF, which
    /// inline code just set; RFLAGS untouched.
    fn irq_check(&mut self, next: u32) {
        self.sync_esp();
        let none = self.label();
        self.emit(Instruction::with2(
            Code::Mov_r64_rm64,
            SAVE_Q,
            Register::RCX,
        ));
        self.emit(Instruction::with2(
            Code::Mov_r32_rm32,
            Register::ECX,
            ctx(OFF_IRQ_PENDING),
        ));
        self.emit(Instruction::with_branch(Code::Jrcxz_rel8_64, none));
        self.emit(Instruction::with2(
            Code::Mov_r64_rm64,
            Register::RCX,
            SAVE_Q,
        ));
        self.store_ctx(OFF_EXIT_EIP, next);
        self.store_ctx(OFF_EXIT_REASON, reason::IRQ_WINDOW);
        self.jmp_exit_stub();
        self.emit_at(
            Instruction::with2(Code::Mov_r64_rm64, Register::RCX, SAVE_Q),
            none,
        );
    }

    /// A patchable `jmp rel32` (or `jcc rel32`) to `target`, leading to an exit for now.
    fn slot(&mut self, cc: Option<u8>, target: u32) {
        self.sync_esp();
        let tramp = self.label();
        let (ins, off) = match cc {
            None => (Instruction::with_declare_byte_5(0xE9, 0, 0, 0, 0), 1),
            Some(c) => (
                Instruction::with_declare_byte_6(0x0F, 0x80 | c, 0, 0, 0, 0),
                2,
            ),
        };
        let idx = self.push(ins);
        self.slots.push((idx, off, tramp, target));
    }

    /// The trampolines the slots lead to until chained. Each tries the lookup table first:
    /// with paging on the monitor does not chain to another page (it may map elsewhere the
    /// next time) nor to a unit whose instruction runs on into the next page, so those
    /// targets go through the table, as indirect ones do; only a miss leaves. Each is a copy
    /// of one [`Template`] with its target, unit and slot filled in.
    fn trampolines(&mut self, unit_id: u32) {
        static TRAMPOLINE: OnceLock<Template> = OnceLock::new();
        let template = TRAMPOLINE.get_or_init(|| {
            Template::build(|e| {
                let target = e.emit(Instruction::with2(Code::Mov_r32_imm32, S0, 0u32));
                let mut patches = vec![target];
                patches.extend(e.lookup_or(Miss::Branch { unit: 0, slot: 0 }));
                patches
            })
        });
        let slots = self.slots.clone();
        for (k, (_, _, tramp, target)) in slots.into_iter().enumerate() {
            self.copy_template(template, &[target, unit_id, k as u32], Some(tramp));
        }
    }

    /// Emits `t`'s code with its patch fields set to `values` (in order), at label `at` if
    /// given: one placeholder instruction in `out` whose bytes the encoder copies. Every
    /// template is a lookup, so R12D is brought up to date first and R11 (SS.base) is lost.
    fn copy_template(&mut self, t: &Template, values: &[u32], at: Option<u64>) {
        self.sync_esp();
        self.ss_loaded = false;
        let start = self.raw_bytes.len();
        self.raw_bytes.extend_from_slice(&t.code);
        for (&field, value) in t.patches.iter().zip(values) {
            self.raw_bytes[start + field..start + field + 4].copy_from_slice(&value.to_le_bytes());
        }
        let ip = at.unwrap_or_else(|| self.label());
        let index = self.push_at(Instruction::default(), ip);
        self.raw.push(RawSpan {
            index,
            start: start as u32,
            len: t.code.len() as u32,
        });
    }

    /// Stores what a lookup miss or untaken slot needs and leaves (exit EIP already stored).
    /// Returns the indices of the stores of a [`Miss::Branch`]'s unit and slot.
    fn branch_exit(&mut self, miss: Miss) -> Vec<usize> {
        let stores = match miss {
            Miss::Lookup => {
                self.store_ctx(OFF_EXIT_REASON, reason::LOOKUP_MISS);
                Vec::new()
            }
            Miss::Branch { unit, slot } => {
                let stores = vec![
                    self.store_ctx(OFF_EXIT_UNIT, unit),
                    self.store_ctx(OFF_EXIT_SLOT, slot),
                ];
                self.store_ctx(OFF_EXIT_REASON, reason::BRANCH);
                stores
            }
        };
        self.jmp_exit_stub();
        stores
    }

    /// Jumps to the translation of the guest EIP in S0 (R8D) through the lookup table, leaving
    /// RFLAGS untouched; a miss exits to the monitor. A copy of one [`Template`].
    fn lookup(&mut self) {
        static LOOKUP: OnceLock<Template> = OnceLock::new();
        let template = LOOKUP.get_or_init(|| {
            Template::build(|e| {
                e.lookup_or(Miss::Lookup);
                Vec::new()
            })
        });
        self.copy_template(template, &[], None);
    }

    /// [`Emitter::lookup`], with what a miss reports. Returns the indices of the instructions
    /// whose last four bytes are a [`Miss::Branch`]'s unit and slot (none for
    /// [`Miss::Lookup`]).
    fn lookup_or(&mut self, miss: Miss) -> Vec<usize> {
        self.sync_esp();
        // R11 (SS_REG) is the lookup's scratch.
        self.ss_loaded = false;
        let hit = self.label();
        self.emit(Instruction::with2(Code::Movzx_r32_rm16, S1, Register::R8W));
        self.emit(Instruction::with2(Code::Mov_r64_rm64, S2Q, ctx(OFF_LOOKUP)));
        self.emit(Instruction::with2(
            Code::Lea_r64_m,
            S1Q,
            MemoryOperand::new(S1Q, S1Q, 1, 0, 0, false, Register::None),
        ));
        self.emit(Instruction::with2(
            Code::Mov_r64_rm64,
            S3Q,
            MemoryOperand::new(S2Q, S1Q, 8, 0, 0, false, Register::None),
        ));
        // key = !eip, so key + eip + 1 == 0 exactly on a hit (and an empty entry never hits).
        self.emit(Instruction::with2(
            Code::Lea_r64_m,
            S3Q,
            MemoryOperand::new(S3Q, S0Q, 1, 1, 1, false, Register::None),
        ));
        self.emit(Instruction::with2(
            Code::Mov_r64_rm64,
            SAVE_Q,
            Register::RCX,
        ));
        self.emit(Instruction::with2(Code::Mov_r64_rm64, Register::RCX, S3Q));
        self.emit(Instruction::with_branch(Code::Jrcxz_rel8_64, hit));
        self.emit(Instruction::with2(
            Code::Mov_r64_rm64,
            Register::RCX,
            SAVE_Q,
        ));
        self.emit(Instruction::with2(
            Code::Mov_rm32_r32,
            ctx(OFF_EXIT_EIP),
            S0,
        ));
        let stores = self.branch_exit(miss);
        self.emit_at(
            Instruction::with2(Code::Mov_r64_rm64, Register::RCX, SAVE_Q),
            hit,
        );
        self.emit(Instruction::with2(
            Code::Mov_r64_rm64,
            S3Q,
            ctx(OFF_LOOKUP_HITS),
        ));
        self.emit(Instruction::with2(
            Code::Lea_r64_m,
            S3Q,
            MemoryOperand::with_base_displ(S3Q, 1),
        ));
        self.emit(Instruction::with2(
            Code::Mov_rm64_r64,
            ctx(OFF_LOOKUP_HITS),
            S3Q,
        ));
        self.emit(Instruction::with1(
            Code::Jmp_rm64,
            MemoryOperand::new(S2Q, S1Q, 8, 8, 1, false, Register::None),
        ));
        stores
    }

    /// `gs:[guest ESP + disp]`: `[r12d + pending delta + disp]` (plus SS.base), modulo 4 GiB
    /// as on the guest.
    fn stack(&mut self, disp: i32) -> MemoryOperand {
        self.ss_mem(GUEST_ESP, self.esp_delta.wrapping_add(disp))
    }

    /// `gs:[SS.base + reg + disp]` for an SS-relative access: with a non-zero SS.base (in
    /// [`SS_REG`], loaded from the context by the unit's first such access) it is the SIB base
    /// and `reg` the index, so the 32-bit address wraps modulo 4 GiB as the guest's linear
    /// address does, and no flags change.
    fn ss_mem(&mut self, reg: Register, disp: i32) -> MemoryOperand {
        if !self.mode.has(Mode::SS_BASED) {
            return gs_mem(reg, disp);
        }
        if !self.ss_loaded {
            self.emit(Instruction::with2(
                Code::Mov_r32_rm32,
                SS_REG,
                ctx(OFF_SS_BASE),
            ));
            self.ss_loaded = true;
        }
        MemoryOperand::new(SS_REG, reg, 1, i64::from(disp), 4, false, Register::GS)
    }

    /// `mov gs:[esp+disp], src` for a 32-bit register or immediate.
    fn store_stack(&mut self, disp: i32, src: Src) {
        let m = self.stack(disp);
        match src {
            Src::Reg(r) => self.emit(Instruction::with2(Code::Mov_rm32_r32, m, r)),
            Src::Imm(v) => self.emit(Instruction::with2(Code::Mov_rm32_imm32, m, v)),
        };
    }

    /// `mov dst, gs:[esp+disp]`.
    fn load_stack(&mut self, dst: Register, disp: i32) {
        let m = self.stack(disp);
        self.emit(Instruction::with2(Code::Mov_r32_rm32, dst, m));
    }

    /// Moves guest ESP by `delta` once the instruction's accesses are done: only the pending
    /// delta changes, R12D stays behind until [`Emitter::sync_esp`].
    fn adjust_esp(&mut self, delta: i32) {
        if delta != 0 {
            self.esp_delta = self.esp_delta.wrapping_add(delta);
            self.esp_moves += 1;
        }
    }

    /// `lea r12d, [r12d+delta]` for the pending delta (flags untouched): from here on R12D is
    /// guest ESP again.
    fn sync_esp(&mut self) {
        if self.esp_delta != 0 {
            let d = self.esp_delta;
            self.emit(Instruction::with2(
                Code::Lea_r32_m,
                GUEST_ESP,
                gs_lea(GUEST_ESP, d),
            ));
            self.esp_delta = 0;
            self.esp_updates += 1;
        }
    }
}

/// A memory operand for `lea` with 32-bit addressing (no segment).
fn gs_lea(base: Register, disp: i32) -> MemoryOperand {
    MemoryOperand::new(
        base,
        Register::None,
        1,
        i64::from(disp),
        4,
        false,
        Register::None,
    )
}

/// What a lookup miss reports to the monitor.
#[derive(Clone, Copy)]
enum Miss {
    /// An indirect branch: [`reason::LOOKUP_MISS`].
    Lookup,
    /// A direct branch's slot: [`reason::BRANCH`], so the monitor may chain it.
    Branch { unit: u32, slot: u32 },
}

#[derive(Clone, Copy)]
enum Src {
    Reg(Register),
    Imm(u32),
}

fn map_reg(r: Register) -> Register {
    match r {
        Register::ESP => GUEST_ESP,
        Register::SP => Register::R12W,
        _ => r,
    }
}

fn high_byte(r: Register) -> bool {
    matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
}

/// The guest memory operand as a host `gs:[…]` operand, or None if it cannot be (CS, FS or GS
/// segments the unit's mode does not make flat-limit, and 16-bit addressing). DS, ES and SS are
/// flat-limit whenever translated code runs. With a segment whose base the unit adds (see
/// [`segment_base`]) the operand is `gs:[r8d]`, and the second value is the context offset of
/// the segment base that [`seg_address`] adds into R8D first. `segment` None is for LEA (no segment, no access). An ESP base is R12D with the
/// pending `esp_delta` added to the displacement (the SIB base; ESP is never an index).
fn guest_mem(
    ins: &Instruction,
    segment: Option<Register>,
    mode: Mode,
    esp_delta: i32,
) -> Option<(MemoryOperand, Option<i32>)> {
    let base = ins.memory_base();
    let index = ins.memory_index();
    if base.is_gpr16()
        || index.is_gpr16()
        || (base == Register::None && index == Register::None && ins.memory_displ_size() == 2)
    {
        return None;
    }
    let based = match segment {
        None => None,
        Some(_) => segment_base(mode, ins.memory_segment())?,
    };
    if let Some(off) = based {
        let m = MemoryOperand::new(S0, Register::None, 1, 0, 0, false, Register::GS);
        return Some((m, Some(off)));
    }
    Some((
        MemoryOperand::new(
            map_reg(base),
            index,
            ins.memory_index_scale(),
            i64::from(displacement(ins, esp_delta)),
            4,
            false,
            segment.unwrap_or(Register::None),
        ),
        None,
    ))
}

/// How the unit adds the base of guest segment `seg` to an offset: Some(None) if its base is 0,
/// Some(Some(context offset of the base)) if it must be added, None if the segment is not one
/// translated code can address (CS, which is not writable and rare as an override, and an FS or
/// GS without a flat limit).
fn segment_base(mode: Mode, seg: Register) -> Option<Option<i32>> {
    Some(match seg {
        Register::DS if mode.has(Mode::DS_BASED) => Some(OFF_DS_BASE),
        Register::ES if mode.has(Mode::ES_BASED) => Some(OFF_ES_BASE),
        Register::SS if mode.has(Mode::SS_BASED) => Some(OFF_SS_BASE),
        Register::DS | Register::ES | Register::SS => None,
        Register::FS if mode.has(Mode::FS_FLAT) => Some(OFF_FS_BASE),
        Register::GS if mode.has(Mode::GS_FLAT) => Some(OFF_GS_BASE),
        _ => return None,
    })
}

/// The displacement of `ins`'s memory operand, with the pending ESP delta added if ESP is its
/// base (modulo 4 GiB: the address wraps as the guest's would).
fn displacement(ins: &Instruction, esp_delta: i32) -> u32 {
    let d = ins.memory_displacement32();
    if ins.memory_base() == Register::ESP {
        d.wrapping_add(esp_delta as u32)
    } else {
        d
    }
}

/// Emits `r8d = segment base (context offset `base_off`) + the effective address of `ins`'s
/// memory operand`, modulo 4 GiB, without touching flags (two `lea`s with 32-bit addressing).
fn seg_address(e: &mut Emitter, ins: &Instruction, base_off: i32) {
    e.emit(Instruction::with2(Code::Mov_r32_rm32, S1, ctx(base_off)));
    let base = map_reg(ins.memory_base());
    let index = ins.memory_index();
    let scale = ins.memory_index_scale();
    let disp = i64::from(displacement(ins, e.esp_delta) as i32);
    let lea = |b: Register, i: Register, sc: u32, d: i64| {
        Instruction::with2(
            Code::Lea_r32_m,
            S0,
            MemoryOperand::new(b, i, sc, d, 4, false, Register::None),
        )
    };
    match (base, index) {
        (Register::None, Register::None) => e.emit(lea(S1, Register::None, 1, disp)),
        (b, Register::None) => e.emit(lea(S1, b, 1, disp)),
        (Register::None, i) => e.emit(lea(S1, i, scale, disp)),
        (b, i) => {
            e.emit(lea(b, i, scale, disp));
            e.emit(lea(S0, S1, 1, 0))
        }
    };
}

/// Mnemonics that mean the same in 64-bit mode once ESP is R12D and memory is GS-relative.
fn ident_mnemonic(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Add
            | M::Or
            | M::Adc
            | M::Sbb
            | M::And
            | M::Sub
            | M::Xor
            | M::Cmp
            | M::Test
            | M::Inc
            | M::Dec
            | M::Neg
            | M::Not
            | M::Mul
            | M::Imul
            | M::Div
            | M::Idiv
            | M::Mov
            | M::Movzx
            | M::Movsx
            | M::Lea
            | M::Xchg
            | M::Cmpxchg
            | M::Cmpxchg8b
            | M::Xadd
            | M::Rol
            | M::Ror
            | M::Rcl
            | M::Rcr
            | M::Shl
            | M::Sal
            | M::Shr
            | M::Sar
            | M::Shld
            | M::Shrd
            | M::Bt
            | M::Bts
            | M::Btr
            | M::Btc
            | M::Bsf
            | M::Bsr
            | M::Bswap
            | M::Cbw
            | M::Cwde
            | M::Cdq
            | M::Cwd
            | M::Lahf
            | M::Sahf
            | M::Clc
            | M::Stc
            | M::Cmc
            | M::Cld
            | M::Std
            | M::Nop
            | M::Pause
            | M::Seto
            | M::Setno
            | M::Setb
            | M::Setae
            | M::Sete
            | M::Setne
            | M::Setbe
            | M::Seta
            | M::Sets
            | M::Setns
            | M::Setp
            | M::Setnp
            | M::Setl
            | M::Setge
            | M::Setle
            | M::Setg
            | M::Cmovo
            | M::Cmovno
            | M::Cmovb
            | M::Cmovae
            | M::Cmove
            | M::Cmovne
            | M::Cmovbe
            | M::Cmova
            | M::Cmovs
            | M::Cmovns
            | M::Cmovp
            | M::Cmovnp
            | M::Cmovl
            | M::Cmovge
            | M::Cmovle
            | M::Cmovg
            | M::Tzcnt
            | M::Lzcnt
            | M::Lfence
            | M::Mfence
            | M::Sfence
    )
}

/// The 64-bit form of an ident instruction, or None if it must be a callout; with the context
/// offset of a segment base [`seg_address`] must add into R8D first. An ESP-based memory
/// operand takes the pending `esp_delta` into its displacement.
fn ident(ins: &Instruction, mode: Mode, esp_delta: i32) -> Option<(Instruction, Option<i32>)> {
    if !ident_mnemonic(ins.mnemonic()) {
        return None;
    }
    let mut h = *ins;
    let mut based = None;
    let mut mem = |seg| {
        let (m, b) = guest_mem(ins, seg, mode, esp_delta)?;
        based = based.or(b);
        Some(m)
    };
    // Without BMI1/LZCNT (our CPUID), F3 0F BC/BD are BSF/BSR (the REP prefix is ignored):
    // the host, which has TZCNT and LZCNT, must be given BSF and BSR.
    if let Some(code) = without_bmi(ins.code()) {
        h.set_code(code);
        h.set_has_rep_prefix(false);
    }
    // Forms 64-bit mode lacks: inc/dec 0x40-0x4F and the moffs movs.
    match ins.code() {
        Code::Inc_r32 => h = Instruction::with1(Code::Inc_rm32, ins.op0_register()).ok()?,
        Code::Dec_r32 => h = Instruction::with1(Code::Dec_rm32, ins.op0_register()).ok()?,
        Code::Inc_r16 => h = Instruction::with1(Code::Inc_rm16, ins.op0_register()).ok()?,
        Code::Dec_r16 => h = Instruction::with1(Code::Dec_rm16, ins.op0_register()).ok()?,
        Code::Mov_AL_moffs8 => {
            h = Instruction::with2(Code::Mov_r8_rm8, Register::AL, mem(Some(Register::GS))?).ok()?
        }
        Code::Mov_AX_moffs16 => {
            h = Instruction::with2(Code::Mov_r16_rm16, Register::AX, mem(Some(Register::GS))?)
                .ok()?
        }
        Code::Mov_EAX_moffs32 => {
            h = Instruction::with2(Code::Mov_r32_rm32, Register::EAX, mem(Some(Register::GS))?)
                .ok()?
        }
        Code::Mov_moffs8_AL => {
            h = Instruction::with2(Code::Mov_rm8_r8, mem(Some(Register::GS))?, Register::AL).ok()?
        }
        Code::Mov_moffs16_AX => {
            h = Instruction::with2(Code::Mov_rm16_r16, mem(Some(Register::GS))?, Register::AX)
                .ok()?
        }
        Code::Mov_moffs32_EAX => {
            h = Instruction::with2(Code::Mov_rm32_r32, mem(Some(Register::GS))?, Register::EAX)
                .ok()?
        }
        code => {
            if !code.op_code().mode64() {
                return None;
            }
        }
    }
    let mut uses_rex = false;
    let mut uses_high = false;
    for i in 0..h.op_count() {
        match h.op_kind(i) {
            OpKind::Register => {
                let r = h.op_register(i);
                if r.is_segment_register() || r.is_cr() || r.is_dr() || r.is_tr() {
                    return None;
                }
                if !(r.is_gpr8() || r.is_gpr16() || r.is_gpr32()) {
                    return None;
                }
                let m = map_reg(r);
                uses_rex |= m != r;
                uses_high |= high_byte(r);
                h.set_op_register(i, m);
            }
            OpKind::Memory => {
                if ins.mnemonic() == Mnemonic::Lea {
                    let m = mem(None)?;
                    uses_rex |= m.base == GUEST_ESP;
                    set_base(&mut h, &m);
                    h.set_segment_prefix(Register::None);
                    if m.base == Register::None && m.index == Register::None {
                        h.set_memory_displ_size(4);
                    }
                } else if h.code() == ins.code() || without_bmi(ins.code()).is_some() {
                    let m = mem(Some(Register::GS))?;
                    uses_rex |= m.base == GUEST_ESP || m.base == S0;
                    set_base(&mut h, &m);
                    h.set_segment_prefix(Register::GS);
                    if m.base == S0 {
                        h.set_memory_index(Register::None);
                        h.set_memory_index_scale(1);
                        h.set_memory_displacement32(0);
                        h.set_memory_displ_size(0);
                    } else if m.base == Register::None && m.index == Register::None {
                        h.set_memory_displ_size(4);
                    }
                } else {
                    // A rewritten moffs form: its operand came from `mem`.
                    uses_rex |= h.memory_base() == S0;
                }
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32 => {}
            _ => return None,
        }
    }
    // AH..DH cannot be encoded in an instruction that needs a REX prefix (R12D).
    if uses_rex && uses_high {
        return None;
    }
    // Implicit operands beyond the explicit ones must be ones 64-bit mode keeps (flags, EAX/EDX
    // for mul/div/cdq): the stack and string forms never reach here.
    if ins.stack_pointer_increment() != 0 {
        return None;
    }
    Some((h, based))
}

/// Gives `h` the base of the host operand `m`, and its displacement if the base is guest ESP
/// (which carries the pending delta).
fn set_base(h: &mut Instruction, m: &MemoryOperand) {
    h.set_memory_base(m.base);
    if m.base == GUEST_ESP {
        h.set_memory_displacement32(m.displacement as u32);
        h.set_memory_displ_size(4);
    }
}

/// BSF or BSR for the TZCNT or LZCNT encodings (what they mean without BMI1/LZCNT).
fn without_bmi(code: Code) -> Option<Code> {
    Some(match code {
        Code::Tzcnt_r32_rm32 => Code::Bsf_r32_rm32,
        Code::Tzcnt_r16_rm16 => Code::Bsf_r16_rm16,
        Code::Lzcnt_r32_rm32 => Code::Bsr_r32_rm32,
        Code::Lzcnt_r16_rm16 => Code::Bsr_r16_rm16,
        _ => return None,
    })
}

/// Reads guest code for the translator.
pub trait CodeSource {
    /// Copies guest code at linear `eip` into `buf`; returns how many bytes are readable (0 if
    /// the address is not RAM or firmware). Bytes past the end of `eip`'s page come from the
    /// page that follows it, if that one can be fetched from.
    fn read_code(&self, eip: u32, buf: &mut [u8]) -> usize;

    /// Whether the instruction at `eip` must be executed by the emulator even though it could
    /// be translated (VMware's adaptive translation: an instruction that keeps trapping, e.g. on
    /// a traced page table, is cheaper as a callout than as a fault).
    fn emulate(&self, eip: u32) -> bool {
        let _ = eip;
        false
    }
}

/// Translates the unit at guest `eip` (unit number `unit_id`) for host address `rip`, to run
/// in `mode`.
pub fn translate(
    src: &dyn CodeSource,
    eip: u32,
    unit_id: u32,
    rip: u64,
    mode: Mode,
) -> Result<Encoded, TranslateError> {
    let page_end = (u64::from(eip) & !0xFFF) + 0x1000;
    // A unit covers at most MAX_INSTRUCTIONS instructions of at most 15 bytes, and the rest
    // of the page if that is less.
    let avail = ((page_end - u64::from(eip)) as usize).min(MAX_INSTRUCTIONS * 15);
    // Up to 14 more bytes, from the next page, for an instruction that runs on into it.
    let mut buf = [0u8; MAX_INSTRUCTIONS * 15 + 14];
    let got = src.read_code(eip, &mut buf[..avail + 14]);
    let bytes = &buf[..got];
    let in_page = got.min(avail);
    let mut crosses = false;

    let mut e = Emitter::new(eip, mode, unit_id);
    e.emit(Instruction::with2(Code::Mov_r32_rm32, S3, ctx(OFF_POLL)));
    let count_idx = e.emit(Instruction::with2(
        Code::Lea_r64_m,
        COUNT_Q,
        MemoryOperand::with_base_displ(COUNT_Q, 0),
    ));
    let mut decoder = Decoder::with_ip(32, bytes, u64::from(eip), DecoderOptions::NONE);
    let mut count = 0u32;
    let mut callout = None;
    let mut guest_end = eip;
    // After an inline STI: the next instruction is in its interrupt shadow.
    let mut shadow = false;
    loop {
        let at = eip.wrapping_add(decoder.position() as u32);
        e.tag = (at, count);
        if count as usize >= MAX_INSTRUCTIONS
            || crosses
            || (decoder.position() >= in_page && count > 0)
        {
            // The cap, the end of the page, or the end of readable memory: continue at `at`.
            if shadow {
                e.sti_shadow_exit(at);
            } else {
                e.slot(None, at);
            }
            break;
        }
        let ins = decoder.decode();
        if ins.is_invalid() {
            // Undefined, cut by the page end, or not in memory: the interpreter executes it (and
            // raises the right fault, or fetches across the page).
            if shadow {
                e.sti_shadow_exit(at);
            } else if count > 0 {
                e.slot(None, at);
            } else {
                callout = Some(Mnemonic::INVALID);
                e.callout(at);
                guest_end = at.wrapping_add(1);
            }
            break;
        }
        let next = ins.next_ip32();
        if decoder.position() > in_page {
            // The instruction runs on into the next page: it gets a unit of its own (which
            // then depends on both pages), and otherwise the next unit starts with it.
            if count > 0 {
                if shadow {
                    e.sti_shadow_exit(at);
                } else {
                    e.slot(None, at);
                }
                break;
            }
            crosses = true;
        }
        guest_end = next;
        if src.emulate(at) {
            if shadow {
                e.sti_shadow_exit(at);
            } else {
                callout = Some(ins.mnemonic());
                e.callout(at);
            }
            break;
        }
        let (mark, mark_delta, mark_ss) = (e.out.len(), e.esp_delta, e.ss_loaded);
        e.fop = fp::fop_of(&bytes[at.wrapping_sub(eip) as usize..decoder.position()]);
        e.in_shadow = shadow;
        match rewrite(&mut e, &ins, next) {
            Rewrite::Continue if shadow => {
                // The shadow is over: a waiting interrupt is due now.
                count += 1;
                e.irq_check(next);
                e.slot(None, next);
                break;
            }
            Rewrite::Continue => count += 1,
            Rewrite::Sti if !shadow => {
                count += 1;
                shadow = true;
            }
            Rewrite::End | Rewrite::Callout | Rewrite::Sti if shadow => {
                // The shadow instruction leaves the unit (or is STI again): the monitor
                // executes it with the interrupt shadow held.
                e.truncate(mark);
                e.esp_delta = mark_delta;
                e.ss_loaded = mark_ss;
                e.sti_shadow_exit(at);
                break;
            }
            Rewrite::End | Rewrite::Sti => {
                count += 1;
                break;
            }
            Rewrite::Callout => {
                callout = Some(ins.mnemonic());
                e.callout(at);
                break;
            }
        }
    }
    let count_ip = e.out[count_idx].ip();
    e.out[count_idx] = Instruction::with2(
        Code::Lea_r64_m,
        COUNT_Q,
        MemoryOperand::with_base_displ(COUNT_Q, i64::from(count)),
    )
    .expect("a valid lea");
    e.out[count_idx].set_ip(count_ip);
    for (idx, index) in std::mem::take(&mut e.uncounts) {
        let ip = e.out[idx].ip();
        e.out[idx] = Instruction::with2(
            Code::Lea_r64_m,
            COUNT_Q,
            MemoryOperand::with_base_displ(COUNT_Q, -i64::from(count - index)),
        )
        .expect("a valid lea");
        e.out[idx].set_ip(ip);
    }
    // Every way out of the unit brought R12D up to date: the trampolines need no delta.
    if e.esp_delta != 0 {
        e.err
            .get_or_insert_with(|| "the unit ends with guest ESP not in R12D".to_string());
    }
    e.trampolines(unit_id);
    if let Some(message) = e.err.take() {
        return Err(TranslateError::Encode { eip, message });
    }
    let (mut code, offsets) = match crate::encode::encode(&e.out, &e.raw, &e.raw_bytes, rip) {
        Some(block) => (block.code, block.offsets),
        None => {
            // BlockEncoder knows nothing of raw spans: they go in as `db` pieces, and the
            // offsets are mapped back to one per instruction of `e.out`.
            let (list, first) = with_raw_as_db(eip, &e.out, &e.raw, &e.raw_bytes)?;
            let block = InstructionBlock::new(&list, rip);
            let result = BlockEncoder::encode(
                64,
                block,
                BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
            )
            .map_err(|err| TranslateError::Encode {
                eip,
                message: err.to_string(),
            })?;
            let offsets = first
                .iter()
                .map(|&i| result.new_instruction_offsets[i])
                .collect();
            (result.code_buffer, offsets)
        }
    };
    let offsets = &offsets;
    let mut map: Vec<MapEntry> = offsets
        .iter()
        .zip(&e.tags)
        .filter(|(off, _)| **off != u32::MAX)
        .map(|(off, (eip, index, esp_delta))| MapEntry {
            host_offset: *off,
            guest_eip: *eip,
            index: *index,
            esp_delta: *esp_delta,
        })
        .collect();
    // The instructions were laid out in order, so this is sorted already unless BlockEncoder
    // moved something.
    if !map.is_sorted_by_key(|m| m.host_offset) {
        map.sort_by_key(|m| m.host_offset);
    }
    let mut slots = Vec::new();
    for (idx, rel_at, tramp, target) in &e.slots {
        let slot_off = offsets[*idx] + rel_at;
        let tramp_idx = e
            .out
            .iter()
            .position(|i| i.ip() == *tramp)
            .expect("every slot has a trampoline");
        let rel = offsets[tramp_idx] as i64 - (i64::from(slot_off) + 4);
        code[slot_off as usize..slot_off as usize + 4].copy_from_slice(&(rel as i32).to_le_bytes());
        slots.push(Slot {
            rel32_offset: slot_off,
            target: *target,
        });
    }
    Ok(Encoded {
        code,
        map,
        slots,
        instructions: count,
        guest_end,
        callout,
        crosses,
        esp_moves: e.esp_moves,
        esp_updates: e.esp_updates,
    })
}

/// `out` with each raw span's placeholder replaced by `db` pieces of its bytes (for
/// `BlockEncoder`), and for each instruction of `out` the index of its first instruction in
/// the new list.
fn with_raw_as_db(
    eip: u32,
    out: &[Instruction],
    raw: &[RawSpan],
    raw_bytes: &[u8],
) -> Result<(Vec<Instruction>, Vec<usize>), TranslateError> {
    let mut list = Vec::with_capacity(out.len() + raw_bytes.len() / 16);
    let mut first = Vec::with_capacity(out.len());
    let mut spans = raw.iter().peekable();
    // Labels are small numbers counting up from 0x1000: the pieces after a span's first take
    // IPs no label has.
    let mut piece_ip = u64::MAX / 2;
    for (i, ins) in out.iter().enumerate() {
        first.push(list.len());
        let Some(span) = spans.next_if(|s| s.index == i) else {
            list.push(*ins);
            continue;
        };
        let bytes = &raw_bytes[span.start as usize..][..span.len as usize];
        for (k, piece) in bytes.chunks(16).enumerate() {
            let mut db =
                Instruction::with_declare_byte(piece).map_err(|err| TranslateError::Encode {
                    eip,
                    message: err.to_string(),
                })?;
            if k == 0 {
                db.set_ip(ins.ip());
            } else {
                piece_ip += 1;
                db.set_ip(piece_ip);
            }
            list.push(db);
        }
    }
    Ok((list, first))
}

enum Rewrite {
    /// Translated; the unit goes on.
    Continue,
    /// An inline STI: the next instruction is in its interrupt shadow, and a pending
    /// interrupt is due right after that one.
    Sti,
    /// Translated, and the unit ends with it (control flow).
    End,
    /// Not translated: the unit ends with a callout for it.
    Callout,
}

fn cc_of(ins: &Instruction) -> Option<u8> {
    let cc = ins.condition_code();
    (cc != ConditionCode::None).then(|| cc as u8 - 1)
}

/// Emits the translation of `ins` (`next` is the EIP after it).
fn rewrite(e: &mut Emitter, ins: &Instruction, next: u32) -> Rewrite {
    use Code as C;
    // ESP as a value (`mov ebp,esp`, `push esp`, `pop esp`, `add esp,12`): R12D must be guest
    // ESP first. ESP as a memory base takes the pending delta into the displacement instead.
    if (0..ins.op_count()).any(|i| {
        ins.op_kind(i) == OpKind::Register && ins.op_register(i).full_register32() == Register::ESP
    }) {
        e.sync_esp();
    }
    if let Some(r) = fp::rewrite(e, ins) {
        return r;
    }
    match ins.code() {
        // ---- direct control flow ----
        C::Jmp_rel8_32 | C::Jmp_rel32_32 => {
            e.slot(None, ins.near_branch32());
            Rewrite::End
        }
        _ if ins.is_jcc_short_or_near() && ins.op0_kind() == OpKind::NearBranch32 => {
            e.slot(cc_of(ins), ins.near_branch32());
            e.slot(None, next);
            Rewrite::End
        }
        C::Loop_rel8_32_ECX | C::Loope_rel8_32_ECX | C::Loopne_rel8_32_ECX | C::Jecxz_rel8_32 => {
            let host = match ins.code() {
                C::Loop_rel8_32_ECX => C::Loop_rel8_64_ECX,
                C::Loope_rel8_32_ECX => C::Loope_rel8_64_ECX,
                C::Loopne_rel8_32_ECX => C::Loopne_rel8_64_ECX,
                _ => C::Jecxz_rel8_64,
            };
            // Both ways leave the unit: R12D is guest ESP before the branch.
            e.sync_esp();
            let taken = e.label();
            e.emit(Instruction::with_branch(host, taken));
            e.slot(None, next);
            let idx = e.slots.len();
            e.slot(None, ins.near_branch32());
            // The taken slot's `db` gets the label the loop branches to.
            let db = e.slots[idx].0;
            e.out[db].set_ip(taken);
            Rewrite::End
        }
        C::Call_rel32_32 => {
            e.store_stack(-4, Src::Imm(next));
            e.adjust_esp(-4);
            e.slot(None, ins.near_branch32());
            Rewrite::End
        }
        // ---- indirect control flow ----
        C::Jmp_rm32 | C::Call_rm32 => {
            if !load_s0(e, ins) {
                return Rewrite::Callout;
            }
            if ins.code() == C::Call_rm32 {
                e.store_stack(-4, Src::Imm(next));
                e.adjust_esp(-4);
            }
            e.lookup();
            Rewrite::End
        }
        C::Retnd | C::Retnd_imm16 => {
            let extra = if ins.code() == C::Retnd_imm16 {
                i32::from(ins.immediate16())
            } else {
                0
            };
            e.load_stack(S0, 0);
            e.adjust_esp(4 + extra);
            e.lookup();
            Rewrite::End
        }
        // ---- flags and interrupts ----
        C::Cld | C::Std => {
            e.push(*ins);
            let step = if ins.code() == C::Cld { 1 } else { -1i32 };
            e.store_ctx(OFF_DF_STEP, step as u32);
            Rewrite::Continue
        }
        // At CPL 0 (always <= IOPL) CLI and STI only change IF, kept virtual in the context.
        C::Cli if e.mode.has(Mode::CPL0) => {
            e.store_ctx(OFF_VIF, 0);
            Rewrite::Continue
        }
        C::Sti if e.mode.has(Mode::CPL0) => {
            e.store_ctx(OFF_VIF, IF);
            Rewrite::Sti
        }
        C::Pushfd if e.mode.has(Mode::CPL0) => {
            // Host RFLAGS in translated code is exactly the guest's arithmetic flags and DF
            // plus bit 1 and IF (the world switch cleared the rest): swap in the virtual IF and
            // the guest's other system flags (which hold bit 1), without touching flags.
            e.emit(Ok(Instruction::with(Code::Pushfq)));
            e.emit(Instruction::with1(Code::Pop_r64, S0Q));
            e.emit(Instruction::with2(Code::Mov_r32_rm32, S1, ctx(OFF_VIF)));
            e.emit(Instruction::with2(
                Code::Lea_r32_m,
                S0,
                MemoryOperand::new(S0, S1, 1, -0x202, 4, false, Register::None),
            ));
            e.emit(Instruction::with2(
                Code::Mov_r32_rm32,
                S1,
                ctx(OFF_SYSFLAGS),
            ));
            e.emit(Instruction::with2(
                Code::Lea_r32_m,
                S0,
                MemoryOperand::new(S0, S1, 1, 0, 0, false, Register::None),
            ));
            e.store_stack(-4, Src::Reg(S0));
            e.adjust_esp(-4);
            Rewrite::Continue
        }
        _ if string_kind(ins).is_some() => string_op(e, ins),
        C::Xlat_m8 if ins.memory_base() == Register::EBX && !ins.has_lock_prefix() => {
            // AL = [seg: EBX + AL]: the address in R8D (`movzx`/`lea`, flags untouched), the
            // segment base (if any) added by the load's 32-bit address, wrapping like the guest's.
            let Some(base) = segment_base(e.mode, ins.memory_segment()) else {
                return Rewrite::Callout;
            };
            e.emit(Instruction::with2(Code::Movzx_r32_rm8, S0, Register::AL));
            let m = match base {
                None => MemoryOperand::new(Register::EBX, S0, 1, 0, 0, false, Register::GS),
                Some(off) => {
                    e.emit(Instruction::with2(Code::Mov_r32_rm32, S1, ctx(off)));
                    e.emit(Instruction::with2(
                        Code::Lea_r32_m,
                        S0,
                        MemoryOperand::new(Register::EBX, S0, 1, 0, 0, false, Register::None),
                    ));
                    MemoryOperand::new(S0, S1, 1, 0, 0, false, Register::GS)
                }
            };
            e.emit(Instruction::with2(Code::Mov_r8_rm8, Register::AL, m));
            Rewrite::Continue
        }
        // ---- segment registers ----
        _ if push_sreg(ins.code()).is_some() => {
            // The selector, zero-extended to a dword in the 32-bit form as the interpreter
            // stores it (recent Intel CPUs write only the low word there, SDM vol. 2 PUSH).
            let Some((sreg, size)) = push_sreg(ins.code()) else {
                return Rewrite::Callout;
            };
            e.emit(Instruction::with2(
                Code::Mov_r32_rm32,
                STR_BASE,
                ctx(selector_offset(sreg)),
            ));
            if size == 4 {
                e.store_stack(-4, Src::Reg(STR_BASE));
            } else {
                let m = e.stack(-2);
                e.emit(Instruction::with2(Code::Mov_rm16_r16, m, Register::R10W));
            }
            e.adjust_esp(-(size as i32));
            Rewrite::Continue
        }
        C::Mov_rm16_Sreg | C::Mov_r32m16_Sreg if !ins.has_lock_prefix() => {
            let sel = ctx(selector_offset(ins.op1_register()));
            match ins.op0_kind() {
                // A 32-bit destination gets the selector zero-extended (P6 and later, SDM
                // vol. 2 MOV), a 16-bit one only its low word.
                OpKind::Register => {
                    let r = map_reg(ins.op0_register());
                    let code = if r.is_gpr32() {
                        Code::Mov_r32_rm32
                    } else {
                        Code::Mov_r16_rm16
                    };
                    e.emit(Instruction::with2(code, r, sel));
                }
                _ => {
                    let Some((m, based)) = guest_mem(ins, Some(Register::GS), e.mode, e.esp_delta)
                    else {
                        return Rewrite::Callout;
                    };
                    if let Some(off) = based {
                        seg_address(e, ins, off);
                    }
                    e.emit(Instruction::with2(Code::Mov_r32_rm32, STR_BASE, sel));
                    e.emit(Instruction::with2(Code::Mov_rm16_r16, m, Register::R10W));
                }
            }
            Rewrite::Continue
        }
        C::Mov_Sreg_rm16 | C::Mov_Sreg_r32m16
            if reloadable(e, ins.op0_register()) && !ins.has_lock_prefix() =>
        {
            match ins.op1_kind() {
                OpKind::Register => {
                    // The low word of the source (a 32-bit register names its low 16 bits).
                    const WORDS: [Register; 8] = [
                        Register::AX,
                        Register::CX,
                        Register::DX,
                        Register::BX,
                        Register::R12W,
                        Register::BP,
                        Register::SI,
                        Register::DI,
                    ];
                    let r16 = WORDS[ins.op1_register().number() & 7];
                    e.emit(Instruction::with2(Code::Movzx_r32_rm16, S1, r16));
                }
                _ => {
                    let Some((m, based)) = guest_mem(ins, Some(Register::GS), e.mode, e.esp_delta)
                    else {
                        return Rewrite::Callout;
                    };
                    if let Some(off) = based {
                        seg_address(e, ins, off);
                    }
                    e.emit(Instruction::with2(Code::Movzx_r32_rm16, S1, m));
                }
            }
            e.segment_reload(ins.op0_register(), ins.mnemonic());
            Rewrite::Continue
        }
        _ if pop_sreg(ins.code()).is_some_and(|(r, _)| reloadable(e, r)) => {
            let Some((sreg, size)) = pop_sreg(ins.code()) else {
                return Rewrite::Callout;
            };
            // The interpreter reads the whole operand (a dword in the 32-bit form), so a fault
            // on its upper half is the interpreter's too.
            let m = e.stack(0);
            if size == 4 {
                e.emit(Instruction::with2(Code::Mov_r32_rm32, S1, m));
                e.emit(Instruction::with2(Code::Movzx_r32_rm16, S1, Register::R9W));
            } else {
                e.emit(Instruction::with2(Code::Movzx_r32_rm16, S1, m));
            }
            e.segment_reload(sreg, ins.mnemonic());
            e.adjust_esp(size as i32);
            Rewrite::Continue
        }
        // ---- stack ----
        C::Push_r32 | C::Push_rm32 if ins.op0_kind() == OpKind::Register => {
            e.store_stack(-4, Src::Reg(map_reg(ins.op0_register())));
            e.adjust_esp(-4);
            Rewrite::Continue
        }
        C::Push_rm32 => {
            if !load_s0(e, ins) {
                return Rewrite::Callout;
            }
            e.store_stack(-4, Src::Reg(S0));
            e.adjust_esp(-4);
            Rewrite::Continue
        }
        C::Pushd_imm8 | C::Pushd_imm32 => {
            // `immediate(0)` sign-extends the imm8 form.
            e.store_stack(-4, Src::Imm(ins.immediate(0) as u32));
            e.adjust_esp(-4);
            Rewrite::Continue
        }
        C::Pop_r32 | C::Pop_rm32 if ins.op0_kind() == OpKind::Register => {
            // `pop esp` loads ESP itself (the delta was brought into R12D above).
            let r = map_reg(ins.op0_register());
            e.load_stack(r, 0);
            if r != GUEST_ESP {
                e.adjust_esp(4);
            }
            Rewrite::Continue
        }
        C::Pushad => {
            // The ESP pushed is the one before the instruction: R12D + the pending delta.
            let esp = if e.esp_delta == 0 {
                GUEST_ESP
            } else {
                e.emit(Instruction::with2(
                    Code::Lea_r32_m,
                    S1,
                    gs_lea(GUEST_ESP, e.esp_delta),
                ));
                S1
            };
            let regs = [
                Register::EAX,
                Register::ECX,
                Register::EDX,
                Register::EBX,
                esp,
                Register::EBP,
                Register::ESI,
                Register::EDI,
            ];
            for (i, r) in regs.iter().enumerate() {
                e.store_stack(-4 * (i as i32 + 1), Src::Reg(*r));
            }
            e.adjust_esp(-32);
            Rewrite::Continue
        }
        C::Popad => {
            // Touch both ends first: the only accesses that can fault come before any update.
            e.load_stack(S0, 0);
            e.load_stack(S0, 28);
            let regs = [
                (Register::EDI, 0),
                (Register::ESI, 4),
                (Register::EBP, 8),
                (Register::EBX, 16),
                (Register::EDX, 20),
                (Register::ECX, 24),
                (Register::EAX, 28),
            ];
            for (r, d) in regs {
                e.load_stack(r, d);
            }
            e.adjust_esp(32);
            Rewrite::Continue
        }
        C::Leaved => {
            let m = e.ss_mem(Register::EBP, 0);
            e.emit(Instruction::with2(Code::Mov_r32_rm32, S0, m));
            e.emit(Instruction::with2(
                Code::Lea_r32_m,
                GUEST_ESP,
                gs_lea(Register::EBP, 4),
            ));
            // R12D is guest ESP again: the pending delta is gone with the old ESP.
            e.esp_delta = 0;
            e.emit(Instruction::with2(Code::Mov_r32_rm32, Register::EBP, S0));
            Rewrite::Continue
        }
        _ => match ident(ins, e.mode, e.esp_delta) {
            Some((h, based)) => {
                if let Some(off) = based {
                    seg_address(e, ins, off);
                }
                e.push(h);
                Rewrite::Continue
            }
            None => Rewrite::Callout,
        },
    }
}

/// EFLAGS.IF.
const IF: u32 = 0x200;

/// The context offset of the selector of segment register `sreg` (iced's ES..GS).
fn selector_offset(sreg: Register) -> i32 {
    OFF_SELECTORS + 4 * sreg.number() as i32
}

/// The segment register and operand size (2 or 4) of a PUSH Sreg.
fn push_sreg(code: Code) -> Option<(Register, u32)> {
    use Code as C;
    use Register as R;
    Some(match code {
        C::Pushw_ES => (R::ES, 2),
        C::Pushd_ES => (R::ES, 4),
        C::Pushw_CS => (R::CS, 2),
        C::Pushd_CS => (R::CS, 4),
        C::Pushw_SS => (R::SS, 2),
        C::Pushd_SS => (R::SS, 4),
        C::Pushw_DS => (R::DS, 2),
        C::Pushd_DS => (R::DS, 4),
        C::Pushw_FS => (R::FS, 2),
        C::Pushd_FS => (R::FS, 4),
        C::Pushw_GS => (R::GS, 2),
        C::Pushd_GS => (R::GS, 4),
        _ => return None,
    })
}

/// The segment register and operand size of a POP Sreg (POP SS included: see [`reloadable`]).
fn pop_sreg(code: Code) -> Option<(Register, u32)> {
    use Code as C;
    use Register as R;
    Some(match code {
        C::Popw_ES => (R::ES, 2),
        C::Popd_ES => (R::ES, 4),
        C::Popw_SS => (R::SS, 2),
        C::Popd_SS => (R::SS, 4),
        C::Popw_DS => (R::DS, 2),
        C::Popd_DS => (R::DS, 4),
        C::Popw_FS => (R::FS, 2),
        C::Popd_FS => (R::FS, 4),
        C::Popw_GS => (R::GS, 2),
        C::Popd_GS => (R::GS, 4),
        _ => return None,
    })
}

/// Whether a load of `sreg` gets the reload fast path ([`Emitter::segment_reload`]): DS, ES,
/// FS and GS only (an SS load holds off interrupts for an instruction and has its own
/// privilege rules; CS is loaded by far transfers), in units for CPL 0 (what the monitor arms
/// assumes those checks), and not in an STI's interrupt shadow (whose exit must be the
/// monitor's shadow exit).
fn reloadable(e: &Emitter, sreg: Register) -> bool {
    matches!(
        sreg,
        Register::DS | Register::ES | Register::FS | Register::GS
    ) && e.mode.has(Mode::CPL0)
        && !e.in_shadow
}

/// The string instructions translated inline (INS/OUTS are I/O: callouts).
#[derive(Clone, Copy, PartialEq, Eq)]
enum StringKind {
    Movs,
    Stos,
    Lods,
    Cmps,
    Scas,
}

/// The kind and operand size of a string instruction translated inline, if `ins` is one.
fn string_kind(ins: &Instruction) -> Option<(StringKind, u32)> {
    use Mnemonic as M;
    use StringKind as K;
    Some(match ins.mnemonic() {
        M::Movsb => (K::Movs, 1),
        M::Movsw => (K::Movs, 2),
        M::Movsd
            if ins.op0_kind() == OpKind::MemoryESEDI || ins.op0_kind() == OpKind::MemoryESDI =>
        {
            (K::Movs, 4)
        }
        M::Stosb => (K::Stos, 1),
        M::Stosw => (K::Stos, 2),
        M::Stosd => (K::Stos, 4),
        M::Lodsb => (K::Lods, 1),
        M::Lodsw => (K::Lods, 2),
        M::Lodsd => (K::Lods, 4),
        M::Cmpsb => (K::Cmps, 1),
        M::Cmpsw => (K::Cmps, 2),
        M::Cmpsd
            if ins.op0_kind() == OpKind::MemorySegESI || ins.op0_kind() == OpKind::MemorySegSI =>
        {
            (K::Cmps, 4)
        }
        M::Scasb => (K::Scas, 1),
        M::Scasw => (K::Scas, 2),
        M::Scasd => (K::Scas, 4),
        _ => return None,
    })
}

/// `gs:[reg]` with 32-bit addressing.
fn gs_at(reg: Register) -> MemoryOperand {
    MemoryOperand::new(reg, Register::None, 1, 0, 0, false, Register::GS)
}

/// MOVS, STOS, LODS, CMPS and SCAS against the window: ES:EDI cannot be reached with a host
/// string instruction (ES.base is 0 in 64-bit mode), so one element is loads and stores through
/// GS, then ESI/EDI step by `df_step` × size with `lea` (no flags), after the accesses: a fault
/// leaves the registers as they were before the element. A source (DS unless overridden) or ES
/// with a non-zero base addresses `gs:[r10d+esi]` / `gs:[r10d+edi]` (`gs:[r13d+edi]` for the
/// destination of a REP form whose source has a base too), the 32-bit sum wrapping as the
/// guest's linear address does.
///
/// With REP, REPE or REPNE the element is the body of a loop that does what the CPU does
/// between iterations (SDM vol. 2 REP): leave the loop when ECX is 0, poll for an exit
/// request (a load from the poll page into R8D, so R11, [`SS_REG`], keeps SS.base; a slice
/// ending there always leaves work to do), run the element, count ECX down with `lea` (flags
/// untouched: the CMPS/SCAS flags are the last comparison's), and for CMPS/SCAS leave when ZF
/// says the REPE/REPNE condition failed. ECX, ESI and EDI are exact after every element, so a
/// fault on an element, or a time slice ending at the poll, leaves the instruction part done
/// with EIP on it, as the CPU leaves it when interrupted between iterations; the monitor
/// resumes it (see `vmm::translated`). In an inline STI's interrupt shadow a REP form is left
/// to the monitor's shadow exit instead: its polls would let an interrupt in before the
/// instruction completes an iteration.
///
/// REP MOVS and REP STOS are callouts all the same: the interpreter copies or fills a page at
/// a time through guest-physical memory, where a loop here addresses every page through the
/// window and faults each one the kernel has not touched through it yet into the window first
/// (copies to and from user pages, memsets of fresh pages). Measured on Linux's boot: hidden
/// faults 6K -> 23K and the boot 2-5% slower with them inline; with only the scans and
/// compares (and LODS) inline, 1-2.5% faster than with every REP form a callout.
fn string_op(e: &mut Emitter, ins: &Instruction) -> Rewrite {
    use StringKind as K;
    let Some((kind, size)) = string_kind(ins) else {
        return Rewrite::Callout;
    };
    let a32 = [ins.op0_kind(), ins.op1_kind()]
        .iter()
        .any(|k| matches!(k, OpKind::MemorySegESI | OpKind::MemoryESEDI));
    let reads_source = matches!(kind, K::Movs | K::Lods | K::Cmps);
    let rep = ins.has_rep_prefix() || ins.has_repne_prefix();
    // 16-bit addressing, LOCK (#UD), a REP form in an STI shadow and a source segment that is
    // not flat-limit: the interpreter.
    if !a32 || ins.has_lock_prefix() || (rep && (e.in_shadow || matches!(kind, K::Movs | K::Stos)))
    {
        return Rewrite::Callout;
    }
    // The source's segment (DS unless overridden), and ES for the destination (no override).
    let src_base = if reads_source {
        match segment_base(e.mode, ins.memory_segment()) {
            Some(b) => b,
            None => return Rewrite::Callout,
        }
    } else {
        None
    };
    let Some(dst_base) = segment_base(e.mode, Register::ES) else {
        return Rewrite::Callout;
    };
    let (acc, tmp, load, store, cmp) = match size {
        1 => (
            Register::AL,
            Register::R8L,
            Code::Mov_r8_rm8,
            Code::Mov_rm8_r8,
            Code::Cmp_r8_rm8,
        ),
        2 => (
            Register::AX,
            Register::R8W,
            Code::Mov_r16_rm16,
            Code::Mov_rm16_r16,
            Code::Cmp_r16_rm16,
        ),
        _ => (
            Register::EAX,
            S0,
            Code::Mov_r32_rm32,
            Code::Mov_rm32_r32,
            Code::Cmp_r32_rm32,
        ),
    };
    e.emit(Instruction::with2(Code::Mov_r32_rm32, S1, ctx(OFF_DF_STEP)));
    // Where each segment base is: loaded just before the access for one element, once before
    // the loop for a REP form (into R10D, and R13D for ES when the source has a base too).
    let (mut src_reg, mut dst_reg) = (None, None);
    if rep {
        if let Some(off) = src_base {
            e.emit(Instruction::with2(Code::Mov_r32_rm32, STR_BASE, ctx(off)));
            src_reg = Some(STR_BASE);
        }
        if let Some(off) = dst_base.filter(|_| kind != K::Lods) {
            let r = if src_reg.is_some() {
                REP_DST_BASE
            } else {
                STR_BASE
            };
            e.emit(Instruction::with2(Code::Mov_r32_rm32, r, ctx(off)));
            dst_reg = Some(r);
        }
    }
    // `gs:[reg]`, or `gs:[base+reg]` with the base in a register (loaded here unless the loop
    // has it): the 32-bit address wraps modulo 4 GiB as the guest's linear address does.
    let at = |e: &mut Emitter, reg: Register, base: Option<i32>, held: Option<Register>| match (
        base, held,
    ) {
        (None, _) => gs_at(reg),
        (Some(_), Some(b)) => MemoryOperand::new(b, reg, 1, 0, 0, false, Register::GS),
        (Some(off), None) => {
            e.emit(Instruction::with2(Code::Mov_r32_rm32, STR_BASE, ctx(off)));
            MemoryOperand::new(STR_BASE, reg, 1, 0, 0, false, Register::GS)
        }
    };
    let done = e.label();
    let top = e.label();
    if rep {
        e.emit_at(Instruction::with_branch(Code::Jecxz_rel8_64, done), top);
        e.emit(Instruction::with2(Code::Mov_r32_rm32, S0, ctx(OFF_POLL)));
    }
    match kind {
        K::Movs => {
            let esi = at(e, Register::ESI, src_base, src_reg);
            e.emit(Instruction::with2(load, tmp, esi));
            let edi = at(e, Register::EDI, dst_base, dst_reg);
            e.emit(Instruction::with2(store, edi, tmp));
        }
        K::Stos => {
            let edi = at(e, Register::EDI, dst_base, dst_reg);
            e.emit(Instruction::with2(store, edi, acc));
        }
        K::Lods => {
            let esi = at(e, Register::ESI, src_base, src_reg);
            e.emit(Instruction::with2(load, acc, esi));
        }
        K::Cmps => {
            let esi = at(e, Register::ESI, src_base, src_reg);
            e.emit(Instruction::with2(load, tmp, esi));
            let edi = at(e, Register::EDI, dst_base, dst_reg);
            e.emit(Instruction::with2(cmp, tmp, edi));
        }
        K::Scas => {
            let edi = at(e, Register::EDI, dst_base, dst_reg);
            e.emit(Instruction::with2(cmp, acc, edi));
        }
    }
    let step = |e: &mut Emitter, r: Register| {
        e.emit(Instruction::with2(
            Code::Lea_r32_m,
            r,
            MemoryOperand::new(r, S1, size, 0, 0, false, Register::None),
        ));
    };
    if reads_source {
        step(e, Register::ESI);
    }
    if kind != K::Lods {
        step(e, Register::EDI);
    }
    if rep {
        e.emit(Instruction::with2(
            Code::Lea_r32_m,
            Register::ECX,
            MemoryOperand::new(
                Register::ECX,
                Register::None,
                1,
                -1,
                1,
                false,
                Register::None,
            ),
        ));
        if matches!(kind, K::Cmps | K::Scas) {
            // REPE stops on a difference, REPNE on a match (for MOVS, STOS and LODS an F2
            // prefix is a plain REP, as the interpreter and the CPU treat it).
            let stop = if ins.has_repne_prefix() {
                Code::Je_rel8_64
            } else {
                Code::Jne_rel8_64
            };
            e.emit(Instruction::with_branch(stop, done));
        }
        e.emit(Instruction::with_branch(Code::Jmp_rel8_64, top));
        e.emit_at(Ok(Instruction::with(Code::Nopd)), done);
    }
    Rewrite::Continue
}

/// `mov r8d, <operand 0>` for a 32-bit register or memory operand.
fn load_s0(e: &mut Emitter, ins: &Instruction) -> bool {
    match ins.op0_kind() {
        OpKind::Register => {
            e.emit(Instruction::with2(
                Code::Mov_r32_rm32,
                S0,
                map_reg(ins.op0_register()),
            ));
            true
        }
        OpKind::Memory => match guest_mem(ins, Some(Register::GS), e.mode, e.esp_delta) {
            Some((m, based)) => {
                if let Some(off) = based {
                    seg_address(e, ins, off);
                }
                e.emit(Instruction::with2(Code::Mov_r32_rm32, S0, m));
                true
            }
            None => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;
    use iced_x86::{Formatter, IntelFormatter};

    const BASE: u32 = 0x0010_0000;
    const RIP: u64 = 0x4000_0000;

    /// A number as iced's Intel formatter writes it (hex, `h`, a leading 0 before a letter).
    fn hex(n: impl std::fmt::UpperHex) -> String {
        let s = format!("{n:X}h");
        if s.starts_with(|c: char| c.is_ascii_alphabetic()) {
            format!("0{s}")
        } else {
            s
        }
    }

    struct Bytes(Vec<u8>);
    impl CodeSource for Bytes {
        fn read_code(&self, eip: u32, buf: &mut [u8]) -> usize {
            let off = (eip - BASE) as usize;
            let n = buf.len().min(self.0.len().saturating_sub(off));
            buf[..n].copy_from_slice(&self.0[off..off + n]);
            n
        }
    }

    fn guest(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
        let mut a = CodeAssembler::new(32).unwrap();
        f(&mut a).unwrap();
        a.assemble(u64::from(BASE)).unwrap()
    }

    /// The host instructions of the unit, decoded back (64-bit).
    fn host(code: &[u8]) -> Vec<Instruction> {
        Decoder::with_ip(64, code, RIP, DecoderOptions::NONE)
            .into_iter()
            .collect()
    }

    fn text(ins: &[Instruction]) -> Vec<String> {
        let mut f = IntelFormatter::new();
        ins.iter()
            .map(|i| {
                let mut s = String::new();
                f.format(i, &mut s);
                s
            })
            .collect()
    }

    fn unit(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> (Encoded, Vec<String>) {
        let e = translate(&Bytes(guest(f)), BASE, 7, RIP, Mode::default()).unwrap();
        let t = text(&host(&e.code));
        (e, t)
    }

    #[test]
    fn units_start_with_the_poll_and_the_count() {
        let (e, t) = unit(|a| {
            a.add(eax, ebx)?;
            a.hlt()
        });
        assert_eq!(
            t[0],
            format!("mov r11d,[r15+{off_poll}]", off_poll = hex(OFF_POLL))
        );
        assert_eq!(t[1], "lea r14,[r14+1]");
        assert_eq!(t[2], "add eax,ebx");
        assert_eq!(e.instructions, 1);
        assert_eq!(
            e.callout,
            Some(Mnemonic::Hlt),
            "hlt is never executed natively"
        );
        assert_eq!(e.map[0].guest_eip, BASE);
        assert!(
            e.map
                .iter()
                .any(|m| m.guest_eip == BASE + 2 && m.index == 1)
        );
    }

    #[test]
    fn memory_operands_become_gs_relative_with_32_bit_addresses() {
        let (_, t) = unit(|a| {
            a.mov(eax, dword_ptr(ebx + 0x10))?;
            a.mov(dword_ptr(0x8000_0000u32), ecx)?;
            a.add(byte_ptr(esi + edi * 4 - 4), dl)?;
            a.mov(eax, dword_ptr(0x1234))?; // the moffs form
            a.lea(edx, dword_ptr(esp + 8))?;
            a.hlt()
        });
        assert_eq!(t[2], "mov eax,gs:[ebx+10h]");
        assert_eq!(t[3], "mov gs:[80000000h],ecx");
        assert_eq!(t[4], "add gs:[esi+edi*4-4],dl");
        assert_eq!(t[5], "mov eax,gs:[1234h]");
        assert_eq!(t[6], "lea edx,[r12d+8]");
    }

    #[test]
    fn esp_is_r12d_and_the_short_forms_are_rewritten() {
        let (_, t) = unit(|a| {
            a.inc(eax)?; // 0x40: a REX prefix in 64-bit mode
            a.dec(esp)?;
            a.mov(ebp, esp)?;
            a.add(esp, 12)?;
            a.hlt()
        });
        assert_eq!(
            &t[2..6],
            ["inc eax", "dec r12d", "mov ebp,r12d", "add r12d,0Ch"]
        );
    }

    #[test]
    fn stack_operations_are_expanded_against_r12d() {
        let (_, t) = unit(|a| {
            a.push(eax)?;
            a.push(0x1234_5678)?;
            a.push(-6)?; // the imm8 form, sign-extended
            a.push(dword_ptr(esp + 4))?;
            a.pop(ecx)?;
            a.pop(esp)?;
            a.leave()?;
            a.hlt()
        });
        // The moves fold into a pending delta; `pop esp` needs the real ESP first.
        let expected = [
            "mov gs:[r12d-4],eax",
            "mov dword ptr gs:[r12d-8],12345678h",
            "mov dword ptr gs:[r12d-0Ch],0FFFFFFFAh",
            "mov r8d,gs:[r12d-8]", // [esp+4] with ESP = R12D-12
            "mov gs:[r12d-10h],r8d",
            "mov ecx,gs:[r12d-10h]",
            "lea r12d,[r12d-0Ch]",
            "mov r12d,gs:[r12d]",
            "mov r8d,gs:[ebp]",
            "lea r12d,[ebp+4]",
            "mov ebp,r8d",
        ];
        assert_eq!(&t[2..2 + expected.len()], expected);
    }

    /// The `lea r12d` lines of a unit's text: its R12D updates.
    fn esp_updates(t: &[String]) -> Vec<&str> {
        t.iter()
            .filter(|l| l.starts_with("lea r12d,"))
            .map(|l| l.as_str())
            .collect()
    }

    #[test]
    fn push_push_call_updates_r12d_once_before_the_slot() {
        let (e, t) = unit(|a| {
            a.push(eax)?;
            a.push(0x10)?;
            a.call(0x0010_2000)
        });
        let expected = [
            "mov gs:[r12d-4],eax",
            "mov dword ptr gs:[r12d-8],10h",
            "mov dword ptr gs:[r12d-0Ch],100008h",
            "lea r12d,[r12d-0Ch]",
        ];
        assert_eq!(&t[2..6], expected);
        assert_eq!(esp_updates(&t), ["lea r12d,[r12d-0Ch]"]);
        assert_eq!((e.esp_moves, e.esp_updates), (3, 1));
        // A fault in a store restarts its guest instruction with ESP = R12D + the delta.
        let delta_at = |eip: u32| {
            let m: Vec<_> = e.map.iter().filter(|m| m.guest_eip == eip).collect();
            (m.first().unwrap().esp_delta, m.first().unwrap().index)
        };
        assert_eq!(delta_at(BASE), (0, 0));
        assert_eq!(delta_at(BASE + 1), (-4, 1)); // push 10h, after push eax
        assert_eq!(delta_at(BASE + 3), (-8, 2)); // the call
    }

    #[test]
    fn pop_runs_and_leave_ret_update_r12d_once() {
        let (e, t) = unit(|a| {
            a.pop(edi)?;
            a.pop(esi)?;
            a.pop(ebx)?;
            a.ret()
        });
        assert_eq!(
            &t[2..7],
            [
                "mov edi,gs:[r12d]",
                "mov esi,gs:[r12d+4]",
                "mov ebx,gs:[r12d+8]",
                "mov r8d,gs:[r12d+0Ch]",
                "lea r12d,[r12d+10h]",
            ]
        );
        assert_eq!(esp_updates(&t).len(), 1);
        assert_eq!((e.esp_moves, e.esp_updates), (4, 1));
        // leave sets ESP from EBP: what was pending is dropped, and ret needs one update.
        let (_, t) = unit(|a| {
            a.push(ebx)?;
            a.leave()?;
            a.ret_1(4)
        });
        assert_eq!(
            &t[2..8],
            [
                "mov gs:[r12d-4],ebx",
                "mov r8d,gs:[ebp]",
                "lea r12d,[ebp+4]",
                "mov ebp,r8d",
                "mov r8d,gs:[r12d]",
                "lea r12d,[r12d+8]",
            ]
        );
    }

    #[test]
    fn esp_as_a_value_brings_r12d_up_to_date_and_esp_operands_take_the_delta() {
        let (e, t) = unit(|a| {
            a.push(ebp)?;
            a.mov(ebp, esp)?;
            a.push(esi)?;
            a.push(ebx)?;
            a.mov(eax, dword_ptr(esp + 4))?;
            a.lea(ecx, dword_ptr(esp + eax * 4 + 8))?;
            a.add(dword_ptr(esp), 1)?;
            a.pushad()?;
            a.sub(esp, 8)?;
            a.hlt()
        });
        let expected = [
            "mov gs:[r12d-4],ebp",
            "lea r12d,[r12d-4]",
            "mov ebp,r12d",
            "mov gs:[r12d-4],esi",
            "mov gs:[r12d-8],ebx",
            "mov eax,gs:[r12d-4]",
            "lea ecx,[r12d+eax*4]",
            "add dword ptr gs:[r12d-8],1",
            "lea r9d,[r12d-8]", // pushad pushes the ESP from before it
            "mov gs:[r12d-0Ch],eax",
            "mov gs:[r12d-10h],ecx",
            "mov gs:[r12d-14h],edx",
            "mov gs:[r12d-18h],ebx",
            "mov gs:[r12d-1Ch],r9d",
            "mov gs:[r12d-20h],ebp",
            "mov gs:[r12d-24h],esi",
            "mov gs:[r12d-28h],edi",
            "lea r12d,[r12d-28h]",
            "sub r12d,8",
        ];
        assert_eq!(&t[2..2 + expected.len()], expected);
        assert_eq!((e.esp_moves, e.esp_updates), (4, 2));
        // The hlt callout leaves with R12D up to date (nothing pending after `sub`).
        assert_eq!(esp_updates(&t).len(), 2);
    }

    #[test]
    fn every_exit_leaves_with_r12d_up_to_date() {
        // A callout, a conditional branch, a loop and an indirect jump after pushes.
        let cases: Vec<Vec<u8>> = vec![
            guest(|a| {
                a.push(eax)?;
                a.cpuid()
            }),
            guest(|a| {
                a.push(eax)?;
                a.jne(0x0010_2000)
            }),
            guest(|a| {
                a.push(eax)?;
                a.loop_(0x0010_2000)
            }),
            guest(|a| {
                a.push(eax)?;
                a.jmp(eax)
            }),
        ];
        for c in cases {
            let e = translate(&Bytes(c.clone()), BASE, 0, RIP, Mode::default()).unwrap();
            let t = text(&host(&e.code));
            assert_eq!(esp_updates(&t), ["lea r12d,[r12d-4]"], "{c:02x?}: {t:?}");
            let update = t.iter().position(|l| l.starts_with("lea r12d")).unwrap();
            // After the poll and the count: the first branch or context access.
            let leaves = 2 + t[2..]
                .iter()
                .position(|l| l.starts_with('j') || l.starts_with("loop") || l.contains("[r15+"))
                .unwrap();
            assert!(update < leaves, "{c:02x?}: {t:?}");
        }
    }

    #[test]
    fn high_byte_registers_next_to_r12d_are_callouts() {
        let (e, _) = unit(|a| {
            a.mov(ah, byte_ptr(esp))?;
            a.hlt()
        });
        assert_eq!((e.instructions, e.callout), (0, Some(Mnemonic::Mov)));
        let (e, t) = unit(|a| {
            a.mov(ah, byte_ptr(ebx))?;
            a.hlt()
        });
        assert_eq!((e.instructions, t[2].as_str()), (1, "mov ah,gs:[ebx]"));
    }

    #[test]
    fn sensitive_and_segment_instructions_are_callouts() {
        let cases: Vec<Vec<u8>> = vec![
            guest(|a| a.cli()),
            guest(|a| a.pushfd()),
            guest(|a| a.mov(ds, ax)),
            guest(|a| a.mov(eax, dword_ptr(ebx).fs())),
            guest(|a| a.int(0x80)),
            guest(|a| a.sgdt(dword_ptr(0x100))),
            guest(|a| a.rep().insd()),
            guest(|a| a.db(&[0x64, 0xA5])), // fs movsd: FS may not be flat
            guest(|a| a.cpuid()),
            guest(|a| a.daa()),
            guest(|a| a.ud2()),
        ];
        for c in cases {
            let e = translate(&Bytes(c.clone()), BASE, 0, RIP, Mode::default()).unwrap();
            assert_eq!(e.instructions, 0, "{c:02x?}");
            assert!(e.callout.is_some());
            let t = text(&host(&e.code));
            assert_eq!(
                t[2],
                format!(
                    "mov dword ptr [r15+{off_exit_eip}],100000h",
                    off_exit_eip = hex(OFF_EXIT_EIP)
                )
            );
        }
    }

    #[test]
    fn direct_branches_end_in_patchable_slots() {
        let (e, t) = unit(|a| {
            let mut l = a.create_label();
            a.set_label(&mut l)?;
            a.dec(ecx)?;
            a.jne(l)
        });
        assert_eq!(e.slots.len(), 2);
        assert_eq!(e.slots[0].target, BASE);
        assert_eq!(e.slots[1].target, BASE + 3);
        // The jcc is a rel32 form; before chaining it leads to a trampoline storing the target.
        assert_eq!(
            &e.code[e.slots[0].rel32_offset as usize - 2..][..2],
            &[0x0F, 0x85]
        );
        assert_eq!(e.code[e.slots[1].rel32_offset as usize - 1], 0xE9);
        assert!(t.iter().any(|l| l == "mov r8d,100000h"), "{t:?}");
        // Each slot leads to its own trampoline (a copy of one template): the slot's target in
        // R8D for the lookup, and on a miss this unit and the slot's number for the monitor.
        for (k, slot) in e.slots.iter().enumerate() {
            let at = slot.rel32_offset as usize;
            let rel = i32::from_le_bytes(e.code[at..at + 4].try_into().unwrap());
            let tramp = (at as i64 + 4 + i64::from(rel)) as usize;
            let t = text(&host(&e.code[tramp..]));
            assert_eq!(t[0], format!("mov r8d,{}", hex(slot.target)), "slot {k}");
            let exit = t.iter().position(|l| l.starts_with("jmp qword ptr [r15+"));
            let miss = &t[..exit.unwrap_or_else(|| panic!("slot {k}: no exit in {t:#?}"))];
            for (off, value) in [(OFF_EXIT_UNIT, 7), (OFF_EXIT_SLOT, k)] {
                let store = format!("mov dword ptr [r15+{}],{value}", hex(off));
                assert!(miss.contains(&store), "slot {k}: no {store:?} in {miss:#?}");
            }
        }
    }

    #[test]
    fn block_encoder_fallback_lays_out_raw_spans_like_the_fast_path() {
        // A unit's instruction list with a 20-byte raw span (two `db` pieces for
        // BlockEncoder) between a forward branch and its target.
        let mut out = vec![
            Instruction::with_branch(Code::Jmp_rel32_64, 0x1003).unwrap(),
            Instruction::default(),
            Instruction::with(Code::Nopd),
        ];
        for (i, ins) in out.iter_mut().enumerate() {
            ins.set_ip(0x1001 + i as u64);
        }
        let raw = [RawSpan {
            index: 1,
            start: 0,
            len: 20,
        }];
        let bytes: Vec<u8> = (0..20).collect();
        let fast = crate::encode::encode(&out, &raw, &bytes, RIP).unwrap();
        let (list, first) = with_raw_as_db(BASE, &out, &raw, &bytes).unwrap();
        assert_eq!(list.len(), 4);
        let slow = BlockEncoder::encode(
            64,
            InstructionBlock::new(&list, RIP),
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .unwrap();
        // BlockEncoder may pick a shorter jump, so compare what the code does: the span's
        // bytes at its instruction's offset, and the jump landing on the instruction after.
        let code = &slow.code_buffer;
        let at: Vec<usize> = first
            .iter()
            .map(|&i| slow.new_instruction_offsets[i] as usize)
            .collect();
        assert_eq!(&code[at[1]..at[1] + 20], &bytes[..]);
        assert_eq!(at[2], at[1] + 20);
        assert_eq!(code[at[2]], 0x90, "the nop");
        let jmp = host(code)[0];
        assert_eq!(jmp.near_branch64(), RIP + at[2] as u64);
        assert_eq!(&fast.code[fast.offsets[1] as usize..][..20], &bytes[..]);
    }

    #[test]
    fn calls_push_the_return_address_and_returns_use_the_lookup() {
        let (_, t) = unit(|a| {
            a.call(0x0010_2000)?;
            Ok(())
        });
        assert_eq!(t[2], "mov dword ptr gs:[r12d-4],100005h");
        assert_eq!(t[3], "lea r12d,[r12d-4]");
        let (_, t) = unit(|a| a.ret_1(8));
        assert_eq!(t[2], "mov r8d,gs:[r12d]");
        assert_eq!(t[3], "lea r12d,[r12d+0Ch]");
        assert_eq!(t[4], "movzx r9d,r8w");
        assert!(
            t.iter()
                .any(|l| l == "jrcxz short 0000000040000050h" || l.starts_with("jrcxz"))
        );
        // The lookup never changes flags: only mov, movzx, lea, jrcxz and jmp.
        for l in &t[4..] {
            let m = l.split_whitespace().next().unwrap();
            assert!(["mov", "movzx", "lea", "jrcxz", "jmp"].contains(&m), "{l}");
        }
    }

    fn unit_in(
        mode: u8,
        f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    ) -> (Encoded, Vec<String>) {
        let e = translate(&Bytes(guest(f)), BASE, 7, RIP, Mode(mode)).unwrap();
        let t = text(&host(&e.code));
        (e, t)
    }

    #[test]
    fn fs_operands_add_the_base_from_the_context_when_fs_is_flat_limit() {
        let code = |a: &mut CodeAssembler| {
            a.mov(eax, dword_ptr(ebx + esi * 2 + 8).fs())?;
            a.add(dword_ptr(esp + 4).gs(), 1)?;
            a.hlt()
        };
        let (e, t) = unit_in(Mode::FS_FLAT | Mode::GS_FLAT, code);
        assert_eq!(e.instructions, 2);
        assert_eq!(
            t[2],
            format!(
                "mov r9d,[r15+{off_fs_base}]",
                off_fs_base = hex(OFF_FS_BASE)
            )
        );
        assert_eq!(t[3], "lea r8d,[ebx+esi*2+8]");
        assert_eq!(t[4], "lea r8d,[r8d+r9d]");
        assert_eq!(t[5], "mov eax,gs:[r8d]");
        assert_eq!(
            t[6],
            format!(
                "mov r9d,[r15+{off_gs_base}]",
                off_gs_base = hex(OFF_GS_BASE)
            )
        );
        assert_eq!(t[7], "lea r8d,[r9d+r12d+4]");
        assert_eq!(t[8], "add dword ptr gs:[r8d],1");
        // Any other FS: the interpreter checks its limit and type.
        let (e, _) = unit_in(Mode::GS_FLAT, code);
        assert_eq!((e.instructions, e.callout), (0, Some(Mnemonic::Mov)));
    }

    /// `mov <reg>,[r15+<offset>]` as the formatter writes it.
    fn ctx_load(reg: &str, off: i32) -> String {
        format!("mov {reg},[r15+{}]", hex(off))
    }

    #[test]
    fn ds_based_operands_add_the_base_with_lea() {
        let code = |a: &mut CodeAssembler| {
            a.mov(eax, dword_ptr(ebx + 0x10))?;
            a.mov(dword_ptr(0xFFFF_FFF0u32), ecx)?; // the moffs form
            a.add(byte_ptr(esi + edi * 4 - 4), dl)?;
            a.lea(edx, dword_ptr(ebx + 8))?; // an offset, no segment
            a.mov(eax, dword_ptr(ebp + 8).ds())?; // an override of the implicit SS
            a.hlt()
        };
        let (e, t) = unit_in(Mode::DS_BASED, code);
        assert_eq!(e.instructions, 5, "{t:#?}");
        let ds_at = ctx_load("r9d", OFF_DS_BASE);
        let expected = [
            ds_at.as_str(),
            "lea r8d,[r9d+ebx+10h]",
            "mov eax,gs:[r8d]",
            ds_at.as_str(),
            "lea r8d,[r9d-10h]",
            "mov gs:[r8d],ecx",
            ds_at.as_str(),
            "lea r8d,[esi+edi*4-4]",
            "lea r8d,[r8d+r9d]",
            "add gs:[r8d],dl",
            "lea edx,[ebx+8]",
            ds_at.as_str(),
            "lea r8d,[r9d+ebp+8]",
            "mov eax,gs:[r8d]",
        ];
        assert_eq!(&t[2..2 + expected.len()], expected);
        // No flags touched: address arithmetic is `lea` and `mov` only.
        assert!(
            !t.iter()
                .any(|l| l.starts_with("add r") || l.starts_with("add e"))
        );
        // Without the bit the same code is the base-0 form.
        let (_, t) = unit_in(0, code);
        assert_eq!(t[2], "mov eax,gs:[ebx+10h]");
        // ES or SS bases do not change DS operands.
        let (_, t) = unit_in(Mode::ES_BASED | Mode::SS_BASED, code);
        assert_eq!(t[2], "mov eax,gs:[ebx+10h]");
    }

    #[test]
    fn ss_based_stack_operations_add_the_base_to_r12d_and_the_pending_delta() {
        let (e, t) = unit_in(Mode::SS_BASED, |a| {
            a.push(eax)?;
            a.push(0x10)?;
            a.mov(ecx, dword_ptr(esp + 4))?;
            a.mov(edx, dword_ptr(ebp - 8))?;
            a.pop(ebx)?;
            a.call(0x0010_2000)
        });
        let ss_at = ctx_load("r11d", OFF_SS_BASE);
        let ss9_at = ctx_load("r9d", OFF_SS_BASE);
        let expected = [
            ss_at.as_str(), // once per unit, by its first stack access
            "mov gs:[r11d+r12d-4],eax",
            "mov dword ptr gs:[r11d+r12d-8],10h",
            ss9_at.as_str(), // [esp+4] with ESP = R12D-8: SS by default
            "lea r8d,[r9d+r12d-4]",
            "mov ecx,gs:[r8d]",
            ss9_at.as_str(), // EBP-based: SS by default too
            "lea r8d,[r9d+ebp-8]",
            "mov edx,gs:[r8d]",
            "mov ebx,gs:[r11d+r12d-8]",
            "mov dword ptr gs:[r11d+r12d-8],100010h",
            "lea r12d,[r12d-8]",
        ];
        assert_eq!(&t[2..2 + expected.len()], expected, "{t:#?}");
        assert_eq!((e.esp_moves, e.esp_updates), (4, 1));
        // A fault restarts the guest instruction with ESP = R12D + its delta, as without a base.
        let at = |eip: u32| e.map.iter().find(|m| m.guest_eip == eip).unwrap().esp_delta;
        assert_eq!((at(BASE), at(BASE + 1)), (0, -4));
        // leave reads [ebp] through SS; ret's lookup reuses R11 as scratch, so a later unit
        // loads SS.base again (every unit starts without it).
        let (_, t) = unit_in(Mode::SS_BASED, |a| {
            a.leave()?;
            a.ret()
        });
        let expected = [
            ss_at.as_str(),
            "mov r8d,gs:[r11d+ebp]",
            "lea r12d,[ebp+4]",
            "mov ebp,r8d",
            "mov r8d,gs:[r11d+r12d]",
            "lea r12d,[r12d+4]",
        ];
        assert_eq!(&t[2..2 + expected.len()], expected, "{t:#?}");
        assert_eq!(t.iter().filter(|l| **l == ss_at).count(), 1, "{t:#?}");
    }

    #[test]
    fn string_instructions_add_the_ds_and_es_bases() {
        let (e, t) = unit_in(Mode::DS_BASED | Mode::ES_BASED, |a| {
            a.movsd()?;
            a.lodsb()?;
            a.stosw()?;
            a.hlt()
        });
        assert_eq!(e.instructions, 3, "{t:#?}");
        let df = ctx_load("r9d", OFF_DF_STEP);
        let ds_at = ctx_load("r10d", OFF_DS_BASE);
        let es_at = ctx_load("r10d", OFF_ES_BASE);
        let expected = [
            df.as_str(),
            ds_at.as_str(),
            "mov r8d,gs:[r10d+esi]",
            es_at.as_str(),
            "mov gs:[r10d+edi],r8d",
            "lea esi,[esi+r9d*4]",
            "lea edi,[edi+r9d*4]",
            df.as_str(),
            ds_at.as_str(),
            "mov al,gs:[r10d+esi]",
            "lea esi,[esi+r9d]",
            df.as_str(),
            es_at.as_str(),
            "mov gs:[r10d+edi],ax",
            "lea edi,[edi+r9d*2]",
        ];
        assert_eq!(&t[2..2 + expected.len()], expected, "{t:#?}");
        // A source override takes that segment's base; ES alone keeps DS at 0.
        let (_, t) = unit_in(Mode::ES_BASED | Mode::SS_BASED, |a| {
            a.db(&[0x36, 0xA4])?; // ss movsb
            a.movsb()?;
            a.hlt()
        });
        let ss_at = ctx_load("r10d", OFF_SS_BASE);
        let es_at = ctx_load("r10d", OFF_ES_BASE);
        let expected = [
            df.as_str(),
            ss_at.as_str(),
            "mov r8b,gs:[r10d+esi]",
            es_at.as_str(),
            "mov gs:[r10d+edi],r8b",
            "lea esi,[esi+r9d]",
            "lea edi,[edi+r9d]",
            df.as_str(),
            "mov r8b,gs:[esi]",
            es_at.as_str(),
            "mov gs:[r10d+edi],r8b",
        ];
        assert_eq!(&t[2..2 + expected.len()], expected, "{t:#?}");
    }

    #[test]
    fn xlat_and_indirect_branches_through_a_based_ds() {
        let (e, t) = unit_in(Mode::DS_BASED, |a| {
            a.xlatb()?;
            a.jmp(dword_ptr(ebx + 4))
        });
        assert_eq!((e.instructions, e.callout), (2, None), "{t:#?}");
        let ds_at = ctx_load("r9d", OFF_DS_BASE);
        let expected = [
            "movzx r8d,al",
            ds_at.as_str(),
            "lea r8d,[ebx+r8d]",
            "mov al,gs:[r8d+r9d]",
            ds_at.as_str(),
            "lea r8d,[r9d+ebx+4]",
            "mov r8d,gs:[r8d]",
        ];
        assert_eq!(&t[2..2 + expected.len()], expected, "{t:#?}");
        let (_, t) = unit_in(0, |a| {
            a.xlatb()?;
            a.hlt()
        });
        assert_eq!(&t[2..4], ["movzx r8d,al", "mov al,gs:[ebx+r8d]"]);
    }

    #[test]
    fn string_instructions_step_by_the_context_df() {
        let (e, t) = unit_in(0, |a| {
            a.stosb()?;
            a.cmpsd()?;
            a.rep().insd()?;
            a.hlt()
        });
        // INS is I/O: a callout.
        assert_eq!((e.instructions, e.callout), (2, Some(Mnemonic::Insd)));
        let df = format!(
            "mov r9d,[r15+{off_df_step}]",
            off_df_step = hex(OFF_DF_STEP)
        );
        assert_eq!(
            &t[2..5],
            [df.as_str(), "mov gs:[edi],al", "lea edi,[edi+r9d]"]
        );
        assert_eq!(
            &t[5..10],
            [
                df.as_str(),
                "mov r8d,gs:[esi]",
                "cmp r8d,gs:[edi]",
                "lea esi,[esi+r9d*4]",
                "lea edi,[edi+r9d*4]"
            ]
        );
        // CLD/STD keep the context's step in line with DF.
        let (_, t) = unit_in(0, |a| {
            a.std()?;
            a.hlt()
        });
        assert_eq!(t[2], "std");
        assert_eq!(
            t[3],
            format!(
                "mov dword ptr [r15+{off_df_step}],0FFFFFFFFh",
                off_df_step = hex(OFF_DF_STEP)
            )
        );
    }

    /// The host lines from the first `jecxz` on, with branch targets as the index of the line
    /// they reach ("-> n"), and the index of that `jecxz`.
    fn rep_loop(e: &Encoded, t: &[String]) -> (Vec<String>, usize) {
        let ins = host(&e.code);
        let start = ins
            .iter()
            .position(|i| i.code() == Code::Jecxz_rel8_64)
            .expect("a REP loop");
        let lines = ins[start..]
            .iter()
            .zip(&t[start..])
            .map(|(i, l)| match i.op0_kind() {
                OpKind::NearBranch64 => {
                    let to = ins.iter().position(|x| x.ip() == i.near_branch64());
                    format!("{:?} -> {}", i.mnemonic(), to.unwrap_or(usize::MAX) - start)
                }
                _ => l.clone(),
            })
            .collect();
        (lines, start)
    }

    #[test]
    fn rep_string_instructions_are_loops_that_poll_between_iterations() {
        let poll = ctx_load("r8d", OFF_POLL);
        // REP MOVS and REP STOS (with either prefix) are the interpreter's: it works a page at
        // a time through guest-physical memory.
        for (code, m) in [
            ([0xF3, 0xA5], Mnemonic::Movsd),
            ([0xF3, 0xAA], Mnemonic::Stosb),
            ([0xF2, 0xAB], Mnemonic::Stosd),
        ] {
            let (e, t) = unit_in(0, |a| {
                a.db(&code)?;
                a.hlt()
            });
            assert_eq!((e.instructions, e.callout), (0, Some(m)), "{t:#?}");
        }
        let (e, t) = unit_in(0, |a| {
            a.rep().lodsd()?;
            a.hlt()
        });
        assert_eq!(
            (e.instructions, e.callout),
            (1, Some(Mnemonic::Hlt)),
            "{t:#?}"
        );
        let (l, start) = rep_loop(&e, &t);
        assert_eq!(t[start - 1], ctx_load("r9d", OFF_DF_STEP));
        let expected = [
            "Jecxz -> 6",  // ECX = 0: done (before any access, flags untouched)
            poll.as_str(), // a slice ends here with ECX/ESI exact
            "mov eax,gs:[esi]",
            "lea esi,[esi+r9d*4]",
            "lea ecx,[ecx-1]",
            "Jmp -> 0",
            "nop",
        ];
        assert_eq!(l[..expected.len()], expected, "{t:#?}");
        // Every host instruction of the loop is the REP instruction's (EIP and index), so a
        // fault or a slice's end there resumes it; the monitor tells the loop's poll from the
        // unit's by its host offset.
        let ins = host(&e.code);
        for i in &ins[start..start + expected.len()] {
            let off = (i.ip() - RIP) as u32;
            let m = e.map.iter().rev().find(|m| m.host_offset <= off).unwrap();
            assert_eq!(
                (m.guest_eip, m.index, m.esp_delta),
                (BASE, 0, 0),
                "{off:#x}"
            );
        }

        // REPE stops on a difference, REPNE on a match; F2 on MOVS/STOS/LODS is a plain REP.
        let rep_loop_is = |code: &[u8], expected: &[&str]| {
            let (e, t) = unit_in(0, |a| {
                a.db(code)?;
                a.hlt()
            });
            let (l, _) = rep_loop(&e, &t);
            assert_eq!(l[..expected.len()], *expected, "{t:#?}");
        };
        rep_loop_is(
            &[0xF3, 0xA6], // repe cmpsb
            &[
                "Jecxz -> 9",
                poll.as_str(),
                "mov r8b,gs:[esi]",
                "cmp r8b,gs:[edi]",
                "lea esi,[esi+r9d]",
                "lea edi,[edi+r9d]",
                "lea ecx,[ecx-1]",
                "Jne -> 9",
                "Jmp -> 0",
                "nop",
            ],
        );
        rep_loop_is(
            &[0x66, 0xF2, 0xAF], // repne scasw
            &[
                "Jecxz -> 7",
                poll.as_str(),
                "cmp ax,gs:[edi]",
                "lea edi,[edi+r9d*2]",
                "lea ecx,[ecx-1]",
                "Je -> 7",
                "Jmp -> 0",
                "nop",
            ],
        );
        rep_loop_is(
            &[0xF2, 0xAC], // repne lodsb
            &[
                "Jecxz -> 6",
                poll.as_str(),
                "mov al,gs:[esi]",
                "lea esi,[esi+r9d]",
                "lea ecx,[ecx-1]",
                "Jmp -> 0",
            ],
        );
        // The loop counts ECX, not CX, and addresses with ESI/EDI: 16-bit addressing is the
        // interpreter's.
        let (e, _) = unit_in(0, |a| {
            a.db(&[0x67, 0xF3, 0xA5])?; // rep movsd with 16-bit addresses
            a.hlt()
        });
        assert_eq!((e.instructions, e.callout), (0, Some(Mnemonic::Movsd)));
    }

    #[test]
    fn rep_loops_load_segment_bases_once_and_keep_ss_base_in_r11() {
        let poll = ctx_load("r8d", OFF_POLL);
        let (e, t) = unit_in(Mode::DS_BASED | Mode::ES_BASED, |a| {
            a.repe().cmpsb()?;
            a.rep().lodsd()?;
            a.hlt()
        });
        assert_eq!(e.instructions, 2, "{t:#?}");
        let df = ctx_load("r9d", OFF_DF_STEP);
        let ds_at = ctx_load("r10d", OFF_DS_BASE);
        let es_at = ctx_load("r13d", OFF_ES_BASE);
        let (l, start) = rep_loop(&e, &t);
        assert_eq!(t[start - 3..start], [df.clone(), ds_at.clone(), es_at]);
        assert_eq!(
            l[..10],
            [
                "Jecxz -> 9",
                poll.as_str(),
                "mov r8b,gs:[r10d+esi]",
                "cmp r8b,gs:[r13d+edi]",
                "lea esi,[esi+r9d]",
                "lea edi,[edi+r9d]",
                "lea ecx,[ecx-1]",
                "Jne -> 9",
                "Jmp -> 0",
                "nop",
            ],
            "{t:#?}"
        );
        // LODS reads DS only.
        assert_eq!(t[start + 10..start + 12], [df, ds_at]);
        assert_eq!(t[start + 14], "mov eax,gs:[r10d+esi]");
        // With SS based, stack operations before and after a REP loop use SS.base in R11,
        // loaded once: the loop's polls load into R8D.
        let (e, t) = unit_in(Mode::SS_BASED, |a| {
            a.push(eax)?;
            a.repne().scasd()?;
            a.push(ebx)?;
            a.hlt()
        });
        assert_eq!(e.instructions, 3, "{t:#?}");
        let ss_at = ctx_load("r11d", OFF_SS_BASE);
        assert_eq!(t.iter().filter(|l| **l == ss_at).count(), 1, "{t:#?}");
        assert!(t.iter().any(|l| l == "mov gs:[r11d+r12d-8],ebx"), "{t:#?}");
        assert!(
            !t[3..]
                .iter()
                .any(|l| l.starts_with("mov r11d") || l.starts_with("lea r11")),
            "{t:#?}"
        );
    }

    #[test]
    fn a_rep_string_instruction_in_an_inline_sti_shadow_is_the_monitors() {
        let (e, t) = unit_in(Mode::CPL0, |a| {
            a.sti()?;
            a.rep().stosd()?;
            a.hlt()
        });
        // STI is translated; the REP instruction leaves through the shadow exit.
        assert_eq!((e.instructions, e.callout), (1, None), "{t:#?}");
        assert!(!t.iter().any(|l| l.starts_with("jecxz")), "{t:#?}");
        assert!(t.iter().any(|l| *l
            == format!(
                "mov dword ptr [r15+{}],{}",
                hex(OFF_EXIT_REASON),
                reason::STI_SHADOW
            )));
    }

    #[test]
    fn cli_sti_and_pushf_are_inline_at_cpl0_only() {
        let (e, t) = unit_in(Mode::CPL0, |a| {
            a.pushfd()?;
            a.cli()?;
            a.sti()?;
            a.nop()?;
            a.hlt()
        });
        // The unit ends after the instruction in STI's shadow, checking for a waiting IRQ.
        assert_eq!(e.instructions, 4);
        assert_eq!(&t[2..4], ["pushfq", "pop r8"]);
        assert!(t.contains(&format!(
            "mov dword ptr [r15+{off_vif}],0",
            off_vif = hex(OFF_VIF)
        )));
        assert!(t.contains(&format!(
            "mov dword ptr [r15+{off_vif}],200h",
            off_vif = hex(OFF_VIF)
        )));
        assert!(t.contains(&format!(
            "mov ecx,[r15+{off_irq_pending}]",
            off_irq_pending = hex(OFF_IRQ_PENDING)
        )));
        // STI before an instruction that leaves the unit: the monitor runs that one.
        let (e, t) = unit_in(Mode::CPL0, |a| {
            a.sti()?;
            a.hlt()
        });
        assert_eq!((e.instructions, e.callout), (1, None));
        assert!(t.contains(&format!(
            "mov dword ptr [r15+{off_exit_reason}],{}",
            reason::STI_SHADOW,
            off_exit_reason = hex(OFF_EXIT_REASON)
        )));
        for f in [
            (|a: &mut CodeAssembler| a.cli()) as fn(&mut CodeAssembler) -> Result<(), IcedError>,
            |a| a.sti(),
            |a| a.pushfd(),
        ] {
            let (e, _) = unit_in(Mode::FS_FLAT, f);
            assert_eq!(e.instructions, 0, "a callout above CPL 0");
        }
    }

    #[test]
    fn unchained_branches_try_the_lookup_table_before_leaving() {
        let (e, t) = unit(|a| a.jmp(0x0010_2000));
        assert_eq!(e.slots[0].target, 0x0010_2000);
        assert!(t.contains(&"mov r8d,102000h".to_string()), "{t:?}");
        assert!(t.contains(&"movzx r9d,r8w".to_string()), "{t:?}");
        // A miss stores the target from R8D and names the slot, so the monitor can chain it.
        assert!(
            t.contains(&format!(
                "mov [r15+{off_exit_eip}],r8d",
                off_exit_eip = hex(OFF_EXIT_EIP)
            )),
            "{t:?}"
        );
        assert!(
            t.contains(&format!(
                "mov dword ptr [r15+{off_exit_reason}],{}",
                reason::BRANCH,
                off_exit_reason = hex(OFF_EXIT_REASON)
            )),
            "{t:?}"
        );
    }

    #[test]
    fn an_instruction_across_the_page_end_gets_a_unit_of_its_own() {
        let mut code = vec![0x90u8; 0x1000 - 3];
        code.extend([0xB8, 0x78, 0x56, 0x34, 0x12, 0x90]); // mov eax,12345678h across the end
        let e = translate(&Bytes(code.clone()), BASE + 0x1000 - 4, 0, RIP, Mode(0)).unwrap();
        assert_eq!((e.instructions, e.crosses), (1, false));
        assert_eq!(e.slots.last().unwrap().target, BASE + 0x1000 - 3);
        let e = translate(&Bytes(code), BASE + 0x1000 - 3, 0, RIP, Mode(0)).unwrap();
        assert_eq!((e.instructions, e.crosses), (1, true));
        assert_eq!(text(&host(&e.code))[2], "mov eax,12345678h");
        assert_eq!(e.slots.last().unwrap().target, BASE + 0x1000 + 2);
    }

    #[test]
    fn a_unit_stops_at_the_page_end() {
        let mut code = vec![0x90u8; 0x1000 - 2];
        code.extend([0x01, 0xD8, 0x01, 0xD8]); // add eax,ebx twice, across the page end
        let e = translate(&Bytes(code), BASE + 0x1000 - 4, 0, RIP, Mode::default()).unwrap();
        // nop, nop, add end the page; the second add is the next page's.
        assert_eq!(e.instructions, 3);
        assert_eq!(e.slots.last().unwrap().target, BASE + 0x1000);
    }

    #[test]
    fn segment_register_stores_read_the_selector_from_the_context() {
        let sel = |r: Register| hex(OFF_SELECTORS + 4 * r.number() as i32);
        let (e, t) = unit(|a| {
            a.push(ds)?; // the 32-bit form: a zero-extended dword
            a.db(&[0x66, 0x0F, 0xA8])?; // pushw gs: a word, ESP - 2
            a.push(cs)?;
            a.mov(eax, fs)?;
            a.mov(si, es)?; // 66 8C C6: only the low word
            a.mov(word_ptr(ebx + 6), ss)?;
            a.push(eax)?;
            a.hlt()
        });
        assert_eq!(e.instructions, 7, "{t:#?}");
        let expected = [
            format!("mov r10d,[r15+{}]", sel(Register::DS)),
            "mov gs:[r12d-4],r10d".to_string(),
            format!("mov r10d,[r15+{}]", sel(Register::GS)),
            "mov gs:[r12d-6],r10w".to_string(),
            format!("mov r10d,[r15+{}]", sel(Register::CS)),
            "mov gs:[r12d-0Ah],r10d".to_string(),
            format!("mov eax,[r15+{}]", sel(Register::FS)),
            format!("mov si,[r15+{}]", sel(Register::ES)),
            format!("mov r10d,[r15+{}]", sel(Register::SS)),
            "mov gs:[ebx+6],r10w".to_string(),
            "mov gs:[r12d-0Eh],eax".to_string(),
        ];
        assert_eq!(&t[2..2 + expected.len()], expected);
        // Nothing but the stores and the final ESP update: no callout before the hlt.
        assert_eq!(e.callout, Some(Mnemonic::Hlt));
        assert_eq!(e.esp_moves, 4);
    }

    /// The lines of the unit from the first that starts with `from`.
    fn from_line<'a>(t: &'a [String], from: &str) -> &'a [String] {
        let i = t
            .iter()
            .position(|l| l.starts_with(from))
            .unwrap_or_else(|| panic!("no line starts with {from:?} in {t:#?}"));
        &t[i..]
    }

    #[test]
    fn segment_reloads_at_cpl0_compare_the_selector_and_the_live_gdt_bytes() {
        let rel =
            |r: Register, field: i32| hex(OFF_RELOAD + RELOAD_SIZE * r.number() as i32 + field);
        let (e, t) = unit_in(Mode::CPL0, |a| {
            a.push(eax)?;
            a.pop(ds)?;
            a.mov(fs, edx)?;
            a.nop()?;
            a.hlt()
        });
        assert_eq!(e.instructions, 4, "{t:#?}");
        assert_eq!(e.callout, Some(Mnemonic::Hlt));
        // pop ds: the dword at ESP (the pending push delta folded in), its low word, ...
        let pop = from_line(&t, "mov r9d,gs:[r12d-4]");
        assert_eq!(pop[1], "movzx r9d,r9w");
        // ... the selector compared with the armed key (lea and jrcxz: no flags touched), ...
        assert_eq!(
            pop[2],
            format!("mov r10,[r15+{}]", rel(Register::DS, RELOAD_KEY))
        );
        assert_eq!(pop[3], "lea r10,[r10+r9+1]");
        assert_eq!(&pop[4..6], ["mov r13,rcx", "mov rcx,r10"]);
        assert!(pop[6].starts_with("jrcxz"));
        // ... or a callout: the interpreter does the full load, with ESP as before the pop
        // (R12D brought up to date on this path only), and the unit's instructions from the
        // pop on (3 of 4) taken back off the retired count.
        assert_eq!(
            &pop[7..10],
            ["mov rcx,r13", "lea r14,[r14-3]", "lea r12d,[r12d-4]"]
        );
        assert_eq!(
            pop[10],
            format!(
                "mov dword ptr [r15+{}],{}",
                hex(OFF_EXIT_EIP),
                hex(BASE + 1)
            )
        );
        assert_eq!(
            &pop[11..14],
            [
                format!(
                    "mov dword ptr [r15+{}],{}",
                    hex(OFF_EXIT_UNIT),
                    hex(MID_UNIT)
                ),
                format!(
                    "mov dword ptr [r15+{}],{}",
                    hex(OFF_EXIT_SLOT),
                    hex(Mnemonic::Pop as u32)
                ),
                format!("mov dword ptr [r15+{}],3", hex(OFF_EXIT_REASON)),
            ]
        );
        // The 8 live descriptor bytes, read through the window, compared with the cached ones.
        let gdt = from_line(
            pop,
            &format!("mov r9d,[r15+{}]", rel(Register::DS, RELOAD_ADDRESS)),
        );
        assert_eq!(gdt[1], "mov r9,gs:[r9d]");
        assert_eq!(
            gdt[2],
            format!("mov r10,[r15+{}]", rel(Register::DS, RELOAD_NEG_DESCRIPTOR))
        );
        assert_eq!(gdt[3], "lea r10,[r9+r10]");
        // Then the counter, and the pop's ESP move folds into the pending delta: the push and
        // the pop cancel, no R12D update on the main path.
        let count = from_line(gdt, &format!("mov r9,[r15+{}]", hex(OFF_SEGMENT_RELOADS)));
        assert_eq!(count[1], "lea r9,[r9+1]");
        // mov fs,edx: the low word of EDX, FS's key; its callout path uncounts 2 (mov, nop).
        let mov = from_line(count, "movzx r9d,dx");
        assert_eq!(
            mov[1],
            format!("mov r10,[r15+{}]", rel(Register::FS, RELOAD_KEY))
        );
        assert!(mov.contains(&"lea r14,[r14-2]".to_string()));
        assert!(!mov.iter().any(|l| l.starts_with("lea r12d")), "{mov:#?}");
        // The main path never touches RFLAGS (the guest's arithmetic flags live there).
        for l in &t[2..] {
            let m = l.split_whitespace().next().unwrap();
            assert!(
                ["mov", "movzx", "lea", "jrcxz", "jmp", "nop"].contains(&m),
                "{l}"
            );
        }
    }

    #[test]
    fn segment_loads_are_callouts_at_cpl3_for_ss_and_in_an_sti_shadow() {
        let loads = |a: &mut CodeAssembler| {
            a.pop(ds)?;
            a.hlt()
        };
        // CPL 3 (any mode without CPL0): the load ends the unit with a callout.
        let (e, t) = unit_in(Mode::FS_FLAT, loads);
        assert_eq!(
            (e.instructions, e.callout),
            (0, Some(Mnemonic::Pop)),
            "{t:#?}"
        );
        assert!(!t.iter().any(|l| l.contains(&hex(OFF_SEGMENT_RELOADS))));
        let (e, _) = unit_in(Mode::FS_FLAT, |a| {
            a.mov(gs, ax)?;
            a.hlt()
        });
        assert_eq!((e.instructions, e.callout), (0, Some(Mnemonic::Mov)));
        // SS at CPL 0, in either form.
        for f in [
            (|a: &mut CodeAssembler| {
                a.pop(ss)?;
                a.hlt()
            }) as fn(&mut CodeAssembler) -> Result<(), IcedError>,
            |a| {
                a.mov(ss, ax)?;
                a.hlt()
            },
        ] {
            let (e, t) = unit_in(Mode::CPL0, f);
            assert_eq!(e.instructions, 0, "{t:#?}");
            assert!(matches!(e.callout, Some(Mnemonic::Pop | Mnemonic::Mov)));
        }
        // In an STI's shadow the monitor runs the load (with the shadow held).
        let (e, t) = unit_in(Mode::CPL0, |a| {
            a.sti()?;
            a.mov(es, ax)?;
            a.hlt()
        });
        assert_eq!((e.instructions, e.callout), (1, None));
        assert!(!t.iter().any(|l| l.contains(&hex(OFF_SEGMENT_RELOADS))));
        assert!(t.contains(&format!(
            "mov dword ptr [r15+{}],{}",
            hex(OFF_EXIT_REASON),
            reason::STI_SHADOW
        )));
        // At CPL 0 the same loads of DS stay in the unit.
        let (e, _) = unit_in(Mode::CPL0, loads);
        assert_eq!((e.instructions, e.callout), (1, Some(Mnemonic::Hlt)));
    }
}
