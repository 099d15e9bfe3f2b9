//! The world switch between the monitor and translated guest code (DESIGN.md §4).
//!
//! Translated code runs on the monitor's own thread with the guest's registers in host
//! registers: guest EAX..EDI (less ESP) in the host registers of the same number, guest ESP in
//! R12D, the guest's arithmetic flags and DF in RFLAGS, R15 pointing at the [`VcpuContext`], R14
//! counting retired guest instructions, and GS.base at the active address-space window.
//!
//! - [`enter`] saves the host's callee-saved registers and RSP in the context, loads the guest
//!   state from it and jumps to a translation unit.
//! - Translated code leaves through `bt86_exit` (its address is in the context, so code anywhere
//!   can reach it with `jmp [r15+…]`): the stub stores the guest state back, restores the host
//!   registers and returns from [`enter`] into Rust.
//! - Host signals raised by translated code (a guest access to an unmapped or read-only window
//!   page, a division fault, an invalid opcode) arrive in [`install_signal_handlers`]'s handler on
//!   the alternate stack. It only records the signal in the context and redirects the interrupted
//!   context to the exit stub; the monitor does the real work afterwards.
//! - Each unit starts with a load from the context's *poll page*. [`ExitRequester::request`]
//!   (callable from any thread, e.g. a timer) revokes that page, so the next unit entry faults and
//!   leaves at a unit boundary — HotSpot's safepoint-polling trick: no flags touched, one load per
//!   unit.
//! - Syscall User Dispatch is armed as a safety net while translated code runs: translated code
//!   lives below the exempt range, and a system call made from it (which the translator never
//!   emits) raises SIGSYS instead of reaching the host kernel.

use std::cell::Cell;
use std::io;
use std::mem::offset_of;
use std::ptr;
use std::sync::Arc;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::fpu::FxImage;

/// Why translated code returned to the monitor ([`VcpuContext::exit_reason`]).
pub mod reason {
    /// A direct branch (or a unit's fall-through) to a guest EIP with no translation chained yet.
    /// `exit_eip` is the target; `exit_unit`/`exit_slot` name the patchable jump.
    pub const BRANCH: u32 = 1;
    /// An indirect branch whose target missed the lookup table; `exit_eip` is the target.
    pub const LOOKUP_MISS: u32 = 2;
    /// The instruction at `exit_eip` must be executed by the interpreter (a callout).
    pub const CALLOUT: u32 = 3;
    /// A host signal interrupted translated code: `signo`, `si_code`, `si_addr`, `fault_rip`.
    pub const SIGNAL: u32 = 4;
    /// Inline code set IF while an interrupt waits (`irq_pending`): `exit_eip` is the next
    /// instruction, and the interrupt is due before it.
    pub const IRQ_WINDOW: u32 = 5;
    /// An inline STI whose one-instruction interrupt shadow the unit cannot hold: `exit_eip` is
    /// the instruction in the shadow, for the monitor to execute before any interrupt.
    pub const STI_SHADOW: u32 = 6;
}

/// The host signals translated code can raise, as (number, name) for counters.
pub const SIGNAL_NAMES: [(i32, &str); 6] = [
    (libc::SIGSEGV, "SIGSEGV"),
    (libc::SIGBUS, "SIGBUS"),
    (libc::SIGFPE, "SIGFPE"),
    (libc::SIGILL, "SIGILL"),
    (libc::SIGTRAP, "SIGTRAP"),
    (libc::SIGSYS, "SIGSYS"),
];

/// `VcpuContext::magic`, checked by the signal handler before it trusts R15.
const CONTEXT_MAGIC: u64 = 0x6274_3836_6374_7821;

/// The vCPU state shared by the monitor and translated code. Field offsets are part of the
/// contract with the translator (the `OFF_*` constants).
#[repr(C)]
#[derive(Debug)]
pub struct VcpuContext {
    /// Guest EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI.
    pub gpr: [u32; 8],
    /// The host RFLAGS image: guest arithmetic flags and DF (the rest is sanitised on entry).
    pub rflags: u64,
    host_rsp: u64,
    exit_stub: u64,
    sud_selector: *mut u8,
    /// One of [`reason`].
    pub exit_reason: u32,
    /// The guest EIP the exit is about.
    pub exit_eip: u32,
    /// The unit whose exit jump was taken (for [`reason::BRANCH`]).
    pub exit_unit: u32,
    /// Which of that unit's exit jumps (for [`reason::BRANCH`]).
    pub exit_slot: u32,
    /// The indirect-branch lookup table (owned by the translator).
    pub lookup: u64,
    /// Guest instructions retired by translated code (R14 while it runs).
    pub retired: u64,
    /// Indirect-branch lookups that hit.
    pub lookup_hits: u64,
    /// Signal number of a [`reason::SIGNAL`] exit.
    pub signo: i32,
    /// `si_code` of that signal.
    pub si_code: i32,
    /// `si_addr` of that signal.
    pub si_addr: u64,
    /// Host RIP where the signal interrupted translated code.
    pub fault_rip: u64,
    /// The host page-fault error code of a SIGSEGV (bit 1: the access was a write).
    pub fault_error: u64,
    /// Guest FS.base, added to FS-relative addresses by units translated while FS is a flat-limit
    /// data segment.
    pub fs_base: u32,
    /// Guest GS.base, likewise.
    pub gs_base: u32,
    /// Guest DS.base, added to DS-relative addresses by units translated while it is non-zero
    /// (DS, ES and SS are always flat-limit data segments while translated code runs).
    pub ds_base: u32,
    /// Guest ES.base, likewise.
    pub es_base: u32,
    /// Guest SS.base, likewise (stack operations and EBP/ESP-based operands).
    pub ss_base: u32,
    /// +1 while the guest's DF is clear, -1 while it is set: string instructions step ESI/EDI by
    /// this times the operand size without reading RFLAGS (translated CLD/STD keep it current).
    pub df_step: i32,
    /// The guest's EFLAGS.IF (0 or 0x200), which units translated for CPL 0 change inline
    /// (CLI, STI, PUSHF, POPF); the monitor merges it back into EFLAGS.
    pub vif: u32,
    /// Non-zero while an interrupt waits for IF: an inline STI or POPF that sets IF then leaves
    /// (after STI's one-instruction shadow) so the monitor can deliver it.
    pub irq_pending: u32,
    /// The guest EFLAGS bits other than the arithmetic flags, DF and IF (IOPL, NT, AC, ID and
    /// bit 1), which an inline PUSHF stores and an inline POPF keeps.
    pub sysflags: u32,
    magic: u64,
    /// Non-zero while the host FPU holds the guest's x87/SSE state (loaded by a unit's first
    /// floating-point instruction from [`VcpuContext::fx`]); the exit stub saves it back.
    pub fp_live: u32,
    /// Set by the exit stub when it saved the guest's state into [`VcpuContext::fx`]; the
    /// monitor copies it out and clears this.
    pub fp_saved: u32,
    /// The host's x87 control word and MXCSR while translated code runs (restored on exit).
    host_fcw: u32,
    host_mxcsr: u32,
    /// Guest EIP (offset in CS) of the last x87 instruction translated code ran, for FIP.
    pub x87_ip: u32,
    /// Its FOP, with bit 31 set once an x87 instruction ran since [`Vcpu::enter`].
    pub x87_op: u32,
    /// The offset of the last x87 memory operand, for FDP.
    pub x87_dp: u32,
    /// Its segment register (iced's `Register` number), 0 if no x87 memory operand ran.
    pub x87_ds: u32,
    /// The guest's x87/SSE state (FXSAVE image) while translated code owns it.
    pub fx: FxImage,
    /// The guest's segment selectors ES, CS, SS, DS, FS, GS (encoding order), zero-extended:
    /// what inline PUSH Sreg and MOV r/m, Sreg store.
    pub selectors: [u32; 6],
    /// Per segment register (encoding order), what an inline reload of the selector it holds
    /// needs to know to skip the full load (only DS, ES, FS and GS are ever armed).
    pub reload: [SegmentReload; 6],
    /// Segment loads that took the inline reload path.
    pub segment_reloads: u64,
}

