//! The native oracle: generated sequences of unprivileged 32-bit integer instructions run on the
//! host CPU ([`vmdriver::native::run_native`], a 32-bit compatibility-mode sandbox) and on bt86's
//! interpreter ([`vmm::interp::snippet::run`]), compared register by register, flag by flag and
//! byte by byte (DESIGN.md §2 and §7).
//!
//! - [`generate`] builds seeded sequences (1–8 instructions under test, each with the fix-ups it
//!   needs) whose memory operands, stack and string pointers stay inside the data buffer.
//! - [`analysis`] knows which flags each instruction leaves undefined (the Intel SDM's "Flags
//!   Affected"), so the comparison masks exactly the flags the last writer left undefined.
//! - [`check`] runs one case on both and gives a [`Verdict`]; [`run`] runs many, on several
//!   threads, and gathers the coverage report (which mnemonics the interpreter executed, which
//!   it does not implement yet) and every mismatch, shrunk to the fewest groups that still
//!   disagree.
//!
//! Both sides see the same state: code at [`CODE_ADDR`], a [`DATA_LEN`]-byte buffer at
//! [`DATA_ADDR`], EFLAGS with IF = 1. The host runs the code at CPL 3 and the interpreter at
//! CPL 0, so generated code never uses what differs between them (privileged instructions, IF,
//! IOPL, alignment checks).

pub mod analysis;
pub mod generate;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, Formatter, Instruction,
    InstructionBlock, IntelFormatter, OpKind,
};
use vmdriver::fpu::{FxImage, fx};
use vmdriver::native::{NativeEnd, NativeError, NativeResult, run_native};
use vmm::interp::InterpError;
use vmm::interp::snippet::{self, SnippetEnd, SnippetResult};
use vmm::translated::BtError;

use analysis::eflags::{self, AC, ARITH, DF, ID, IF, NT, TF};
use analysis::{Analysis, State};
use generate::{GenError, Rng};

pub use vmm::interp::snippet::{CODE_ADDR, DATA_ADDR};

/// Size of the data buffer every case gets.
pub const DATA_LEN: usize = 0x4000;

const _: () = assert!(
    CODE_ADDR == vmdriver::native::CODE_ADDR && DATA_ADDR == vmdriver::native::DATA_ADDR,
    "both snippet runners must use one layout"
);

/// The EFLAGS bits compared (less the undefined ones): the arithmetic flags, TF, IF, DF and the
/// flags POPF can change at CPL 3 (NT, AC, ID). IOPL, RF, VM, VIF and VIP are not: the host runs
/// the code at CPL 3, where POPF cannot change IOPL and the kernel's view of RF differs.
pub const COMPARED_FLAGS: u32 = ARITH | TF | IF | DF | NT | AC | ID;

/// One generated case.
#[derive(Debug, Clone)]
pub struct Case {
    /// The run's seed.
    pub seed: u64,
    /// The case's index in the run (with the seed, enough to regenerate it).
    pub index: u64,
    /// The code, at [`CODE_ADDR`].
    pub code: Vec<u8>,
    /// Initial EAX..EDI.
    pub gpr: [u32; 8],
    /// Initial EFLAGS.
    pub eflags: u32,
    /// Initial x87/MMX/SSE state.
    pub fx: FxImage,
    /// Initial data buffer.
    pub data: Vec<u8>,
    /// The decoded instructions.
    pub instrs: Vec<Instruction>,
    /// The groups (instruction under test and its fix-ups) as instruction index ranges.
    pub groups: Vec<Range<usize>>,
    /// Undefined flags along the sequence.
    pub analysis: Analysis,
}

impl Case {
    /// Case `index` of the run with `seed`.
    pub fn generate(seed: u64, index: u64) -> Result<Case, GenError> {
        let mut rng = Rng::for_case(seed, index);
        let g = generate::generate(&mut rng)?;
        let case = Case::new(seed, index, g.code, g.gpr, g.eflags, g.fx, g.data, g.groups);
        if case.instrs.len() != g.count {
            return Err(GenError::Relayout);
        }
        Ok(case)
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        seed: u64,
        index: u64,
        code: Vec<u8>,
        gpr: [u32; 8],
        eflags: u32,
        fx: FxImage,
        data: Vec<u8>,
        groups: Vec<Range<usize>>,
    ) -> Case {
        let instrs: Vec<Instruction> =
            Decoder::with_ip(32, &code, u64::from(CODE_ADDR), DecoderOptions::NONE)
                .into_iter()
                .collect();
        let analysis = analysis::analyze(&instrs, &State::exact(gpr));
        Case {
            seed,
            index,
            code,
            gpr,
            eflags,
            fx,
            data,
            instrs,
            groups,
            analysis,
        }
    }

    /// EIP right after the code.
    pub fn end(&self) -> u32 {
        CODE_ADDR + self.code.len() as u32
    }

    /// The flags undefined when execution stands at `eip` (before the instruction there).
    pub fn undefined_at(&self, eip: u32) -> u32 {
        self.instrs
            .iter()
            .position(|i| i.ip() == u64::from(eip))
            .map_or(self.analysis.end, |i| self.analysis.before[i])
    }

    /// The instruction at `eip`, if one starts there.
    pub fn instruction_at(&self, eip: u32) -> Option<&Instruction> {
        self.instrs.iter().find(|i| i.ip() == u64::from(eip))
    }

    /// The code, one instruction a line: address, bytes, Intel syntax.
    pub fn disassembly(&self) -> String {
        let mut f = IntelFormatter::new();
        let mut out = String::new();
        for ins in &self.instrs {
            let start = (ins.ip() - u64::from(CODE_ADDR)) as usize;
            let bytes: String = self.code[start..start + ins.len()]
                .iter()
                .map(|b| format!("{b:02X}"))
                .collect();
            let mut text = String::new();
            f.format(ins, &mut text);
            out.push_str(&format!("    {:08X} {bytes:<24} {text}\n", ins.ip()));
        }
        out
    }

    /// This case without group `g`, re-encoded (branches into it land on what follows).
    fn without_group(&self, g: usize) -> Option<Case> {
        let end = u64::from(self.end());
        let kept: Vec<&Range<usize>> = (0..self.groups.len())
            .filter(|&i| i != g)
            .map(|i| &self.groups[i])
            .collect();
        let mut list: Vec<Instruction> = kept
            .iter()
            .flat_map(|r| self.instrs[(*r).clone()].iter().copied())
            .collect();
        let ips: Vec<u64> = list.iter().map(Instruction::ip).collect();
        let mut needs_end = false;
        for ins in &mut list {
            if analysis::is_branch(ins) {
                let t = ins.near_branch_target();
                match ips.iter().copied().find(|&ip| ip >= t) {
                    Some(ip) => ins.set_near_branch32(ip as u32),
                    None => {
                        ins.set_near_branch32(end as u32);
                        needs_end = true;
                    }
                }
            }
        }
        let mut groups = Vec::new();
        let mut at = 0;
        for r in &kept {
            groups.push(at..at + r.len());
            at += r.len();
        }
        if needs_end {
            let mut nop = Instruction::with(Code::Nopd);
            nop.set_ip(end);
            list.push(nop);
            groups.push(at..at + 1);
        }
        if list.is_empty() {
            return None;
        }
        let block = InstructionBlock::new(&list, u64::from(CODE_ADDR));
        let code = BlockEncoder::encode(32, block, BlockEncoderOptions::NONE)
            .ok()?
            .code_buffer;
        let case = Case::new(
            self.seed,
            self.index,
            code,
            self.gpr,
            self.eflags,
            self.fx.clone(),
            self.data.clone(),
            groups,
        );
        (case.instrs.len() == list.len() && case.analysis.bad_read.is_none()).then_some(case)
    }
}

/// What the interpreter did with a case.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per case; boxing buys nothing
pub enum InterpOutcome {
    /// It ran the case.
    Ran(SnippetResult),
    /// It panicked (a bug: no guest input may panic the interpreter).
    Panicked(String),
}

/// A case on which the host CPU and the interpreter disagree.
#[derive(Debug, Clone)]
pub struct Mismatch {
    /// The case (shrunk, if shrinking was asked for).
    pub case: Case,
    /// How many groups the case had before shrinking.
    pub original_groups: usize,
    /// The host CPU's result.
    pub native: NativeResult,
    /// The interpreter's.
    pub interp: InterpOutcome,
    /// What differs, one item a line.
    pub differences: Vec<String>,
}

/// The outcome of [`check`].
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Both agree (on everything compared).
    Match {
        /// The exception both ended in, if any.
        exception: Option<u8>,
    },
    /// The interpreter does not implement an instruction of the case yet.
    Unsupported {
        /// The instruction's mnemonic (lowercase).
        mnemonic: String,
        /// The interpreter's description.
        what: String,
    },
    /// They disagree.
    Mismatch(Box<Mismatch>),
}

fn mnemonic_name(ins: &Instruction) -> String {
    format!("{:?}", ins.mnemonic()).to_lowercase()
}

/// The bt86 engine a case runs on (the host CPU is always the other side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// The interpreter.
    #[default]
    Interp,
    /// The binary translator (with the interpreter for its callouts).
    Bt,
}

/// Runs `case` on the host CPU and on the interpreter and compares the results.
pub fn check(case: &Case) -> Result<Verdict, NativeError> {
    check_on(case, Engine::Interp)
}