/// What lets translated code see that loading a data segment register with the selector it
/// already holds changes nothing ([`VcpuContext::reload`]): the same selector, and the same 8
/// descriptor bytes in the GDT as the register was loaded from. The monitor arms it only when
/// those bytes would load exactly the current hidden part, pass every check at CPL 0, and
/// have the accessed bit set (so a load would write nothing); with `key` 0 it never matches.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentReload {
    /// `!selector` (64 bits) while armed, 0 otherwise: `key + selector + 1` is 0 exactly when
    /// the selector matches, which translated code tests without touching flags.
    pub key: u64,
    /// Minus the descriptor's 8 bytes (modulo 2^64): adding the live bytes gives 0 exactly
    /// when they are unchanged.
    pub neg_descriptor: u64,
    /// The descriptor's linear address (GDT base + selector index × 8).
    pub address: u32,
    _pad: u32,
}

impl SegmentReload {
    /// Armed for `selector`, whose descriptor at linear `address` is `descriptor`.
    pub fn armed(selector: u16, descriptor: u64, address: u32) -> Self {
        Self {
            key: !u64::from(selector),
            neg_descriptor: descriptor.wrapping_neg(),
            address,
            _pad: 0,
        }
    }
}

/// Offset of [`VcpuContext::gpr`].
pub const OFF_GPR: i32 = offset_of!(VcpuContext, gpr) as i32;
/// Offset of [`VcpuContext::exit_stub`] (translated code leaves with `jmp [r15+OFF_EXIT_STUB]`).
pub const OFF_EXIT_STUB: i32 = offset_of!(VcpuContext, exit_stub) as i32;
/// Offset of [`VcpuContext::exit_reason`].
pub const OFF_EXIT_REASON: i32 = offset_of!(VcpuContext, exit_reason) as i32;
/// Offset of [`VcpuContext::exit_eip`].
pub const OFF_EXIT_EIP: i32 = offset_of!(VcpuContext, exit_eip) as i32;
/// Offset of [`VcpuContext::exit_unit`].
pub const OFF_EXIT_UNIT: i32 = offset_of!(VcpuContext, exit_unit) as i32;
/// Offset of [`VcpuContext::exit_slot`].
pub const OFF_EXIT_SLOT: i32 = offset_of!(VcpuContext, exit_slot) as i32;
/// Offset of [`VcpuContext::lookup`].
pub const OFF_LOOKUP: i32 = offset_of!(VcpuContext, lookup) as i32;
/// Offset of [`VcpuContext::lookup_hits`].
pub const OFF_LOOKUP_HITS: i32 = offset_of!(VcpuContext, lookup_hits) as i32;
/// Offset of [`VcpuContext::fs_base`].
pub const OFF_FS_BASE: i32 = offset_of!(VcpuContext, fs_base) as i32;
/// Offset of [`VcpuContext::gs_base`].
pub const OFF_GS_BASE: i32 = offset_of!(VcpuContext, gs_base) as i32;
/// Offset of [`VcpuContext::ds_base`].
pub const OFF_DS_BASE: i32 = offset_of!(VcpuContext, ds_base) as i32;
/// Offset of [`VcpuContext::es_base`].
pub const OFF_ES_BASE: i32 = offset_of!(VcpuContext, es_base) as i32;
/// Offset of [`VcpuContext::ss_base`].
pub const OFF_SS_BASE: i32 = offset_of!(VcpuContext, ss_base) as i32;
/// Offset of [`VcpuContext::df_step`].
pub const OFF_DF_STEP: i32 = offset_of!(VcpuContext, df_step) as i32;
/// Offset of [`VcpuContext::vif`].
pub const OFF_VIF: i32 = offset_of!(VcpuContext, vif) as i32;
/// Offset of [`VcpuContext::irq_pending`].
pub const OFF_IRQ_PENDING: i32 = offset_of!(VcpuContext, irq_pending) as i32;
/// Offset of [`VcpuContext::sysflags`].
pub const OFF_SYSFLAGS: i32 = offset_of!(VcpuContext, sysflags) as i32;
/// Bit 31 of [`VcpuContext::x87_op`]: an x87 instruction ran since the last world entry.
pub const X87_RAN: u32 = 1 << 31;
/// Offset of [`VcpuContext::fp_live`].
pub const OFF_FP_LIVE: i32 = offset_of!(VcpuContext, fp_live) as i32;
/// Offset of [`VcpuContext::x87_ip`].
pub const OFF_X87_IP: i32 = offset_of!(VcpuContext, x87_ip) as i32;
/// Offset of [`VcpuContext::x87_op`].
pub const OFF_X87_OP: i32 = offset_of!(VcpuContext, x87_op) as i32;
/// Offset of [`VcpuContext::x87_dp`].
pub const OFF_X87_DP: i32 = offset_of!(VcpuContext, x87_dp) as i32;
/// Offset of [`VcpuContext::x87_ds`].
pub const OFF_X87_DS: i32 = offset_of!(VcpuContext, x87_ds) as i32;
/// Offset of [`VcpuContext::fx`] (16-byte aligned, for FXRSTOR/FXSAVE).
pub const OFF_FX: i32 = offset_of!(VcpuContext, fx) as i32;
/// Offset of [`VcpuContext::selectors`].
pub const OFF_SELECTORS: i32 = offset_of!(VcpuContext, selectors) as i32;
/// Offset of [`VcpuContext::reload`].
pub const OFF_RELOAD: i32 = offset_of!(VcpuContext, reload) as i32;
/// Size of one [`SegmentReload`].
pub const RELOAD_SIZE: i32 = std::mem::size_of::<SegmentReload>() as i32;
/// Offset of [`SegmentReload::key`] in it.
pub const RELOAD_KEY: i32 = offset_of!(SegmentReload, key) as i32;
/// Offset of [`SegmentReload::neg_descriptor`] in it.
pub const RELOAD_NEG_DESCRIPTOR: i32 = offset_of!(SegmentReload, neg_descriptor) as i32;
/// Offset of [`SegmentReload::address`] in it.
pub const RELOAD_ADDRESS: i32 = offset_of!(SegmentReload, address) as i32;
/// Offset of [`VcpuContext::segment_reloads`].
pub const OFF_SEGMENT_RELOADS: i32 = offset_of!(VcpuContext, segment_reloads) as i32;
/// Offset of the poll page from the context: every unit starts with `mov r11d, [r15+OFF_POLL]`.
pub const OFF_POLL: i32 = PAGE as i32;