/// Runs `case` on the host CPU and on `engine` and compares the results.
pub fn check_on(case: &Case, engine: Engine) -> Result<Verdict, NativeError> {
    let native = run_native(&case.code, case.gpr, case.eflags, &case.fx, &case.data)?;
    let interp = catch_unwind(AssertUnwindSafe(|| match engine {
        Engine::Interp => snippet::run(&case.code, case.gpr, case.eflags, &case.fx, &case.data),
        Engine::Bt => snippet::run_bt(&case.code, case.gpr, case.eflags, &case.fx, &case.data)
            .map_err(|e| match e {
                BtError::Interp(e) => e,
                other => InterpError::Unsupported {
                    what: format!("(bt engine failure) {other}"),
                    regs: Default::default(),
                },
            }),
    }));
    let interp = match interp {
        Ok(Ok(r)) => InterpOutcome::Ran(r),
        Ok(Err(InterpError::Unsupported { what, .. }))
            if what.starts_with("(bt engine failure)") =>
        {
            InterpOutcome::Panicked(what)
        }
        Ok(Err(InterpError::Unsupported { what, regs })) => {
            let mnemonic = case
                .instruction_at(regs.eip)
                .map_or_else(|| format!("? ({what})"), mnemonic_name);
            return Ok(Verdict::Unsupported { mnemonic, what });
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic without a message".to_string());
            InterpOutcome::Panicked(msg)
        }
    };
    let differences = differences(case, &native, &interp);
    if differences.is_empty() {
        let exception = match native.end {
            NativeEnd::Exception(v) => Some(v),
            _ => None,
        };
        return Ok(Verdict::Match { exception });
    }
    Ok(Verdict::Mismatch(Box::new(Mismatch {
        case: case.clone(),
        original_groups: case.groups.len(),
        native,
        interp,
        differences,
    })))
}

const GPR_NAMES: [&str; 8] = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"];

fn end_name(end: &SnippetEnd) -> String {
    match end {
        SnippetEnd::Completed => "completed".into(),
        SnippetEnd::Exception(v) => format!("exception {v}"),
        SnippetEnd::Runaway => "runaway".into(),
    }
}

fn native_end_name(end: &NativeEnd) -> String {
    match end {
        NativeEnd::Completed => "completed".into(),
        NativeEnd::Exception(v) => format!("exception {v}"),
        NativeEnd::Runaway => "runaway".into(),
    }
}

/// What differs between the two results (empty: they agree).
pub fn differences(case: &Case, native: &NativeResult, interp: &InterpOutcome) -> Vec<String> {
    let r = match interp {
        InterpOutcome::Ran(r) => r,
        InterpOutcome::Panicked(msg) => return vec![format!("the interpreter panicked: {msg}")],
    };
    let mut d = Vec::new();
    let same_end = matches!(
        (native.end, r.end),
        (NativeEnd::Completed, SnippetEnd::Completed) | (NativeEnd::Runaway, SnippetEnd::Runaway)
    ) || matches!((native.end, r.end), (NativeEnd::Exception(a), SnippetEnd::Exception(b)) if a == b);
    if !same_end {
        d.push(format!(
            "end: native {} at {:#010x}, interp {} at {:#010x}",
            native_end_name(&native.end),
            native.eip,
            end_name(&r.end),
            r.eip
        ));
        if native.end == NativeEnd::Exception(14) {
            d.push(
                "the native run page-faulted: the generator let an access leave the data buffer \
                 (a generator bug)"
                    .into(),
            );
        }
        return d;
    }
    if native.end == NativeEnd::Runaway {
        return d;
    }
    if native.eip != r.eip {
        d.push(format!(
            "eip: native {:#010x}, interp {:#010x}",
            native.eip, r.eip
        ));
    }
    for (i, name) in GPR_NAMES.iter().enumerate() {
        if native.gpr[i] != r.gpr[i] {
            d.push(format!(
                "{name}: native {:#010x}, interp {:#010x}",
                native.gpr[i], r.gpr[i]
            ));
        }
    }
    let mask = COMPARED_FLAGS & !case.undefined_at(native.eip);
    let diff = (native.eflags ^ r.eflags) & mask;
    if diff != 0 {
        d.push(format!(
            "eflags: native {:#010x}, interp {:#010x}: {} differ",
            native.eflags,
            r.eflags,
            eflags::names(diff)
        ));
    }
    let masked = state_store_masks(case, &native.data);
    let bytes: Vec<usize> = (0..case.data.len())
        .filter(|&i| native.data.get(i) != r.data.get(i) && !masked.contains(&i))
        .collect();
    for &i in bytes.iter().take(16) {
        d.push(format!(
            "data[{i:#06x}] (initially {:#04x}): native {:#04x}, interp {:#04x}",
            case.data[i],
            native.data.get(i).copied().unwrap_or(0),
            r.data.get(i).copied().unwrap_or(0)
        ));
    }
    if bytes.len() > 16 {
        d.push(format!("... {} differing data bytes in all", bytes.len()));
    }
    d.extend(fx_differences(&native.fx, &r.fx));
    d
}