const PAGE: usize = 4096;

// The assembly below hard-codes these offsets.
const _: () = {
    assert!(offset_of!(VcpuContext, gpr) == 0);
    assert!(offset_of!(VcpuContext, rflags) == 32);
    assert!(offset_of!(VcpuContext, host_rsp) == 40);
    assert!(offset_of!(VcpuContext, exit_stub) == 48);
    assert!(offset_of!(VcpuContext, sud_selector) == 56);
    assert!(offset_of!(VcpuContext, retired) == 88);
    assert!(offset_of!(VcpuContext, fx) % 16 == 0);
    assert!(std::mem::size_of::<VcpuContext>() <= PAGE);
};

std::arch::global_asm!(
    ".text",
    ".p2align 4",
    ".globl bt86_world_enter",
    "bt86_world_enter:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rdi + 40], rsp",
    "mov r15, rdi",
    "fnstcw [r15 + {host_fcw}]",
    "stmxcsr [r15 + {host_mxcsr}]",
    "mov dword ptr [r15 + {fp_live}], 0",
    "mov r11, rsi",
    "mov rax, [r15 + 56]",
    "mov byte ptr [rax], 1",
    "push qword ptr [r15 + 32]",
    "popfq",
    "mov r14, [r15 + 88]",
    "mov eax, [r15 + 0]",
    "mov ecx, [r15 + 4]",
    "mov edx, [r15 + 8]",
    "mov ebx, [r15 + 12]",
    "mov r12d, [r15 + 16]",
    "mov ebp, [r15 + 20]",
    "mov esi, [r15 + 24]",
    "mov edi, [r15 + 28]",
    "jmp r11",
    ".p2align 4",
    ".globl bt86_world_exit",
    "bt86_world_exit:",
    "pushfq",
    "pop qword ptr [r15 + 32]",
    "cld",
    "mov [r15 + 0], eax",
    "mov [r15 + 4], ecx",
    "mov [r15 + 8], edx",
    "mov [r15 + 12], ebx",
    "mov [r15 + 16], r12d",
    "mov [r15 + 20], ebp",
    "mov [r15 + 24], esi",
    "mov [r15 + 28], edi",
    "mov [r15 + 88], r14",
    // The guest's x87/SSE state goes back to the context, and the host gets its own control
    // words and an empty x87 stack back (the SysV ABI's state at a function's return).
    "cmp dword ptr [r15 + {fp_live}], 0",
    "je 2f",
    "fxsave [r15 + {fx}]",
    "fninit",
    "fldcw [r15 + {host_fcw}]",
    "ldmxcsr [r15 + {host_mxcsr}]",
    "mov dword ptr [r15 + {fp_live}], 0",
    "mov dword ptr [r15 + {fp_saved}], 1",
    "2:",
    "mov rax, [r15 + 56]",
    "mov byte ptr [rax], 0",
    "mov rsp, [r15 + 40]",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    fp_live = const offset_of!(VcpuContext, fp_live),
    fp_saved = const offset_of!(VcpuContext, fp_saved),
    host_fcw = const offset_of!(VcpuContext, host_fcw),
    host_mxcsr = const offset_of!(VcpuContext, host_mxcsr),
    fx = const offset_of!(VcpuContext, fx),
);

unsafe extern "sysv64" {
    fn bt86_world_enter(ctx: *mut VcpuContext, entry: u64);
    fn bt86_world_exit();
}

/// Errors preparing the world switch.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// The host refused a mapping or a signal setting.
    #[error("the host refused {what} for translated code")]
    Host {
        /// Which host call failed.
        what: &'static str,
        /// The host's error.
        #[source]
        source: io::Error,
    },
}

fn host_err(what: &'static str) -> WorldError {
    WorldError::Host {
        what,
        source: io::Error::last_os_error(),
    }
}

/// The context and its poll page: two pages of one anonymous mapping, freed when the last owner
/// (the engine or an [`ExitRequester`]) lets go. The exit-request flag lives in the context's
/// page after the [`VcpuContext`] ([`REQUEST_FLAG`]), where the time-slice signal handler finds
/// it from R15 alone, and where no `&mut VcpuContext` covers it while other threads set it.
struct ContextMapping {
    base: *mut u8,
}

/// Offset of the exit-request flag (an `AtomicBool`) in the context's page.
const REQUEST_FLAG: usize = PAGE - 8;
const _: () = assert!(std::mem::size_of::<VcpuContext>() <= REQUEST_FLAG);

/// Asks translated code running with the context at `base` to leave at its next unit entry: sets
/// the flag and revokes the poll page (once per request). Async-signal-safe (an atomic swap and
/// mprotect).
///
/// # Safety
/// `base` must be the start of a live context mapping.
unsafe fn request_exit(base: *mut u8) {
    // SAFETY: the caller guarantees the mapping is live; the flag is an AtomicBool-sized,
    // aligned slot in its first page that only atomic operations touch.
    let flag = unsafe { &*base.add(REQUEST_FLAG).cast::<AtomicBool>() };
    if !flag.swap(true, Ordering::AcqRel) {
        // SAFETY: revokes access to the mapping's own poll page; nothing in Rust reads it.
        unsafe { libc::mprotect(base.add(PAGE).cast(), PAGE, libc::PROT_NONE) };
    }
}

// SAFETY: the mapping is owned by this struct; the only cross-thread operation is mprotect of
// the poll page (a system call on an address range), guarded by the atomic flag.
unsafe impl Send for ContextMapping {}
// SAFETY: as above; the context itself is only touched by the thread that owns the `Vcpu`.
unsafe impl Sync for ContextMapping {}

impl Drop for ContextMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the two pages mapped in `Vcpu::new`; no reference outlives it.
        unsafe { libc::munmap(self.base.cast(), 2 * PAGE) };
    }
}

impl ContextMapping {
    fn poll_page(&self) -> *mut libc::c_void {
        // SAFETY: the mapping is two pages long.
        unsafe { self.base.add(PAGE).cast() }
    }

    fn requested(&self) -> &AtomicBool {
        // SAFETY: see `request_exit`; the mapping lives as long as `self`.
        unsafe { &*self.base.add(REQUEST_FLAG).cast::<AtomicBool>() }
    }
}

/// A handle that makes translated code leave at its next unit boundary; usable from any thread.
#[derive(Clone)]
pub struct ExitRequester(Arc<ContextMapping>);

impl ExitRequester {
    /// Asks translated code to return to the monitor at the next unit entry.
    pub fn request(&self) {
        // SAFETY: our Arc keeps the mapping live.
        unsafe { request_exit(self.0.base) };
    }
}

/// One vCPU's context for translated code.
pub struct Vcpu {
    mapping: Arc<ContextMapping>,
}