/// Data bytes written by FXSAVE, FNSTENV and FNSAVE that differ between the host and the
/// interpreter by construction (the generator gives these instructions absolute addresses):
/// the FCS and FDS selectors (the host's code runs with its own selectors), FXSAVE's
/// MXCSR_MASK (a CPU-model constant) and, in an FXSAVE image without an exception pending,
/// FOP, FIP and FDP (see [`fx_differences`]).
fn state_store_masks(case: &Case, native_data: &[u8]) -> Vec<usize> {
    use iced_x86::{MemorySize as S, Mnemonic as M, Register};
    let mut out = Vec::new();
    for ins in &case.instrs {
        let stores = matches!(
            ins.mnemonic(),
            M::Fxsave | M::Fnsave | M::Fsave | M::Fnstenv | M::Fstenv
        );
        if !stores || ins.memory_base() != Register::None || ins.memory_index() != Register::None {
            continue;
        }
        let Some(at) = ins.memory_displacement32().checked_sub(DATA_ADDR) else {
            continue;
        };
        let at = at as usize;
        let fields: Vec<std::ops::Range<usize>> = match ins.memory_size() {
            S::Fxsave_512Byte => {
                let mut f = vec![12..14, 20..22, 28..32];
                if native_data.get(at + 2).is_some_and(|b| b & 0x80 == 0) {
                    f.extend([6..12, 16..20]);
                }
                f
            }
            S::FpuEnv28 | S::FpuState108 => vec![16..18, 24..26],
            _ => vec![8..10, 12..14],
        };
        for r in fields {
            out.extend(r.map(|i| at + i));
        }
    }
    out
}

/// The fields of an FXSAVE image the comparison looks at: (name, offset, length).
///
/// Not compared: FCS and FDS (the host runs the code with its own selectors, 0x23 and 0x2B,
/// and its signal frames store FIP and FDP in the 64-bit format, without selectors),
/// MXCSR_MASK (a constant of the CPU model: the host's supports DAZ, ours does not), the
/// reserved bytes, and everything past XMM7 (reserved in the 32-bit format).
const FX_FIELDS: [(&str, usize, usize); 23] = [
    ("fcw", fx::FCW, 2),
    ("fsw", fx::FSW, 2),
    ("ftw", fx::FTW, 1),
    ("fop", fx::FOP, 2),
    ("fip", fx::FIP, 4),
    ("fdp", fx::FDP, 4),
    ("mxcsr", fx::MXCSR, 4),
    ("st0", fx::ST0, 16),
    ("st1", fx::ST0 + 16, 16),
    ("st2", fx::ST0 + 32, 16),
    ("st3", fx::ST0 + 48, 16),
    ("st4", fx::ST0 + 64, 16),
    ("st5", fx::ST0 + 80, 16),
    ("st6", fx::ST0 + 96, 16),
    ("st7", fx::ST0 + 112, 16),
    ("xmm0", fx::XMM0, 16),
    ("xmm1", fx::XMM0 + 16, 16),
    ("xmm2", fx::XMM0 + 32, 16),
    ("xmm3", fx::XMM0 + 48, 16),
    ("xmm4", fx::XMM0 + 64, 16),
    ("xmm5", fx::XMM0 + 80, 16),
    ("xmm6", fx::XMM0 + 96, 16),
    ("xmm7", fx::XMM0 + 112, 16),
];

/// What differs between two x87/SSE states, field by field.
///
/// FOP, FIP and FDP are compared only when the host's image has an x87 exception pending
/// (FSW.ES = 1): AMD processors (these hosts) save and restore them only then (the behaviour
/// behind CVE-2006-1056), while the P6 we model always keeps them.
pub fn fx_differences(native: &FxImage, interp: &FxImage) -> Vec<String> {
    let hex = |b: &[u8]| -> String { b.iter().rev().map(|x| format!("{x:02x}")).collect() };
    let pointers_saved = native.0[fx::FSW] & 0x80 != 0;
    FX_FIELDS
        .iter()
        .filter(|(_, o, _)| pointers_saved || !matches!(*o, fx::FOP | fx::FIP | fx::FDP))
        .filter(|(_, o, n)| native.0[*o..o + n] != interp.0[*o..o + n])
        .map(|(name, o, n)| {
            format!(
                "{name}: native {}, interp {}",
                hex(&native.0[*o..o + n]),
                hex(&interp.0[*o..o + n])
            )
        })
        .collect()
}

/// Removes groups from a mismatching case while it still mismatches (and the host still runs
/// it without leaving the buffer), up to `budget` checks.
pub fn shrink(m: Mismatch, budget: usize) -> Mismatch {
    shrink_on(m, budget, Engine::Interp)
}

/// Like [`shrink`], checking candidates on `engine`.
pub fn shrink_on(m: Mismatch, budget: usize, engine: Engine) -> Mismatch {
    let mut best = m;
    let mut left = budget;
    loop {
        let mut improved = false;
        for g in (0..best.case.groups.len()).rev() {
            if left == 0 || best.case.groups.len() <= 1 {
                break;
            }
            let Some(candidate) = best.case.without_group(g) else {
                continue;
            };
            left -= 1;
            if let Ok(Verdict::Mismatch(c)) = check_on(&candidate, engine)
                && c.native.end != NativeEnd::Exception(14)
            {
                let original_groups = best.original_groups;
                best = Mismatch {
                    original_groups,
                    ..*c
                };
                improved = true;
            }
        }
        if !improved || left == 0 {
            return best;
        }
    }
}

impl Mismatch {
    /// The shape of the (shrunk) case: each instruction's mnemonic and operand kinds, e.g.
    /// `xadd r32,r32`. Mismatches with one signature are most likely one bug.
    pub fn signature(&self) -> String {
        self.case
            .instrs
            .iter()
            .map(|ins| {
                let ops: Vec<String> = (0..ins.op_count())
                    .map(|i| match ins.op_kind(i) {
                        OpKind::Register => {
                            let r = ins.op_register(i);
                            let same = (0..i).any(|j| {
                                ins.op_kind(j) == OpKind::Register && ins.op_register(j) == r
                            });
                            format!("r{}{}", r.size() * 8, if same { "(same)" } else { "" })
                        }
                        OpKind::Memory => format!("m{}", ins.memory_size().size() * 8),
                        OpKind::NearBranch16 | OpKind::NearBranch32 => "rel".to_string(),
                        _ => "imm".to_string(),
                    })
                    .collect();
                format!("{} {}", mnemonic_name(ins), ops.join(","))
                    .trim_end()
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.case;
        writeln!(
            f,
            "MISMATCH: seed {} case {} ({} of its {} groups kept)",
            c.seed,
            c.index,
            c.groups.len(),
            self.original_groups
        )?;
        write!(f, "  code:\n{}", c.disassembly())?;
        let regs: Vec<String> = GPR_NAMES
            .iter()
            .zip(c.gpr)
            .map(|(n, v)| format!("{n}={v:08x}"))
            .collect();
        writeln!(
            f,
            "  initial: {} eflags={:08x} [{}]",
            regs.join(" "),
            c.eflags,
            eflags::names(c.eflags & COMPARED_FLAGS)
        )?;
        writeln!(f, "  initial fpu: {:?}", c.fx)?;
        for (name, o, n) in FX_FIELDS.iter().skip(7) {
            let b = &c.fx.0[*o..o + n];
            let v: String = b.iter().rev().map(|x| format!("{x:02x}")).collect();
            write!(f, " {name}={v}")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "  flags masked as undefined there: {}",
            eflags::names(c.undefined_at(self.native.eip))
        )?;
        let show = |gpr: &[u32; 8]| -> String {
            GPR_NAMES
                .iter()
                .zip(gpr)
                .map(|(n, v)| format!("{n}={v:08x}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let n = &self.native;
        writeln!(
            f,
            "  native: {} eip={:08x} {} eflags={:08x}{}",
            native_end_name(&n.end),
            n.eip,
            show(&n.gpr),
            n.eflags,
            n.fault
                .map(|x| format!(
                    " (signal {} code {} trapno {})",
                    x.signal, x.si_code, x.trapno
                ))
                .unwrap_or_default()
        )?;
        match &self.interp {
            InterpOutcome::Ran(r) => writeln!(
                f,
                "  interp: {} eip={:08x} {} eflags={:08x}",
                end_name(&r.end),
                r.eip,
                show(&r.gpr),
                r.eflags
            )?,
            InterpOutcome::Panicked(msg) => writeln!(f, "  interp: panicked: {msg}")?,
        }
        writeln!(f, "  differences:")?;
        for d in &self.differences {
            writeln!(f, "    {d}")?;
        }
        Ok(())
    }
}

/// Per-mnemonic counts: how often the interpreter executed it in a compared case, how often it
/// stopped on it as not implemented.
#[derive(Debug, Clone, Default)]
pub struct Coverage {
    /// Mnemonic → instructions compared.
    pub compared: BTreeMap<String, u64>,
    /// Mnemonic → (cases stopped on it, the interpreter's description of the first).
    pub unsupported: BTreeMap<String, (u64, String)>,
}

impl Coverage {
    fn merge(&mut self, o: Coverage) {
        for (k, v) in o.compared {
            *self.compared.entry(k).or_default() += v;
        }
        for (k, (n, what)) in o.unsupported {
            self.unsupported.entry(k).or_insert((0, what)).0 += n;
        }
    }
}

impl fmt::Display for Coverage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let supported: Vec<String> = self
            .compared
            .iter()
            .filter(|(k, _)| !self.unsupported.contains_key(*k))
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(
            f,
            "coverage: {} mnemonics compared, {} not implemented by the interpreter",
            self.compared.len(),
            self.unsupported.len()
        )?;
        writeln!(f, "  compared (instructions):")?;
        for line in supported.chunks(8) {
            writeln!(f, "    {}", line.join(", "))?;
        }
        if !self.unsupported.is_empty() {
            writeln!(f, "  not implemented (cases stopped on it; also compared):")?;
            for (k, (n, what)) in &self.unsupported {
                let compared = self.compared.get(k).copied().unwrap_or(0);
                writeln!(f, "    {k:<12} {n:>6}  {compared:>6}  e.g. {what}")?;
            }
        }
        Ok(())
    }
}

/// Options of [`run`].
#[derive(Debug, Clone)]
pub struct Options {
    /// The seed.
    pub seed: u64,
    /// First case index.
    pub first: u64,
    /// How many cases.
    pub count: u64,
    /// Worker threads.
    pub threads: usize,
    /// Checks each mismatch may spend on shrinking (0: none).
    pub shrink_budget: usize,
    /// The engine compared with the host CPU.
    pub engine: Engine,
}

/// How many example mismatches a [`Report`] keeps per class (the rest are only counted, so a
/// long run with a frequent mismatch stays small: every case forks the process).
pub const EXAMPLES_PER_CLASS: usize = 3;
/// How many error messages a [`Report`] keeps.
pub const ERRORS_KEPT: usize = 100;

/// The mismatches with one [`Mismatch::signature`]: most likely one bug.
#[derive(Debug, Clone, Default)]
pub struct MismatchClass {
    /// How many cases fell in it.
    pub count: u64,
    /// The first [`EXAMPLES_PER_CLASS`] of them, by case index.
    pub examples: Vec<Mismatch>,
}

impl MismatchClass {
    fn absorb(&mut self, count: u64, examples: Vec<Mismatch>) {
        self.count += count;
        self.examples.extend(examples);
        self.examples.sort_by_key(|m| m.case.index);
        self.examples.truncate(EXAMPLES_PER_CLASS);
    }
}

/// The result of [`run`].
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Cases run.
    pub cases: u64,
    /// Cases where both agreed.
    pub matched: u64,
    /// Of those, cases that ended in the same exception on both.
    pub faulted: u64,
    /// Cases the interpreter could not run (an instruction not implemented).
    pub unsupported: u64,
    /// Cases where they disagreed.
    pub mismatches: u64,
    /// The mismatches by signature.
    pub classes: BTreeMap<String, MismatchClass>,
    /// Cases that could not be built or run natively (generator or sandbox bugs).
    pub errors: u64,
    /// The first [`ERRORS_KEPT`] error messages.
    pub error_messages: Vec<String>,
    /// The coverage report.
    pub coverage: Coverage,
}

impl Report {
    fn merge(&mut self, o: Report) {
        self.cases += o.cases;
        self.matched += o.matched;
        self.faulted += o.faulted;
        self.unsupported += o.unsupported;
        self.mismatches += o.mismatches;
        for (sig, c) in o.classes {
            self.classes
                .entry(sig)
                .or_default()
                .absorb(c.count, c.examples);
        }
        self.errors += o.errors;
        self.error_messages.extend(o.error_messages);
        self.error_messages.truncate(ERRORS_KEPT);
        self.coverage.merge(o.coverage);
    }

    fn add_mismatch(&mut self, m: Mismatch) {
        self.mismatches += 1;
        self.classes
            .entry(m.signature())
            .or_default()
            .absorb(1, vec![m]);
    }

    fn add_error(&mut self, e: String) {
        self.errors += 1;
        if self.error_messages.len() < ERRORS_KEPT {
            self.error_messages.push(e);
        }
    }

    /// Whether anything went wrong (a mismatch or an error).
    pub fn failed(&self) -> bool {
        self.mismatches > 0 || self.errors > 0
    }

    /// The classes of mismatch, most frequent first.
    pub fn classes_by_count(&self) -> Vec<(&String, &MismatchClass)> {
        let mut v: Vec<(&String, &MismatchClass)> = self.classes.iter().collect();
        v.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(b.0)));
        v
    }