impl Vcpu {
    /// Allocates a context (and its poll page) and installs the process's signal handlers.
    pub fn new() -> Result<Self, WorldError> {
        install_signal_handlers()?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                2 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(host_err("mmap of the vCPU context"));
        }
        // The fresh mapping is zero-filled: the request flag starts false.
        let mapping = Arc::new(ContextMapping { base: base.cast() });
        // SAFETY: the poll page is ours; translated code only reads it.
        if unsafe { libc::mprotect(mapping.poll_page(), PAGE, libc::PROT_READ) } != 0 {
            return Err(host_err("mprotect of the poll page"));
        }
        let ctx = VcpuContext {
            gpr: [0; 8],
            rflags: 0x202,
            host_rsp: 0,
            exit_stub: bt86_world_exit as *const () as u64,
            sud_selector: ptr::null_mut(),
            exit_reason: 0,
            exit_eip: 0,
            exit_unit: 0,
            exit_slot: 0,
            lookup: 0,
            retired: 0,
            lookup_hits: 0,
            signo: 0,
            si_code: 0,
            si_addr: 0,
            fault_rip: 0,
            fault_error: 0,
            fs_base: 0,
            gs_base: 0,
            ds_base: 0,
            es_base: 0,
            ss_base: 0,
            df_step: 1,
            vif: 0,
            irq_pending: 0,
            sysflags: 2,
            magic: CONTEXT_MAGIC,
            fp_live: 0,
            fp_saved: 0,
            host_fcw: 0,
            host_mxcsr: 0,
            x87_ip: 0,
            x87_op: 0,
            x87_dp: 0,
            x87_ds: 0,
            fx: FxImage::default(),
            selectors: [0; 6],
            reload: [SegmentReload::default(); 6],
            segment_reloads: 0,
        };
        // SAFETY: the first page is writable, page-aligned (so aligned for the struct) and ours.
        unsafe { ptr::write(mapping.base.cast::<VcpuContext>(), ctx) };
        Ok(Self { mapping })
    }

    /// The context.
    pub fn context(&self) -> &VcpuContext {
        // SAFETY: initialised in `new`; only this thread writes it (translated code runs inside
        // `enter`, which takes `&mut self`).
        unsafe { &*self.mapping.base.cast::<VcpuContext>() }
    }

    /// The context, for updating the guest state before [`Vcpu::enter`].
    pub fn context_mut(&mut self) -> &mut VcpuContext {
        // SAFETY: as in `context`, and `&mut self` makes the access exclusive.
        unsafe { &mut *self.mapping.base.cast::<VcpuContext>() }
    }

    /// A handle other threads can use to make translated code leave.
    pub fn exit_requester(&self) -> ExitRequester {
        ExitRequester(self.mapping.clone())
    }

    /// Whether `addr` lies in this context's poll page (a fault there is an exit request).
    pub fn is_poll_address(&self, addr: u64) -> bool {
        let p = self.mapping.poll_page() as u64;
        (p..p + PAGE as u64).contains(&addr)
    }

    /// Re-enables the poll page after an exit request was taken.
    pub fn clear_exit_request(&self) {
        // SAFETY: restores read access to our own poll page.
        unsafe { libc::mprotect(self.mapping.poll_page(), PAGE, libc::PROT_READ) };
        self.mapping.requested().store(false, Ordering::Release);
    }

    /// Runs translated code at host address `entry` with GS.base = `gs_base`, until it exits.
    /// The exit's details are in [`Vcpu::context`].
    ///
    /// # Safety
    /// `entry` must be the entry of a translation unit in a [`crate::codecache::CodeCache`]
    /// built under the translator's contract (it only reaches guest memory through GS, leaves
    /// only through the exit stub, and its lookup table pointer in the context is valid), and
    /// `gs_base` must be a live window whose mappings only hold guest memory.
    pub unsafe fn enter(&mut self, entry: u64, gs_base: u64) {
        set_gs_base(gs_base);
        let selector = sud_selector();
        let ctx = self.context_mut();
        ctx.sud_selector = selector;
        ctx.rflags = (ctx.rflags & GUEST_RFLAGS) | 0x202;
        ctx.exit_reason = 0;
        // SAFETY: the caller guarantees the unit keeps the contract; the context is valid and
        // exclusively ours for the duration.
        unsafe { bt86_world_enter(self.mapping.base.cast(), entry) };
    }
}

/// The RFLAGS bits translated code computes natively: CF, PF, AF, ZF, SF, OF and DF.
pub const GUEST_RFLAGS: u64 = 0x0CD5;

// ---- GS base ------------------------------------------------------------------------------

thread_local! {
    static GS_BASE: Cell<u64> = const { Cell::new(0) };
}

fn fsgsbase() -> bool {
    static HAS: Once = Once::new();
    static VALUE: AtomicBool = AtomicBool::new(false);
    HAS.call_once(|| {
        // SAFETY: getauxval has no preconditions.
        let hwcap2 = unsafe { libc::getauxval(libc::AT_HWCAP2) };
        VALUE.store(hwcap2 & 2 != 0, Ordering::Relaxed); // HWCAP2_FSGSBASE
    });
    VALUE.load(Ordering::Relaxed)
}

/// Points this thread's GS base at `base` (WRGSBASE when the kernel enables it, otherwise
/// arch_prctl). Rust code on x86-64 Linux never uses GS, so it can stay set after an exit.
fn set_gs_base(base: u64) {
    if GS_BASE.with(Cell::get) == base {
        return;
    }
    if fsgsbase() {
        // SAFETY: the kernel advertised FSGSBASE (HWCAP2), so WRGSBASE is enabled in user mode;
        // it only changes this thread's GS base, which nothing in the host process uses.
        unsafe { std::arch::asm!("wrgsbase {}", in(reg) base, options(nostack, preserves_flags)) };
    } else {
        const ARCH_SET_GS: libc::c_int = 0x1001;
        // SAFETY: arch_prctl(ARCH_SET_GS) only changes this thread's GS base.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_SET_GS, base) };
    }
    GS_BASE.with(|c| c.set(base));
}

// ---- Syscall User Dispatch -----------------------------------------------------------------

const PR_SET_SYSCALL_USER_DISPATCH: libc::c_int = 59;
const PR_SYS_DISPATCH_ON: libc::c_ulong = 1;
/// Top of the x86-64 user address space (47-bit).
const USER_TOP: u64 = 1 << 47;

thread_local! {
    static SUD_SELECTOR: Cell<*mut u8> = const { Cell::new(ptr::null_mut()) };
}

static SUD_ARMED: AtomicU64 = AtomicU64::new(0);

/// Threads on which Syscall User Dispatch is armed.
pub fn sud_armed_threads() -> u64 {
    SUD_ARMED.load(Ordering::Relaxed)
}