    /// One line: how many cases, how they ended.
    pub fn summary(&self) -> String {
        format!(
            "{} cases: {} matched ({} of them ending in the same exception), {} not runnable by \
             the interpreter (not implemented), {} mismatches in {} classes, {} errors",
            self.cases,
            self.matched,
            self.faulted,
            self.unsupported,
            self.mismatches,
            self.classes.len(),
            self.errors
        )
    }

    /// The classes of mismatch (one example each) and the errors, for printing.
    pub fn details(&self, classes: usize) -> String {
        let mut out = String::new();
        let all = self.classes_by_count();
        for (sig, c) in all.iter().take(classes) {
            out.push_str(&format!(
                "{} mismatch(es) of the shape [{sig}]; the first:\n",
                c.count
            ));
            if let Some(m) = c.examples.first() {
                out.push_str(&format!("{m}\n"));
            }
        }
        if all.len() > classes {
            out.push_str(&format!(
                "... and {} more classes of mismatch\n",
                all.len() - classes
            ));
        }
        for e in &self.error_messages {
            out.push_str(&format!("ERROR: {e}\n"));
        }
        out
    }
}

/// Runs cases `first..first+count` of `seed`. Fails only if the host cannot run 32-bit code at
/// all ([`NativeError::NoCompatMode`]); everything else is in the report.
pub fn run(opts: &Options) -> Result<Report, NativeError> {
    let threads = opts.threads.max(1) as u64;
    let stop = AtomicBool::new(false);
    let parts: Vec<Result<Report, NativeError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let stop = &stop;
                s.spawn(move || {
                    let mut rep = Report::default();
                    let mut i = opts.first + t;
                    while i < opts.first + opts.count && !stop.load(Ordering::Relaxed) {
                        if let Err(e) = run_one(opts, i, &mut rep) {
                            stop.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                        i += threads;
                    }
                    Ok(rep)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join().unwrap_or_else(|_| {
                    let mut r = Report::default();
                    r.add_error("a worker thread panicked".into());
                    Ok(r)
                })
            })
            .collect()
    });
    let mut report = Report::default();
    for p in parts {
        report.merge(p?);
    }
    Ok(report)
}