/// This thread's dispatch selector byte, arming Syscall User Dispatch on first use (exempting
/// everything above the code-cache zone). Where the host cannot, a plain byte stands in and the
/// safety net is simply absent.
fn sud_selector() -> *mut u8 {
    let cur = SUD_SELECTOR.with(Cell::get);
    if !cur.is_null() {
        return cur;
    }
    // One byte per thread for the thread's life (the kernel reads it on every system call while
    // dispatch is on), so it is deliberately leaked.
    let selector: *mut u8 = Box::leak(Box::new(0u8));
    let zone_end = crate::codecache::zone_end();
    if zone_end != 0 && zone_end < bt86_world_enter as *const () as u64 {
        // SAFETY: prctl with a valid selector address that stays valid for the thread's life.
        let r = unsafe {
            libc::prctl(
                PR_SET_SYSCALL_USER_DISPATCH,
                PR_SYS_DISPATCH_ON,
                zone_end as libc::c_ulong,
                (USER_TOP - zone_end) as libc::c_ulong,
                selector,
            )
        };
        if r == 0 {
            SUD_ARMED.fetch_add(1, Ordering::Relaxed);
        } else {
            tracing::warn!(
                "Syscall User Dispatch is not available ({}); translated code runs without that \
                 safety net",
                io::Error::last_os_error()
            );
        }
    }
    SUD_SELECTOR.with(|c| c.set(selector));
    selector
}

// ---- signals -------------------------------------------------------------------------------

const SIGNALS: [libc::c_int; 6] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGFPE,
    libc::SIGILL,
    libc::SIGTRAP,
    libc::SIGSYS,
];

/// The actions in place before ours, restored for a signal that is not translated code's.
static mut PREVIOUS: [std::mem::MaybeUninit<libc::sigaction>; 6] =
    [const { std::mem::MaybeUninit::uninit() }; 6];
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Signals from translated code that the handler redirected, by kind (index in `SIGNALS`).
static REDIRECTED: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// SIGSYS raised by translated code (Syscall User Dispatch firing): must stay 0.
pub fn sigsys_count() -> u64 {
    REDIRECTED[5].load(Ordering::Relaxed)
}

thread_local! {
    static ALT_STACK_READY: Cell<bool> = const { Cell::new(false) };
}

const ALT_STACK_SIZE: usize = 256 * 1024;

/// Makes sure this thread has an alternate signal stack (keeping one it already has).
fn ensure_alt_stack() -> Result<(), WorldError> {
    if ALT_STACK_READY.with(Cell::get) {
        return Ok(());
    }
    // SAFETY: stack_t is plain data.
    let mut old: libc::stack_t = unsafe { std::mem::zeroed() };
    // SAFETY: queries the current alternate stack into `old`.
    if unsafe { libc::sigaltstack(ptr::null(), &mut old) } != 0 {
        return Err(host_err("sigaltstack"));
    }
    if old.ss_flags & libc::SS_DISABLE != 0 || old.ss_size < ALT_STACK_SIZE / 4 {
        // SAFETY: a fresh anonymous mapping; it stays for the thread's life (leaked on purpose,
        // as the kernel may use it until the thread ends).
        let stack = unsafe {
            libc::mmap(
                ptr::null_mut(),
                ALT_STACK_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if stack == libc::MAP_FAILED {
            return Err(host_err("mmap of the alternate signal stack"));
        }
        let alt = libc::stack_t {
            ss_sp: stack,
            ss_flags: 0,
            ss_size: ALT_STACK_SIZE,
        };
        // SAFETY: `alt` describes the mapping just created.
        if unsafe { libc::sigaltstack(&alt, ptr::null_mut()) } != 0 {
            return Err(host_err("sigaltstack"));
        }
    }
    ALT_STACK_READY.with(|c| c.set(true));
    Ok(())
}

/// Installs the handlers for SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP and SIGSYS (once per
/// process) and an alternate signal stack for this thread.
pub fn install_signal_handlers() -> Result<(), WorldError> {
    ensure_alt_stack()?;
    let mut failed = None;
    INSTALL.call_once(|| {
        // SAFETY: sigaction is plain data; every field that matters is set below.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: sa_mask is a valid sigset_t.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        for (i, s) in SIGNALS.iter().enumerate() {
            // SAFETY: runs once, before any handler of ours can read PREVIOUS; `sa` is fully
            // initialised and `on_signal` has the SA_SIGINFO signature.
            let r = unsafe {
                let prev = (&raw mut PREVIOUS[i]).cast::<libc::sigaction>();
                libc::sigaction(*s, &sa, prev)
            };
            if r != 0 {
                failed = Some(host_err("sigaction"));
                return;
            }
        }
        INSTALLED.store(true, Ordering::Release);
    });
    if let Some(e) = failed {
        return Err(e);
    }
    if !INSTALLED.load(Ordering::Acquire) {
        return Err(WorldError::Host {
            what: "the signal handlers",
            source: io::Error::other("an earlier installation failed"),
        });
    }
    Ok(())
}

/// The handler: a signal raised by translated code is recorded in the context (found through
/// R15) and the interrupted context resumes at the exit stub; anything else gets the action that
/// was in place before ours (a monitor bug must still crash visibly). Async-signal-safe: plain
/// loads and stores, and sigaction/raise.
extern "C" fn on_signal(signo: libc::c_int, info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    let uc = uctx.cast::<libc::ucontext_t>();
    // SAFETY: the kernel passes a valid ucontext_t for SA_SIGINFO handlers.
    let gregs = unsafe { &mut (*uc).uc_mcontext.gregs };
    let rip = gregs[libc::REG_RIP as usize] as u64;
    if crate::codecache::zone_contains(rip) {
        let ctx = gregs[libc::REG_R15 as usize] as *mut VcpuContext;
        // SAFETY: translated code always runs with R15 = its context (the translator never
        // writes R15); the magic check guards against a corrupted R15 before anything is stored.
        if !ctx.is_null() && unsafe { (*ctx).magic } == CONTEXT_MAGIC {
            // SAFETY: `info` is valid for SA_SIGINFO handlers; `ctx` is a live context.
            unsafe {
                (*ctx).exit_reason = reason::SIGNAL;
                (*ctx).signo = signo;
                (*ctx).si_code = (*info).si_code;
                (*ctx).si_addr = (*info).si_addr() as u64;
                (*ctx).fault_rip = rip;
                (*ctx).fault_error = gregs[libc::REG_ERR as usize] as u64;
            }
            if let Some(i) = SIGNALS.iter().position(|s| *s == signo) {
                REDIRECTED[i].fetch_add(1, Ordering::Relaxed);
            }
            gregs[libc::REG_RIP as usize] = bt86_world_exit as *const () as i64;
            return;
        }
    }
    let Some(i) = SIGNALS.iter().position(|s| *s == signo) else {
        return;
    };
    // SAFETY: PREVIOUS[i] was filled by the successful installation before this handler could
    // run; restoring it (or the default) and re-raising is async-signal-safe.
    unsafe {
        let prev = (&raw const PREVIOUS[i]).cast::<libc::sigaction>();
        if libc::sigaction(signo, prev, ptr::null_mut()) != 0 {
            libc::signal(signo, libc::SIG_DFL);
        }
        if (*info).si_code <= 0 {
            // Sent by a process: send it again to the restored action. A fault (si_code > 0)
            // simply happens again when the instruction restarts.
            libc::raise(signo);
        }
    }
}

/// Time slices for translated code: a POSIX timer signals the vCPU's own thread when the slice
/// ends, so the VM's run loop gets to service its timers and interrupt controller even while a
/// guest spins in translated code (DESIGN.md §6).
///
/// - The signal's handler ([`on_slice`]) runs on the vCPU thread. If it interrupted translated
///   code it finds the context through R15 and requests an exit (the next unit entry faults on
///   the poll page); if it interrupted the monitor it marks the slice as due on this thread, and
///   [`take_slice_due`] reports it before the monitor enters translated code again.
/// - A slice ends when the VM's next timer event is due ([`SliceTimer::end_within`]), so a
///   spinning guest gets its timer interrupt on time, and with no timer event within
///   [`MAX_SLICE`] at the latest. The timer is reprogrammed only when that moment moves. After
///   its first signal it goes on every [`MAX_SLICE`] until reprogrammed: a signal that lands
///   where nothing acts on it (in the monitor just before it enters translated code, or as an
///   exit request is being cleared) delays the VM by one `MAX_SLICE` instead of leaving a
///   spinning guest running for ever.
/// - While the vCPU is halted ([`SliceTimer::park`]) the slice end moves to just after the VM's
///   planned wake-up ([`PARK_MARGIN`] later), or stops when the VM sleeps with no timer armed.
///   So the signal does not fire while the VM sleeps nor as it wakes (a signal costs more than a
///   timer programming: the kernel saves the FPU state to the handler's frame), and the short run
///   that follows the wake-up keeps that end ([`SliceTimer::end_within`] accepts an end before
///   the moment it wants). An idle guest whose timer interrupts come at a steady rate costs one
///   timer programming per interrupt, no signal and no helper thread. (Reprogramming a host
///   timer is not free either: when it becomes or stops being the CPU's earliest, the host
///   reprograms its clock-event device, a trap under a hypervisor.)
/// - The timer is created on the thread that first arms it, and again if another thread runs
///   the vCPU later.
pub struct SliceTimer {
    timer: Option<crate::kick::ThreadTimer>,
    /// When the armed timer first fires.
    due: Option<std::time::Instant>,
}

/// The longest time slice when no timer event comes sooner: how long a spinning guest can keep
/// the VM from noticing serial input or a stop request.
pub const MAX_SLICE: std::time::Duration = std::time::Duration::from_millis(10);

/// How far from the wanted moment an armed slice end may be and still be kept: later by at most
/// this, earlier by at most [`SLICE_EARLY`] (an early end costs one spare exit; reprogramming
/// costs a system call).
const SLICE_LATE: std::time::Duration = std::time::Duration::from_micros(20);
const SLICE_EARLY: std::time::Duration = std::time::Duration::from_millis(5);

/// How long after the VM's planned wake-up a parked slice ends: far enough that the host's
/// timer slack on the VM's sleep (50 us by default) and the wake-up's own work do not meet the
/// signal, near enough that the run after the wake-up keeps it when the guest's timer comes
/// every few milliseconds.
pub const PARK_MARGIN: std::time::Duration = std::time::Duration::from_millis(1);

thread_local! {
    /// A slice ended while this thread was in the monitor rather than in translated code.
    static SLICE_DUE: Cell<bool> = const { Cell::new(false) };
}

/// The signal that ends a time slice (a real-time signal nothing else in bt86 uses).
fn slice_signal() -> libc::c_int {
    libc::SIGRTMIN() + 4
}

/// Whether a time slice ended while this thread ran monitor code; clears the mark.
pub fn take_slice_due() -> bool {
    SLICE_DUE.with(|d| d.replace(false))
}

/// The time-slice signal's handler. Async-signal-safe: loads, an atomic swap, mprotect, and a
/// store to a thread-local that needs no initialisation; errno is preserved.
extern "C" fn on_slice(_: libc::c_int, _: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    // SAFETY: errno is thread-local; reading and restoring it is what every handler must do.
    let errno = unsafe { *libc::__errno_location() };
    let uc = uctx.cast::<libc::ucontext_t>();
    // SAFETY: the kernel passes a valid ucontext_t for SA_SIGINFO handlers.
    let gregs = unsafe { &(*uc).uc_mcontext.gregs };
    let rip = gregs[libc::REG_RIP as usize] as u64;
    let ctx = gregs[libc::REG_R15 as usize] as *mut VcpuContext;
    // SAFETY: translated code always runs with R15 = its context, which is live while it runs
    // (the translator never writes R15); the magic check guards against anything else.
    let in_translated = crate::codecache::zone_contains(rip)
        && !ctx.is_null()
        && unsafe { (*ctx).magic } == CONTEXT_MAGIC;
    if in_translated {
        // SAFETY: the context is the first page of its live mapping.
        unsafe { request_exit(ctx.cast()) };
    } else {
        SLICE_DUE.with(|d| d.set(true));
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Installs [`on_slice`] once per process.
fn install_slice_handler() -> io::Result<()> {
    static INSTALL: Once = Once::new();
    static FAILED: AtomicBool = AtomicBool::new(false);
    INSTALL.call_once(|| {
        // SAFETY: sigaction is plain data; every field that matters is set below, and
        // `on_slice` has the SA_SIGINFO signature. SA_RESTART keeps the monitor's own system
        // calls transparent; SA_ONSTACK runs the handler where the fault handler runs.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_slice as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(slice_signal(), &sa, ptr::null_mut())
        };
        FAILED.store(rc != 0, Ordering::Release);
    });
    if FAILED.load(Ordering::Acquire) {
        return Err(io::Error::other(
            "the host refused a handler for the time-slice signal",
        ));
    }
    Ok(())
}

impl SliceTimer {
    /// Time slices, not armed until the first [`SliceTimer::end_within`].
    pub fn new() -> io::Result<Self> {
        install_slice_handler()?;
        Ok(Self {
            timer: None,
            due: None,
        })
    }

    /// Makes the slice end `within` from now (at most [`MAX_SLICE`]): keeps the armed end if
    /// it is close enough, else (re)programs the timer for the calling thread, which runs the
    /// vCPU. With nothing due within [`MAX_SLICE`], any armed end before that is close enough
    /// (an end that comes first costs one spare exit, and the run after it reprograms).
    pub fn end_within(&mut self, within: std::time::Duration) -> io::Result<()> {
        let no_deadline = within >= MAX_SLICE;
        let within = within.min(MAX_SLICE);
        let now = std::time::Instant::now();
        let wanted = now + within;
        let timer = match &mut self.timer {
            Some(t) if t.is_current_thread() => {
                if let Some(due) = self.due
                    && due > now
                    && due <= wanted + SLICE_LATE
                    && (no_deadline || due + SLICE_EARLY >= wanted)
                {
                    return Ok(());
                }
                t
            }
            _ => {
                self.due = None;
                self.timer = None;
                self.timer
                    .insert(crate::kick::ThreadTimer::for_current_thread(
                        slice_signal(),
                        MAX_SLICE,
                    )?)
            }
        };
        timer.arm_after(within)?;
        self.due = Some(wanted);
        Ok(())
    }

    /// The vCPU halts and the VM sleeps until `wake` from now (None: until some other event):
    /// the slice ends [`PARK_MARGIN`] after the wake-up (kept if it already ends at least half
    /// that late), or not at all while the VM sleeps with no wake-up planned.
    pub fn park(&mut self, wake: Option<std::time::Duration>) -> io::Result<()> {
        let Some(timer) = &mut self.timer else {
            return Ok(());
        };
        let now = std::time::Instant::now();
        match wake {
            Some(wake) if timer.is_current_thread() => {
                let wake = now + wake;
                if let Some(due) = self.due
                    && due >= wake + PARK_MARGIN / 2
                {
                    return Ok(());
                }
                timer.arm_after(wake + PARK_MARGIN - now)?;
                self.due = Some(wake + PARK_MARGIN);
            }
            _ => {
                timer.disarm();
                self.due = None;
            }
        }
        Ok(())
    }

    /// Whether no slice end is armed.
    pub fn is_parked(&self) -> bool {
        self.due.is_none()
    }
}

impl Vcpu {
    /// Whether an exit request is pending (set by [`ExitRequester::request`]).
    pub fn exit_requested(&self) -> bool {
        self.mapping.requested().load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codecache::CodeCache;

    /// `mov r11d, [r15+4096]` (the poll) then `jmp` back to it: a unit that never leaves on
    /// its own.
    const SPIN_ON_POLL: [u8; 9] = [0x45, 0x8B, 0x9F, 0x00, 0x10, 0x00, 0x00, 0xEB, 0xF7];

    #[test]
    fn a_time_slice_ends_translated_code_that_never_leaves() {
        let mut cache = CodeCache::new().unwrap();
        let entry = cache.append(&SPIN_ON_POLL).unwrap();
        let mut vcpu = Vcpu::new().unwrap();
        let mut timer = SliceTimer::new().unwrap();
        assert!(timer.is_parked());
        for _ in 0..3 {
            timer
                .end_within(std::time::Duration::from_millis(2))
                .unwrap();
            assert!(!timer.is_parked());
            // SAFETY: the code only reads the poll page until a slice revokes it.
            unsafe { vcpu.enter(entry, 0) };
            assert_eq!(vcpu.context().exit_reason, reason::SIGNAL);
            assert!(vcpu.is_poll_address(vcpu.context().si_addr));
            assert!(vcpu.exit_requested());
            vcpu.clear_exit_request();
        }
        timer.park(None).unwrap();
        assert!(timer.is_parked());
    }

    #[test]
    fn a_slice_that_ends_in_the_monitor_is_reported_there_and_none_while_parked() {
        let slice = std::time::Duration::from_millis(2);
        let mut timer = SliceTimer::new().unwrap();
        let wait_for_slice = || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while std::time::Instant::now() < deadline {
                if take_slice_due() {
                    return true;
                }
                std::thread::sleep(slice);
            }
            false
        };
        timer.end_within(slice).unwrap();
        assert!(wait_for_slice(), "an armed slice timer marks its end");
        // A VM that sleeps with no wake-up planned gets no slice end while it sleeps.
        timer.end_within(slice * 5).unwrap();
        timer.park(None).unwrap();
        assert!(timer.is_parked());
        std::thread::sleep(slice * 10);
        assert!(!take_slice_due(), "a parked slice timer ended a slice");
        // One that sleeps until its next timer event gets the slice end just after it wakes,
        // not while it sleeps.
        timer.end_within(slice * 5).unwrap();
        let wake = slice * 15;
        let parked = std::time::Instant::now();
        timer.park(Some(wake)).unwrap();
        let due = timer
            .due
            .expect("a slice end for the run after the wake-up");
        assert!(due >= parked + wake + PARK_MARGIN / 2);
        assert!(due <= std::time::Instant::now() + wake + PARK_MARGIN);
        std::thread::sleep(wake / 2);
        assert!(!take_slice_due(), "the slice ended while the VM slept");
        // The short run after the wake-up keeps that end, whether or not a timer event is due
        // within the longest slice, and it arrives.
        timer.park(None).unwrap();
        timer.park(Some(slice * 3)).unwrap();
        let due = timer.due.unwrap();
        timer.end_within(MAX_SLICE).unwrap();
        assert_eq!(timer.due, Some(due));
        timer
            .end_within(due.saturating_duration_since(std::time::Instant::now()) + slice)
            .unwrap();
        assert_eq!(timer.due, Some(due));
        assert!(
            wait_for_slice(),
            "the slice end kept after the wake-up arrives"
        );
        // A park that already ends late enough keeps its end.
        timer.end_within(slice * 10).unwrap();
        let due = timer.due.unwrap();
        timer.park(Some(slice)).unwrap();
        assert_eq!(timer.due, Some(due));
        timer.park(None).unwrap();
        take_slice_due();
    }

    #[test]
    fn a_slice_end_nothing_acted_on_comes_again_without_reprogramming() {
        let mut timer = SliceTimer::new().unwrap();
        timer
            .end_within(std::time::Duration::from_millis(1))
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut seen = 0;
        // The monitor "loses" each signal (takes the mark and does nothing, as a signal landing
        // just before the world switch would be lost); the timer still comes back.
        while seen < 3 && std::time::Instant::now() < deadline {
            if take_slice_due() {
                seen += 1;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(seen, 3, "a lost slice end was never repeated");
        timer.park(None).unwrap();
        take_slice_due();
    }

    #[test]
    fn a_slice_end_moves_only_when_the_wanted_moment_does() {
        let mut timer = SliceTimer::new().unwrap();
        timer
            .end_within(std::time::Duration::from_millis(8))
            .unwrap();
        let first = timer.due.unwrap();
        // Later asks for the same moment keep it.
        std::thread::sleep(std::time::Duration::from_millis(1));
        let left = first.saturating_duration_since(std::time::Instant::now());
        timer.end_within(left).unwrap();
        assert_eq!(timer.due, Some(first));
        // A sooner moment reprograms it.
        timer
            .end_within(std::time::Duration::from_micros(500))
            .unwrap();
        assert!(timer.due.unwrap() < first);
        timer.park(None).unwrap();
        take_slice_due();
    }

    /// Hand-assembled 64-bit code: the world switch's contract without the translator.
    fn run(code: &[u8], setup: impl FnOnce(&mut VcpuContext)) -> VcpuContext {
        let mut cache = CodeCache::new().unwrap();
        let entry = cache.append(code).unwrap();
        let mut vcpu = Vcpu::new().unwrap();
        setup(vcpu.context_mut());
        let mem = vec![0u8; 4096];
        // SAFETY: the code below only touches registers, the context and `mem` through GS.
        unsafe { vcpu.enter(entry, mem.as_ptr() as u64) };
        let c = vcpu.context();
        VcpuContext {
            gpr: c.gpr,
            rflags: c.rflags,
            exit_reason: c.exit_reason,
            exit_eip: c.exit_eip,
            signo: c.signo,
            si_addr: c.si_addr,
            fault_rip: c.fault_rip,
            fault_error: c.fault_error,
            retired: c.retired,
            fp_live: c.fp_live,
            fp_saved: c.fp_saved,
            fx: c.fx.clone(),
            ..*c
        }
    }

    /// The host's x87 control word and MXCSR.
    fn host_control() -> (u16, u32) {
        let (mut fcw, mut mxcsr) = (0u16, 0u32);
        // SAFETY: fnstcw and stmxcsr only store to the two locals.
        unsafe {
            std::arch::asm!(
                "fnstcw [{0}]",
                "stmxcsr [{1}]",
                in(reg) &mut fcw,
                in(reg) &mut mxcsr,
            )
        };
        (fcw, mxcsr)
    }

    #[test]
    fn the_guest_fpu_state_is_saved_on_the_way_out_and_the_hosts_restored() {
        use iced_x86::code_asm::*;
        let mut a = CodeAssembler::new(64).unwrap();
        a.fxrstor(ptr(r15 + OFF_FX)).unwrap();
        a.mov(dword_ptr(r15 + OFF_FP_LIVE), 1).unwrap();
        a.fld1().unwrap();
        a.fld1().unwrap();
        a.faddp(st1, st0).unwrap();
        // A host fault (#DE) while the guest's state is in the FPU: the signal path leaves
        // through the exit stub too.
        a.xor(edx, edx).unwrap();
        a.div(edx).unwrap();
        let code = a.assemble(0).unwrap();
        let before = host_control();
        let c = run(&code, |c| {
            // Round toward zero in both units: nothing the host runs with.
            c.fx.0[0..2].copy_from_slice(&0x0F7Fu16.to_le_bytes());
            c.fx.0[24..28].copy_from_slice(&0x7F80u32.to_le_bytes());
        });
        assert_eq!(host_control(), before, "the host's control words come back");
        assert_eq!(c.exit_reason, reason::SIGNAL);
        assert_eq!(c.signo, libc::SIGFPE);
        assert_eq!((c.fp_live, c.fp_saved), (0, 1));
        let fsw = u16::from_le_bytes([c.fx.0[2], c.fx.0[3]]);
        assert_eq!((fsw >> 11) & 7, 7, "one register pushed and kept");
        // ST0 = 2.0 in the 80-bit format: significand 1 << 63, exponent 0x4000.
        assert_eq!(&c.fx.0[32..42], &[0, 0, 0, 0, 0, 0, 0, 0x80, 0x00, 0x40]);
        assert_eq!(u16::from_le_bytes([c.fx.0[0], c.fx.0[1]]), 0x0F7F);
        assert_eq!(
            u32::from_le_bytes(c.fx.0[24..28].try_into().unwrap()),
            0x7F80
        );
    }

    // mov dword [r15+OFF_EXIT_REASON], 3 ; jmp [r15+OFF_EXIT_STUB]
    fn exit_callout() -> Vec<u8> {
        let mut v = vec![0x41, 0xC7, 0x47, OFF_EXIT_REASON as u8, 3, 0, 0, 0];
        v.extend([0x41, 0xFF, 0x67, OFF_EXIT_STUB as u8]);
        v
    }

    #[test]
    fn guest_registers_and_flags_cross_the_switch() {
        // add eax, ecx ; lea r12d, [r12d-4] ; lea r14, [r14+2] ; exit
        let mut code = vec![0x01, 0xC8, 0x67, 0x45, 0x8D, 0x64, 0x24, 0xFC];
        code.extend([0x4D, 0x8D, 0x76, 0x02]);
        code.extend(exit_callout());
        let c = run(&code, |c| {
            c.gpr = [0xFFFF_FFFF, 1, 2, 3, 0x1000, 5, 6, 7];
            c.rflags = 0x400; // DF
        });
        assert_eq!(c.exit_reason, reason::CALLOUT);
        assert_eq!(c.gpr, [0, 1, 2, 3, 0xFFC, 5, 6, 7]);
        assert_eq!(c.rflags & 0x1, 1, "CF from the add");
        assert_eq!(c.rflags & 0x40, 0x40, "ZF from the add");
        assert_eq!(c.rflags & 0x400, 0x400, "DF crossed in and out");
        assert_eq!(c.retired, 2);
    }

    #[test]
    fn a_fault_in_translated_code_becomes_an_exit() {
        // xor edx, edx ; div edx -> #DE as SIGFPE
        let code = [0x31, 0xD2, 0xF7, 0xF2];
        let c = run(&code, |c| c.gpr = [10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(c.exit_reason, reason::SIGNAL);
        assert_eq!(c.signo, libc::SIGFPE);
        assert!(crate::codecache::zone_contains(c.fault_rip));
        assert_eq!(c.gpr[0], 10, "registers as they were at the fault");
    }

    #[test]
    fn a_guest_access_outside_memory_faults_with_its_address() {
        // mov eax, gs:[0x2000] with 32-bit addressing: past the 4 KiB buffer's page, unmapped
        // in the test (the buffer is a heap allocation, so use a far address instead).
        let code = [0x65, 0x67, 0x8B, 0x04, 0x25, 0x00, 0x00, 0x00, 0xF0];
        let c = run(&code, |_| {});
        assert_eq!(c.exit_reason, reason::SIGNAL);
        assert_eq!(c.signo, libc::SIGSEGV);
    }

    #[test]
    fn a_write_fault_says_it_was_a_write() {
        // mov gs:[0xF0000000], eax (32-bit addressing) faults as a write; a read does not.
        let code = [0x65, 0x67, 0x89, 0x04, 0x25, 0x00, 0x00, 0x00, 0xF0];
        let c = run(&code, |_| {});
        assert_eq!(c.signo, libc::SIGSEGV);
        assert_eq!(
            c.fault_error & 2,
            2,
            "the write bit of the host #PF error code"
        );
        let code = [0x65, 0x67, 0x8B, 0x04, 0x25, 0x00, 0x00, 0x00, 0xF0];
        let c = run(&code, |_| {});
        assert_eq!(c.fault_error & 2, 0, "a read");
    }

    #[test]
    fn an_exit_request_faults_the_next_poll() {
        // mov r11d, [r15+4096] ; exit
        let mut code = vec![0x45, 0x8B, 0x9F, 0x00, 0x10, 0x00, 0x00];
        code.extend(exit_callout());
        let mut cache = CodeCache::new().unwrap();
        let entry = cache.append(&code).unwrap();
        let mut vcpu = Vcpu::new().unwrap();
        // SAFETY: the code only reads the poll page and exits.
        unsafe { vcpu.enter(entry, 0) };
        assert_eq!(vcpu.context().exit_reason, reason::CALLOUT);
        vcpu.exit_requester().request();
        assert!(vcpu.exit_requested());
        // SAFETY: as above.
        unsafe { vcpu.enter(entry, 0) };
        assert_eq!(vcpu.context().exit_reason, reason::SIGNAL);
        assert!(vcpu.is_poll_address(vcpu.context().si_addr));
        vcpu.clear_exit_request();
        // SAFETY: as above.
        unsafe { vcpu.enter(entry, 0) };
        assert_eq!(vcpu.context().exit_reason, reason::CALLOUT);
        assert_eq!(sigsys_count(), 0);
    }
}