fn run_one(opts: &Options, index: u64, rep: &mut Report) -> Result<(), NativeError> {
    rep.cases += 1;
    let case = match Case::generate(opts.seed, index) {
        Ok(c) => c,
        Err(e) => {
            rep.add_error(format!("seed {} case {index}: {e}", opts.seed));
            return Ok(());
        }
    };
    if let Some(i) = case.analysis.bad_read {
        rep.add_error(format!(
            "seed {} case {index}: the generator let instruction {i} read an undefined flag:\n{}",
            opts.seed,
            case.disassembly()
        ));
        return Ok(());
    }
    match check_on(&case, opts.engine) {
        Ok(Verdict::Match { exception }) => {
            rep.matched += 1;
            for ins in &case.instrs {
                *rep.coverage.compared.entry(mnemonic_name(ins)).or_default() += 1;
            }
            if exception.is_some() {
                rep.faulted += 1;
            }
        }
        Ok(Verdict::Unsupported { mnemonic, what }) => {
            rep.unsupported += 1;
            rep.coverage
                .unsupported
                .entry(mnemonic)
                .or_insert((0, what))
                .0 += 1;
        }
        Ok(Verdict::Mismatch(m)) => {
            for ins in &case.instrs {
                *rep.coverage.compared.entry(mnemonic_name(ins)).or_default() += 1;
            }
            let m = if opts.shrink_budget > 0 {
                shrink_on(*m, opts.shrink_budget, opts.engine)
            } else {
                *m
            };
            rep.add_mismatch(m);
        }
        Err(e @ NativeError::NoCompatMode { .. }) => return Err(e),
        Err(e) => rep.add_error(format!(
            "seed {} case {index}: native run failed: {e}",
            opts.seed
        )),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_are_reproducible_from_seed_and_index() {
        for i in 0..50 {
            let a = Case::generate(7, i).unwrap();
            let b = Case::generate(7, i).unwrap();
            assert_eq!(a.code, b.code);
            assert_eq!(a.gpr, b.gpr);
            assert_eq!(a.data, b.data);
        }
        assert_ne!(
            Case::generate(7, 0).unwrap().code,
            Case::generate(8, 0).unwrap().code
        );
    }

    #[test]
    fn generated_cases_never_read_an_undefined_flag() {
        for i in 0..3000 {
            let c = Case::generate(1, i).unwrap();
            assert_eq!(c.analysis.bad_read, None, "case {i}:\n{}", c.disassembly());
            assert!((1..=9).contains(&c.groups.len()), "case {i}");
        }
    }

    /// A case of the given code (one group per instruction) with all registers 0 but ESP.
    fn case_of(
        f: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler) -> Result<(), iced_x86::IcedError>,
    ) -> Case {
        let mut a = iced_x86::code_asm::CodeAssembler::new(32).unwrap();
        f(&mut a).unwrap();
        let code = a.assemble(u64::from(CODE_ADDR)).unwrap();
        let n = Decoder::with_ip(32, &code, u64::from(CODE_ADDR), DecoderOptions::NONE)
            .into_iter()
            .count();
        let mut gpr = [0; 8];
        gpr[4] = DATA_ADDR + 0x100;
        Case::new(
            0,
            0,
            code,
            gpr,
            0x202,
            FxImage::default(),
            vec![0; 0x100],
            (0..n).map(|i| i..i + 1).collect(),
        )
    }

    fn result(case: &Case, gpr: [u32; 8], eflags: u32) -> (NativeResult, InterpOutcome) {
        let native = NativeResult {
            gpr,
            eflags,
            data: case.data.clone(),
            end: NativeEnd::Completed,
            eip: case.end(),
            fault: None,
            fx: case.fx.clone(),
        };
        let interp = InterpOutcome::Ran(SnippetResult {
            gpr,
            eflags,
            data: case.data.clone(),
            end: SnippetEnd::Completed,
            eip: case.end(),
            fx: case.fx.clone(),
        });
        (native, interp)
    }

    #[test]
    fn only_the_flags_the_last_writer_left_undefined_are_masked() {
        use iced_x86::code_asm::*;
        let case = case_of(|a| a.mul(ebx));
        let (native, interp) = result(&case, case.gpr, 0x202);
        assert!(differences(&case, &native, &interp).is_empty());
        let InterpOutcome::Ran(mut r) = interp.clone() else {
            unreachable!()
        };
        r.eflags ^= analysis::eflags::SF | analysis::eflags::PF;
        let d = differences(&case, &native, &InterpOutcome::Ran(r.clone()));
        assert!(d.is_empty(), "SF and PF are undefined after MUL: {d:?}");
        r.eflags ^= analysis::eflags::CF;
        let d = differences(&case, &native, &InterpOutcome::Ran(r.clone()));
        assert_eq!(d.len(), 1, "CF is defined after MUL: {d:?}");
        assert!(d[0].contains("CF"), "{d:?}");

        let case = case_of(|a| {
            a.mul(ebx)?;
            a.add(eax, ecx)
        });
        let (native, _) = result(&case, case.gpr, 0x202);
        r.eflags = 0x202 ^ analysis::eflags::SF;
        r.eip = case.end();
        let d = differences(&case, &native, &InterpOutcome::Ran(r));
        assert_eq!(d.len(), 1, "ADD defines SF again: {d:?}");
    }

    #[test]
    fn registers_data_ends_and_panics_are_all_compared() {
        let case = case_of(|a| a.nop());
        let (native, interp) = result(&case, case.gpr, 0x202);
        let InterpOutcome::Ran(r) = interp else {
            unreachable!()
        };
        let mut other = r.clone();
        other.gpr[6] ^= 1;
        other.data[5] ^= 0x80;
        let d = differences(&case, &native, &InterpOutcome::Ran(other));
        assert!(d.iter().any(|l| l.starts_with("esi:")), "{d:?}");
        assert!(d.iter().any(|l| l.starts_with("data[0x0005]")), "{d:?}");
        let mut other = r.clone();
        other.end = SnippetEnd::Exception(13);
        assert_eq!(
            differences(&case, &native, &InterpOutcome::Ran(other)).len(),
            1
        );
        let d = differences(&case, &native, &InterpOutcome::Panicked("boom".into()));
        assert!(d[0].contains("panicked: boom"), "{d:?}");
    }

    #[test]
    fn removing_a_group_keeps_branches_inside_the_code() {
        let mut shrunk = 0;
        for i in 0..300 {
            let c = Case::generate(3, i).unwrap();
            for g in 0..c.groups.len() {
                if let Some(s) = c.without_group(g) {
                    shrunk += 1;
                    assert_eq!(s.groups.last().map(|r| r.end), Some(s.instrs.len()));
                    for ins in s.instrs.iter().filter(|i| analysis::is_branch(i)) {
                        let t = ins.near_branch_target();
                        assert!(
                            t > ins.ip() && t <= u64::from(s.end()),
                            "case {i} group {g}"
                        );
                    }
                }
            }
        }
        assert!(shrunk > 300);
    }
}
