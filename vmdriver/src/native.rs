//! Native execution of unprivileged 32-bit snippets: the host CPU as the reference for the
//! interpreter's (and later the translator's) instruction semantics.
//!
//! [`run_native`] runs a snippet of 32-bit code on the host CPU itself, in 32-bit compatibility
//! mode, with the same layout as `vmm::interp::snippet::run`: the code at [`CODE_ADDR`], a data
//! buffer at [`DATA_ADDR`] that memory operands and the stack point into. The sandbox is a child
//! process created with `fork()`, so the fixed low mappings never touch the calling process and
//! several snippets can run at once:
//!
//! 1. The parent assembles the trampolines (iced-x86 `CodeAssembler`, no external assembler), maps
//!    a shared report page and forks.
//! 2. The child maps, with `MAP_FIXED_NOREPLACE`, a helper code page and a helper data page below
//!    the code, the code (followed by an epilogue) and the data buffer; installs a fault handler on
//!    an alternate stack; and calls the 64-bit entry stub.
//! 3. The entry stub saves the callee-saved registers and RSP, then far-returns to the host's
//!    32-bit user code segment ([`USER32_CS`], 0x23 on x86-64 Linux). The 32-bit trampoline loads
//!    the data segments, EFLAGS and the eight general registers and jumps to the snippet.
//! 4. The epilogue right after the snippet first stores ESP to a fixed address (it never relies
//!    on the snippet's stack), switches to its own stack, stores EFLAGS (PUSHFD) and the other
//!    registers and far-jumps back to 64-bit mode ([`USER64_CS`], 0x33), where the return stub
//!    restores RSP and returns into the child's Rust code. The child copies the registers and the
//!    data buffer into the report page and exits.
//! 5. A fault in the snippet arrives as a signal, delivered by the kernel in 64-bit mode on the
//!    alternate stack. The handler copies the registers from the signal's `ucontext`, the signal
//!    and the data buffer into the report page and exits (see [`NativeFault`] for how signals map
//!    to exception vectors).
//! 6. The parent waits at most [`TIMEOUT`] for the child; a child still running then is killed and
//!    the snippet reported as [`NativeEnd::Runaway`].
//!
//! The snippet runs at CPL 3 with flat user segments, so only unprivileged instructions mean the
//! same thing as on a guest's CPU; that is all this oracle is for.

use std::io;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use iced_x86::IcedError;

pub use crate::fpu::FxImage;

/// Where the snippet's code is placed (the same address as the interpreter's snippet runner).
pub const CODE_ADDR: u32 = 0x0010_0000;
/// Where the data buffer is placed (the same address as the interpreter's snippet runner).
pub const DATA_ADDR: u32 = 0x0020_0000;
/// The largest data buffer.
pub const DATA_MAX: usize = 0x10_0000;
/// How much CPU time a snippet may use before it is killed and reported as
/// [`NativeEnd::Runaway`] (a completing snippet needs microseconds). CPU time, not wall time, so
/// a loaded host does not turn slow scheduling into false runaways.
pub const CPU_LIMIT: Duration = Duration::from_millis(500);
/// The wall-clock safety net behind [`CPU_LIMIT`]: a child that neither ends nor uses its CPU
/// time within this long (e.g. stopped) is killed and reported as runaway too.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// The host's 32-bit user code segment selector (`__USER32_CS` on x86-64 Linux).
pub const USER32_CS: u16 = 0x23;
/// The host's user data segment selector (`__USER_DS` on x86-64 Linux).
pub const USER_DS: u16 = 0x2B;
/// The host's 64-bit user code segment selector (`__USER_CS` on x86-64 Linux).
pub const USER64_CS: u16 = 0x33;

/// The EFLAGS bits a snippet's initial state may set: the arithmetic flags and DF. The rest are
/// the host's (IF = 1, bit 1 = 1): TF would trap, AC would make misaligned accesses fault (Linux
/// sets CR0.AM), and IOPL, IF, NT, RF, VM cannot be set from user mode.
pub const USER_FLAGS: u32 = 0x0CD5;
/// EFLAGS bits that are always set in user mode: bit 1 (reserved, reads as 1) and IF.
const FIXED_USER_FLAGS: u32 = 0x0202;

const PAGE: usize = 4096;
/// The helper code page: the 64-bit entry stub, the 32-bit trampoline, the 64-bit return stub.
const HELPER_CODE: u32 = 0x000E_0000;
/// Offsets of the three pieces in the helper code page.
const ENTRY64: u32 = HELPER_CODE;
const TRAMPOLINE32: u32 = HELPER_CODE + 0x100;
const RETURN64: u32 = HELPER_CODE + 0x200;
const PIECE_MAX: usize = 0x100;
/// The helper data page: the initial state, the final state, the saved host RSP, a small stack.
const HELPER_DATA: u32 = 0x000E_1000;
const IN_GPR: u32 = HELPER_DATA;
const IN_EFLAGS: u32 = HELPER_DATA + 0x20;
const OUT_GPR: u32 = HELPER_DATA + 0x40;
const OUT_EFLAGS: u32 = HELPER_DATA + 0x60;
const SAVED_RSP: u32 = HELPER_DATA + 0x80;
/// The initial and final x87/SSE state (FXSAVE images, 16-byte aligned).
const IN_FX: u32 = HELPER_DATA + 0x200;
const OUT_FX: u32 = HELPER_DATA + 0x400;
const STACK32_TOP: u32 = HELPER_DATA + PAGE as u32;
/// Size of the child's alternate signal stack (room for a full XSAVE frame).
const ALT_STACK: usize = 256 * 1024;

/// How a native run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativeEnd {
    /// It ran to its end.
    Completed,
    /// It raised this exception vector; the state is the one the kernel saved at the fault.
    Exception(u8),
    /// It was still running after [`TIMEOUT`] and was killed.
    Runaway,
}

/// The signal a snippet's fault arrived as, with what the kernel said about it.
///
/// The exception vector is the kernel's record of the hardware trap (`REG_TRAPNO` of the signal's
/// `ucontext`, `thread.trap_nr` in the kernel). When that is missing or does not fit the signal,
/// the vector follows from the signal alone:
///
/// | signal | exception |
/// |---|---|
/// | SIGFPE | #DE (0), divide error |
/// | SIGILL | #UD (6), invalid opcode |
/// | SIGSEGV, `si_code` SEGV_MAPERR or SEGV_ACCERR (an address) | #PF (14) |
/// | SIGSEGV, `si_code` SI_KERNEL | #GP (13); the kernel also uses it for #OF (INTO, trapno 4) and #BR (BOUND, trapno 5), which the trap number tells apart |
/// | SIGTRAP, `si_code` TRAP_BRKPT or SI_KERNEL | #BP (3), INT3 (a trap: EIP is after the INT3) |
/// | SIGTRAP otherwise | #DB (1) |
/// | SIGBUS | #AC (17); #NP (11) and #SS (12) by their trap number |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NativeFault {
    /// The signal number.
    pub signal: i32,
    /// `si_code` of the signal.
    pub si_code: i32,
    /// The kernel's trap number (`REG_TRAPNO`).
    pub trapno: u64,
    /// The exception's error code as the kernel saved it (`REG_ERR`).
    pub error_code: u64,
    /// `si_addr`: the faulting address for #PF, the instruction for most others.
    pub address: u64,
}

/// The machine state after a native run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeResult {
    /// EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI (the initial ones after a runaway).
    pub gpr: [u32; 8],
    /// EFLAGS (as the snippet left it, or at the fault).
    pub eflags: u32,
    /// The data buffer's final contents (the initial ones after a runaway).
    pub data: Vec<u8>,
    /// How the run ended.
    pub end: NativeEnd,
    /// EIP at the end: the end of the code, where the kernel reported the fault, or 0 after a
    /// runaway.
    pub eip: u32,
    /// The signal behind an [`NativeEnd::Exception`].
    pub fault: Option<NativeFault>,
    /// The x87/MMX/SSE state at the end (the initial one after a runaway). FXSAVE's 32-bit
    /// format when the snippet completed; after a fault it comes from the kernel's signal frame,
    /// which is in the 64-bit format: FIP and FDP are 64-bit there, so FCS and FDS read as 0.
    pub fx: FxImage,
}

/// Why a snippet could not be run natively.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    /// The host cannot run 32-bit code in a 64-bit process.
    #[error(
        "this host has no 32-bit compatibility mode: the far return to the 32-bit user code \
         segment {USER32_CS:#x} faulted (signal {signal}); the kernel was built without \
         CONFIG_IA32_EMULATION or booted with ia32_emulation=0"
    )]
    NoCompatMode {
        /// The signal the switch raised.
        signal: i32,
    },
    /// The snippet does not fit below the data buffer.
    #[error("the snippet's code is {len} bytes; at most {max} fit below the data buffer")]
    CodeTooLarge {
        /// The code's length.
        len: usize,
        /// The largest length that fits.
        max: usize,
    },
    /// The data buffer is too large.
    #[error("the data buffer is {len} bytes; at most {DATA_MAX} are supported")]
    DataTooLarge {
        /// The buffer's length.
        len: usize,
    },
    /// Building the trampolines failed (a bug in this module).
    #[error("assembling the sandbox trampolines failed: {0}")]
    Assemble(#[from] IcedError),
    /// A trampoline piece outgrew its slot in the helper page (a bug in this module).
    #[error("the sandbox trampoline at {addr:#x} is longer than its slot")]
    PieceTooLong {
        /// Where the piece goes.
        addr: u32,
    },
    /// A host call in the parent failed.
    #[error("the host refused {what}: {source}")]
    Host {
        /// Which call.
        what: &'static str,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// The child could not map part of the sandbox at its fixed address.
    #[error(
        "the sandbox could not map {what} at {addr:#x}: {source} (is the host's mmap_min_addr \
         above it, or is the address taken?)"
    )]
    Map {
        /// Which part.
        what: &'static str,
        /// Its address.
        addr: u32,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// The child could not set up its fault handling or its system-call filter.
    #[error("the sandbox could not install its fault handling ({what}): {source}")]
    SignalSetup {
        /// Which call.
        what: &'static str,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// The sandbox itself (not the snippet) faulted, e.g. the snippet broke a segment register.
    #[error("the sandbox faulted outside the snippet: signal {signal} at {cs:#x}:{rip:#x}")]
    HarnessFault {
        /// The signal.
        signal: i32,
        /// CS at the fault.
        cs: u16,
        /// RIP at the fault.
        rip: u64,
    },
    /// The snippet made a system call (`int 0x80`, `syscall`, `sysenter`); the sandbox allows
    /// none, so the child was killed.
    #[error("the snippet made a system call, which the sandbox forbids (the child was killed)")]
    SystemCall,
    /// The child ended without a report.
    #[error("the sandbox child died unexpectedly: {0}")]
    ChildDied(String),
}

// ---- what the child reports ------------------------------------------------------------------

/// Nothing reported: the child died before it could say anything.
const STATE_NONE: u32 = 0;
/// A setup step failed; `stage` and `errno` say which and why.
const STATE_SETUP_FAILED: u32 = 1;
/// The snippet ran to its end.
const STATE_COMPLETED: u32 = 2;
/// A signal arrived.
const STATE_SIGNAL: u32 = 3;

/// Setup stages, for [`STATE_SETUP_FAILED`].
const STAGE_HELPER_CODE: u32 = 1;
const STAGE_HELPER_DATA: u32 = 2;
const STAGE_CODE: u32 = 3;
const STAGE_DATA: u32 = 4;
const STAGE_ALT_STACK: u32 = 5;
const STAGE_SIGALTSTACK: u32 = 6;
const STAGE_SIGACTION: u32 = 7;
const STAGE_SIGMASK: u32 = 8;
const STAGE_SECCOMP: u32 = 9;
const STAGE_CPU_LIMIT: u32 = 10;

/// The report page's header, written by the child, read by the parent after the child exits.
/// The data buffer's final contents follow it at [`REPORT_DATA`].
#[repr(C)]
#[derive(Clone, Copy)]
struct Report {
    state: u32,
    stage: u32,
    errno: i32,
    signal: i32,
    si_code: i32,
    cs: u32,
    trapno: u64,
    error_code: u64,
    address: u64,
    rip: u64,
    gpr: [u32; 8],
    eflags: u32,
    fx: [u8; 512],
}

/// Offset of the data buffer's copy in the report mapping.
const REPORT_DATA: usize = PAGE;

/// The report mapping and data length, for the child's signal handler (set in the child only).
static REPORT: AtomicPtr<Report> = AtomicPtr::new(ptr::null_mut());
static DATA_LEN: AtomicUsize = AtomicUsize::new(0);

/// Everything the child needs, prepared by the parent before `fork()` (the child must not
/// allocate: another thread of the parent may have held the allocator's lock at the fork).
struct Plan<'a> {
    helper: &'a [u8],
    image: &'a [u8],
    data: &'a [u8],
    gpr: [u32; 8],
    eflags: u32,
    fx: &'a FxImage,
    report: *mut Report,
}

/// Runs `code` natively in 32-bit compatibility mode with general registers `gpr` (EAX, ECX, EDX,
/// EBX, ESP, EBP, ESI, EDI), the [`USER_FLAGS`] bits of `eflags` and the x87/SSE state `fx`
/// (loaded with FXRSTOR: its MXCSR must be valid for the host), over a data buffer initialised to
/// `data` at [`DATA_ADDR`].
///
/// The code is placed at [`CODE_ADDR`]; it ends by running off its end (into the epilogue). ESP is
/// `gpr[4]`, so a snippet that uses the stack points it into the data buffer. The snippet must
/// not change the segment registers.
pub fn run_native(
    code: &[u8],
    gpr: [u32; 8],
    eflags: u32,
    fx: &FxImage,
    data: &[u8],
) -> Result<NativeResult, NativeError> {
    run_in(code, gpr, eflags, fx, data, USER32_CS)
}

/// [`run_native`] with the 32-bit code segment selector to switch to (tests use a selector that
/// is no code segment to see the host-without-compat-mode path).
fn run_in(
    code: &[u8],
    gpr: [u32; 8],
    eflags: u32,
    fx: &FxImage,
    data: &[u8],
    compat_cs: u16,
) -> Result<NativeResult, NativeError> {
    if data.len() > DATA_MAX {
        return Err(NativeError::DataTooLarge { len: data.len() });
    }
    let code_room = (DATA_ADDR - CODE_ADDR) as usize;
    let end = CODE_ADDR
        + u32::try_from(code.len()).map_err(|_| NativeError::CodeTooLarge {
            len: code.len(),
            max: code_room,
        })?;
    let epilogue = stubs::epilogue(u64::from(end))?;
    if code.len() + epilogue.len() > code_room {
        return Err(NativeError::CodeTooLarge {
            len: code.len(),
            max: code_room - epilogue.len(),
        });
    }
    let mut image = Vec::with_capacity(code.len() + epilogue.len());
    image.extend_from_slice(code);
    image.extend_from_slice(&epilogue);
    let helper = helper_code(compat_cs)?;

    let report_len = REPORT_DATA + data.len().div_ceil(PAGE).max(1) * PAGE;
    let report = SharedMap::new(report_len)?;
    let plan = Plan {
        helper: &helper,
        image: &image,
        data,
        gpr,
        eflags: (eflags & USER_FLAGS) | FIXED_USER_FLAGS,
        fx,
        report: report.ptr.cast(),
    };

    // SAFETY: fork has no memory-safety preconditions. The child runs only `child_main`, which
    // makes system calls and copies bytes between buffers prepared before the fork (it never
    // allocates or takes a lock another thread may have held), and it ends with `_exit`, never
    // returning into the parent's code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(host("fork", io::Error::last_os_error()));
    }
    if pid == 0 {
        child_main(&plan);
    }
    let status = wait_child(pid)?;

    // SAFETY: the child has exited (waited for above), so nothing writes the report mapping any
    // more; it is at least one page long and page-aligned, so a `Report` at its start is in
    // bounds and aligned.
    let r: Report = unsafe { ptr::read_volatile(plan.report) };
    let Some(status) = status else {
        return Ok(NativeResult {
            gpr,
            eflags: plan.eflags,
            data: data.to_vec(),
            end: NativeEnd::Runaway,
            eip: 0,
            fault: None,
            fx: fx.clone(),
        });
    };
    // SAFETY: the mapping holds REPORT_DATA + data.len() bytes (rounded up to pages) and nothing
    // writes it any more; the slice lives only while `report` is alive.
    let final_data =
        unsafe { std::slice::from_raw_parts(report.ptr.add(REPORT_DATA), data.len()) }.to_vec();
    match r.state {
        STATE_COMPLETED => Ok(NativeResult {
            gpr: r.gpr,
            eflags: r.eflags,
            data: final_data,
            end: NativeEnd::Completed,
            eip: end,
            fault: None,
            fx: FxImage(r.fx),
        }),
        STATE_SIGNAL => {
            let cs = r.cs as u16;
            let in_helper = (u64::from(HELPER_CODE)..u64::from(HELPER_CODE) + PAGE as u64)
                .contains(&r.rip)
                || (u64::from(end) + 1..u64::from(end) + epilogue.len() as u64).contains(&r.rip);
            if cs == USER64_CS && (u64::from(ENTRY64)..u64::from(TRAMPOLINE32)).contains(&r.rip) {
                return Err(NativeError::NoCompatMode { signal: r.signal });
            }
            if cs != compat_cs || in_helper {
                return Err(NativeError::HarnessFault {
                    signal: r.signal,
                    cs,
                    rip: r.rip,
                });
            }
            let fault = NativeFault {
                signal: r.signal,
                si_code: r.si_code,
                trapno: r.trapno,
                error_code: r.error_code,
                address: r.address,
            };
            Ok(NativeResult {
                gpr: r.gpr,
                eflags: r.eflags,
                data: final_data,
                end: NativeEnd::Exception(fault.vector()),
                eip: r.rip as u32,
                fault: Some(fault),
                fx: FxImage(r.fx),
            })
        }
        STATE_SETUP_FAILED => Err(setup_error(r.stage, r.errno)),
        STATE_NONE if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGVTALRM => {
            Ok(NativeResult {
                gpr,
                eflags: plan.eflags,
                data: data.to_vec(),
                end: NativeEnd::Runaway,
                eip: 0,
                fault: None,
                fx: fx.clone(),
            })
        }
        STATE_NONE if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS => {
            Err(NativeError::SystemCall)
        }
        STATE_NONE => Err(NativeError::ChildDied(describe_status(status))),
        other => Err(NativeError::ChildDied(format!(
            "it left an unknown report state {other}; {}",
            describe_status(status)
        ))),
    }
}

impl NativeFault {
    /// The exception vector this fault stands for (see the table on [`NativeFault`]).
    pub fn vector(&self) -> u8 {
        use libc::{SIGBUS, SIGFPE, SIGILL, SIGSEGV, SIGTRAP};
        let t = self.trapno;
        // Which trap numbers each signal can come from (arch/x86/kernel/traps.c, fault.c).
        let fits = match self.signal {
            SIGFPE => matches!(t, 0 | 16 | 19),
            SIGILL => t == 6,
            SIGSEGV => matches!(t, 4 | 5 | 13 | 14),
            SIGTRAP => matches!(t, 1 | 3),
            SIGBUS => matches!(t, 11 | 12 | 17),
            _ => false,
        };
        if fits {
            return t as u8;
        }
        match self.signal {
            SIGFPE => 0,
            SIGILL => 6,
            SIGSEGV if matches!(self.si_code, SEGV_MAPERR | SEGV_ACCERR) => 14,
            SIGSEGV => 13,
            SIGTRAP if matches!(self.si_code, TRAP_BRKPT | SI_KERNEL) => 3,
            SIGTRAP => 1,
            SIGBUS => 17,
            _ => 13,
        }
    }
}

/// `si_code` values (include/uapi/asm-generic/siginfo.h).
const SI_KERNEL: i32 = 0x80;
const SEGV_MAPERR: i32 = 1;
const SEGV_ACCERR: i32 = 2;
const TRAP_BRKPT: i32 = 1;

fn host(what: &'static str, source: io::Error) -> NativeError {
    NativeError::Host { what, source }
}

fn setup_error(stage: u32, errno: i32) -> NativeError {
    let source = io::Error::from_raw_os_error(errno);
    let map = |what, addr| NativeError::Map { what, addr, source };
    let signal = |what| NativeError::SignalSetup {
        what,
        source: io::Error::from_raw_os_error(errno),
    };
    match stage {
        STAGE_HELPER_CODE => map("the helper code page", HELPER_CODE),
        STAGE_HELPER_DATA => map("the helper data page", HELPER_DATA),
        STAGE_CODE => map("the snippet's code", CODE_ADDR),
        STAGE_DATA => map("the data buffer", DATA_ADDR),
        STAGE_ALT_STACK => signal("mmap of the alternate signal stack"),
        STAGE_SIGALTSTACK => signal("sigaltstack"),
        STAGE_SIGACTION => signal("sigaction"),
        STAGE_SIGMASK => signal("sigprocmask"),
        STAGE_SECCOMP => signal("the seccomp filter that forbids system calls"),
        STAGE_CPU_LIMIT => signal("setitimer for the snippet's CPU-time limit"),
        other => NativeError::ChildDied(format!("it reported an unknown setup stage {other}")),
    }
}

fn describe_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!(
            "it exited with status {} and no report",
            libc::WEXITSTATUS(status)
        )
    } else if libc::WIFSIGNALED(status) {
        format!("it was killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status:#x}")
    }
}

// ---- the parent's side -----------------------------------------------------------------------

/// An anonymous shared mapping, unmapped on drop.
struct SharedMap {
    ptr: *mut u8,
    len: usize,
}

impl SharedMap {
    fn new(len: usize) -> Result<Self, NativeError> {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks; it aliases no Rust
        // object.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(host("mmap of the report page", io::Error::last_os_error()));
        }
        Ok(Self { ptr: p.cast(), len })
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping this struct created and nothing else refers to.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Waits for the child for at most [`TIMEOUT`]. Returns its wait status, or None if it had to be
/// killed.
fn wait_child(pid: libc::pid_t) -> Result<Option<libc::c_int>, NativeError> {
    let deadline = Instant::now() + TIMEOUT;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    let mut exited = false;
    if pidfd >= 0 {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: pidfd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
            // SAFETY: `pfd` is a valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n > 0 {
                exited = true;
                break;
            }
            if n == 0 || Instant::now() >= deadline {
                break;
            }
            // n < 0: EINTR; poll again for the time left.
        }
        // SAFETY: `pidfd` is a descriptor this function opened and nothing else uses.
        unsafe { libc::close(pidfd) };
    } else {
        // No pidfd (Linux before 5.3): poll the child's state.
        while Instant::now() < deadline {
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid status pointer.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid {
                return Ok(Some(status));
            }
            if r < 0 {
                return Err(host("waitpid", io::Error::last_os_error()));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    if !exited {
        // SAFETY: `pid` is our own child, not yet reaped, so the pid cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(host("waitpid", err));
        }
    }
    Ok(exited.then_some(status))
}

// ---- the code the sandbox runs ---------------------------------------------------------------

/// The helper code page: the 64-bit entry stub at [`ENTRY64`], the 32-bit trampoline at
/// [`TRAMPOLINE32`] and the 64-bit return stub at [`RETURN64`].
fn helper_code(compat_cs: u16) -> Result<Vec<u8>, NativeError> {
    let mut page = vec![0xCC; PAGE]; // INT3 between the pieces
    let pieces = [
        (ENTRY64, stubs::entry64(compat_cs)?),
        (TRAMPOLINE32, stubs::trampoline32()?),
        (RETURN64, stubs::return64()?),
    ];
    for (addr, bytes) in pieces {
        if bytes.len() > PIECE_MAX {
            return Err(NativeError::PieceTooLong { addr });
        }
        let off = (addr - HELPER_CODE) as usize;
        page[off..off + bytes.len()].copy_from_slice(&bytes);
    }
    Ok(page)
}

/// The four pieces of sandbox code, assembled with iced-x86.
mod stubs {
    use iced_x86::code_asm::*;
    use iced_x86::{Code, IcedError, Instruction};

    use super::*;

    /// 64-bit, called as `extern "C" fn()`: saves the callee-saved registers and RSP, then far-returns
    /// to the 32-bit trampoline.
    pub(super) fn entry64(compat_cs: u16) -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        for r in [rbx, rbp, r12, r13, r14, r15] {
            a.push(r)?;
        }
        a.mov(rax, u64::from(SAVED_RSP))?;
        a.mov(qword_ptr(rax), rsp)?;
        a.push(i32::from(compat_cs))?;
        a.push(TRAMPOLINE32 as i32)?;
        a.retf()?; // RETFQ: pops RIP, then CS
        a.assemble(u64::from(ENTRY64))
    }

    /// 32-bit: loads the data segments, EFLAGS and the snippet's registers, then jumps to it.
    pub(super) fn trampoline32() -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(32)?;
        a.mov(eax, u32::from(USER_DS))?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.mov(esp, STACK32_TOP)?;
        a.fxrstor(ptr(IN_FX))?;
        a.push(dword_ptr(IN_EFLAGS))?;
        a.popfd()?;
        // MOV leaves the flags alone; ESP last, as it may point anywhere.
        for (i, r) in [eax, ecx, edx, ebx, ebp, esi, edi]
            .into_iter()
            .zip([0u32, 1, 2, 3, 5, 6, 7])
            .map(|(r, i)| (i, r))
        {
            a.mov(r, dword_ptr(IN_GPR + 4 * i))?;
        }
        a.mov(esp, dword_ptr(IN_GPR + 16))?;
        a.jmp(u64::from(CODE_ADDR))?;
        a.assemble(u64::from(TRAMPOLINE32))
    }

    /// 32-bit, placed right after the snippet at `at`: saves ESP first (without using the stack), then
    /// EFLAGS on its own stack and the other registers, and far-jumps back to 64-bit mode.
    pub(super) fn epilogue(at: u64) -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(32)?;
        a.mov(dword_ptr(OUT_GPR + 16), esp)?;
        a.fxsave(ptr(OUT_FX))?;
        a.mov(esp, STACK32_TOP)?;
        a.pushfd()?;
        a.pop(dword_ptr(OUT_EFLAGS))?;
        for (i, r) in [
            (0u32, eax),
            (1, ecx),
            (2, edx),
            (3, ebx),
            (5, ebp),
            (6, esi),
            (7, edi),
        ] {
            a.mov(dword_ptr(OUT_GPR + 4 * i), r)?;
        }
        a.add_instruction(Instruction::with_far_branch(
            Code::Jmp_ptr1632,
            USER64_CS,
            RETURN64,
        )?)?;
        a.assemble(at)
    }

    /// 64-bit: restores RSP and the callee-saved registers and returns to the entry stub's caller.
    pub(super) fn return64() -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        a.mov(rax, u64::from(SAVED_RSP))?;
        a.mov(rsp, qword_ptr(rax))?;
        for r in [r15, r14, r13, r12, rbp, rbx] {
            a.pop(r)?;
        }
        a.cld()?; // the C ABI wants DF = 0 at a return
        a.ret()?;
        a.assemble(u64::from(RETURN64))
    }
}

// ---- the child's side ------------------------------------------------------------------------

/// The child: builds the sandbox, runs the snippet and reports. Never returns.
fn child_main(plan: &Plan) -> ! {
    let report = plan.report;
    let fail = |stage: u32| -> ! {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        // SAFETY: `report` points at the start of the shared report mapping, which the parent
        // created before the fork and keeps mapped until the child has exited; `_exit` ends the
        // child without running any of the parent's cleanup.
        unsafe {
            (*report).state = STATE_SETUP_FAILED;
            (*report).stage = stage;
            (*report).errno = errno;
            libc::_exit(3)
        }
    };
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let rx = libc::PROT_READ | libc::PROT_EXEC;
    let pages = |len: usize| len.div_ceil(PAGE).max(1) * PAGE;

    if !map_fixed(HELPER_CODE, PAGE, rw) {
        fail(STAGE_HELPER_CODE);
    }
    // SAFETY: the helper page is mapped writable and `plan.helper` is exactly one page long.
    unsafe { copy_to(HELPER_CODE, plan.helper) };
    if !protect(HELPER_CODE, PAGE, rx) {
        fail(STAGE_HELPER_CODE);
    }
    if !map_fixed(HELPER_DATA, PAGE, rw) {
        fail(STAGE_HELPER_DATA);
    }
    let mut state = [0u8; 36];
    for (i, g) in plan.gpr.iter().enumerate() {
        state[4 * i..4 * i + 4].copy_from_slice(&g.to_le_bytes());
    }
    state[32..36].copy_from_slice(&plan.eflags.to_le_bytes());
    // SAFETY: the helper data page is mapped writable; IN_GPR..IN_EFLAGS+4 and
    // IN_FX..IN_FX+512 are inside it.
    unsafe {
        copy_to(IN_GPR, &state);
        copy_to(IN_FX, &plan.fx.0);
    }
    let code_len = pages(plan.image.len());
    if !map_fixed(CODE_ADDR, code_len, rw) {
        fail(STAGE_CODE);
    }
    // SAFETY: the code mapping is writable and at least `plan.image.len()` bytes long.
    unsafe { copy_to(CODE_ADDR, plan.image) };
    if !protect(CODE_ADDR, code_len, rx) {
        fail(STAGE_CODE);
    }
    if !plan.data.is_empty() {
        if !map_fixed(DATA_ADDR, pages(plan.data.len()), rw) {
            fail(STAGE_DATA);
        }
        // SAFETY: the data mapping is writable and at least `plan.data.len()` bytes long.
        unsafe { copy_to(DATA_ADDR, plan.data) };
    }

    REPORT.store(report, Ordering::Relaxed);
    DATA_LEN.store(plan.data.len(), Ordering::Relaxed);
    install_handlers().unwrap_or_else(|stage| fail(stage));
    arm_cpu_limit().unwrap_or_else(|stage| fail(stage));
    forbid_system_calls().unwrap_or_else(|stage| fail(stage));

    // SAFETY: ENTRY64 holds the entry stub assembled by `entry64`, mapped executable above. It
    // follows the C ABI as seen from here: it saves RBX, RBP, R12-R15 and RSP, and the return stub
    // restores exactly those, clears DF and returns to this call's return address with the stack
    // as it was. Every other register is caller-saved. Memory the snippet can write (the code and
    // data pages, the helper data page) belongs to no Rust object; a fault ends the child in the
    // signal handler instead of returning here.
    unsafe {
        let entry: extern "C" fn() =
            std::mem::transmute::<usize, extern "C" fn()>(ENTRY64 as usize);
        entry();
    }

    let mut out = [0u8; 36];
    // SAFETY: the helper data page is mapped readable; OUT_GPR..OUT_EFLAGS+4 is inside it.
    unsafe { ptr::copy_nonoverlapping(OUT_GPR as usize as *const u8, out.as_mut_ptr(), 36) };
    let word =
        |i: usize| u32::from_le_bytes([out[4 * i], out[4 * i + 1], out[4 * i + 2], out[4 * i + 3]]);
    // SAFETY: `report` points into the shared report mapping (see `fail`); the data mapping at
    // DATA_ADDR holds `plan.data.len()` bytes and the report's data area has room for them; the
    // helper data page (OUT_FX..OUT_FX+512 inside it) is mapped readable.
    unsafe {
        for i in 0..8 {
            (*report).gpr[i] = word(i);
        }
        (*report).eflags = word(8);
        ptr::copy_nonoverlapping(OUT_FX as usize as *const u8, (*report).fx.as_mut_ptr(), 512);
        copy_data_out(report);
        (*report).state = STATE_COMPLETED;
        libc::_exit(0)
    }
}

/// Arms a one-shot ITIMER_VIRTUAL of [`CPU_LIMIT`]: its SIGVTALRM (default action: terminate,
/// no handler is installed for it) ends a snippet that loops.
fn arm_cpu_limit() -> Result<(), u32> {
    let t = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        it_value: libc::timeval {
            tv_sec: CPU_LIMIT.as_secs() as libc::time_t,
            tv_usec: CPU_LIMIT.subsec_micros() as libc::suseconds_t,
        },
    };
    // The parent may have ignored or blocked SIGVTALRM; the child wants it fatal.
    // SAFETY: SIG_DFL is a valid disposition for SIGVTALRM; a null old-action pointer is allowed.
    if unsafe { libc::signal(libc::SIGVTALRM, libc::SIG_DFL) } == libc::SIG_ERR {
        return Err(STAGE_CPU_LIMIT);
    }
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGVTALRM);
    }
    // SAFETY: unblocks SIGVTALRM for the child's only thread; `set` is valid.
    if unsafe { libc::sigprocmask(libc::SIG_UNBLOCK, &set, ptr::null_mut()) } != 0 {
        return Err(STAGE_CPU_LIMIT);
    }
    // SAFETY: setitimer reads the valid itimerval above; a null old-value pointer is allowed.
    if unsafe { libc::setitimer(libc::ITIMER_VIRTUAL, &t, ptr::null_mut()) } != 0 {
        return Err(STAGE_CPU_LIMIT);
    }
    Ok(())
}

/// Maps `len` bytes of fresh anonymous memory at `addr` (never replacing a mapping).
fn map_fixed(addr: u32, len: usize, prot: libc::c_int) -> bool {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so this cannot invalidate any
    // object; the result is checked (kernels before 4.17 treat the address as a hint only).
    let p = unsafe {
        libc::mmap(
            addr as usize as *mut libc::c_void,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    p as usize == addr as usize
}

fn protect(addr: u32, len: usize, prot: libc::c_int) -> bool {
    // SAFETY: changes the protection of a mapping `map_fixed` created; no Rust object lives there.
    unsafe { libc::mprotect(addr as usize as *mut libc::c_void, len, prot) == 0 }
}

/// Copies `bytes` to the fixed address `addr`.
///
/// # Safety
/// `addr..addr + bytes.len()` must be mapped writable and hold no Rust object.
unsafe fn copy_to(addr: u32, bytes: &[u8]) {
    // SAFETY: guaranteed by the caller.
    unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), addr as usize as *mut u8, bytes.len()) };
}

/// Copies the data buffer into the report mapping.
///
/// # Safety
/// `report` must point at the report mapping, and the data buffer ([`DATA_LEN`] bytes at
/// [`DATA_ADDR`]) must be mapped.
unsafe fn copy_data_out(report: *mut Report) {
    let len = DATA_LEN.load(Ordering::Relaxed);
    if len > 0 {
        // SAFETY: guaranteed by the caller; the report mapping has REPORT_DATA + len bytes.
        unsafe {
            ptr::copy_nonoverlapping(
                DATA_ADDR as usize as *const u8,
                report.cast::<u8>().add(REPORT_DATA),
                len,
            )
        };
    }
}

/// From here on, allows the child no system call but `exit` and `exit_group` (a seccomp filter):
/// a snippet reaching `int 0x80`, `syscall` or `sysenter` gets the child killed (SIGSYS) instead
/// of acting on the host. Returns the failing stage on error.
fn forbid_system_calls() -> Result<(), u32> {
    /// `AUDIT_ARCH_X86_64` (include/uapi/linux/audit.h): the 64-bit system call ABI. The 32-bit
    /// one (`int 0x80` from compatibility mode) has another value and is refused with the rest.
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    // Offsets in `struct seccomp_data`: nr at 0, arch at 4. Jumps count from the next statement.
    let mut filter = [
        stmt(load, 4),
        jeq(AUDIT_ARCH_X86_64, 0, 3), // another ABI: kill
        stmt(load, 0),
        jeq(libc::SYS_exit as u32, 2, 0),
        jeq(libc::SYS_exit_group as u32, 1, 0),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers; it only restricts this process.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(STAGE_SECCOMP);
    }
    // SAFETY: `prog` points at `filter`, both alive for the call (the kernel copies the filter);
    // the filter only restricts this process.
    if unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &prog as *const libc::sock_fprog,
        )
    } != 0
    {
        return Err(STAGE_SECCOMP);
    }
    Ok(())
}

/// Installs [`on_fault`] for the signals a snippet can raise, on an alternate stack, with those
/// signals unblocked. Returns the failing stage on error.
fn install_handlers() -> Result<(), u32> {
    // SAFETY: a fresh anonymous mapping at an address the kernel picks.
    let stack = unsafe {
        libc::mmap(
            ptr::null_mut(),
            ALT_STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(STAGE_ALT_STACK);
    }
    let alt = libc::stack_t {
        ss_sp: stack,
        ss_flags: 0,
        ss_size: ALT_STACK,
    };
    // SAFETY: `ss` describes the mapping just created, which stays mapped until the child exits.
    if unsafe { libc::sigaltstack(&alt, ptr::null_mut()) } != 0 {
        return Err(STAGE_SIGALTSTACK);
    }
    let signals = [
        libc::SIGSEGV,
        libc::SIGILL,
        libc::SIGFPE,
        libc::SIGBUS,
        libc::SIGTRAP,
    ];
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in signals {
        // SAFETY: as above.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    // SAFETY: sigaction is plain data; every field that matters is set below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_fault as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    sa.sa_mask = set;
    for s in signals {
        // SAFETY: `sa` is fully initialised and `on_fault` has the SA_SIGINFO signature.
        if unsafe { libc::sigaction(s, &sa, ptr::null_mut()) } != 0 {
            return Err(STAGE_SIGACTION);
        }
    }
    // SAFETY: unblocks the signals for the child's only thread; `set` is valid.
    if unsafe { libc::sigprocmask(libc::SIG_UNBLOCK, &set, ptr::null_mut()) } != 0 {
        return Err(STAGE_SIGMASK);
    }
    Ok(())
}

/// The child's fault handler: records the signal and the registers at the fault, copies the data
/// buffer out and ends the child. Only async-signal-safe work: stores and `_exit`.
extern "C" fn on_fault(signal: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let report = REPORT.load(Ordering::Relaxed);
    if report.is_null() || info.is_null() || ctx.is_null() {
        // SAFETY: `_exit` is async-signal-safe and ends the child.
        unsafe { libc::_exit(4) };
    }
    // SAFETY: the kernel passes valid siginfo and ucontext pointers to an SA_SIGINFO handler;
    // `report` was set by `child_main` to the shared report mapping before the handlers were
    // installed, and the data buffer it copies was mapped before that too (or is empty).
    unsafe {
        let uc = &*(ctx as *const libc::ucontext_t);
        let g = &uc.uc_mcontext.gregs;
        let r = &mut *report;
        r.signal = signal;
        r.si_code = (*info).si_code;
        r.address = (*info).si_addr() as u64;
        r.trapno = g[libc::REG_TRAPNO as usize] as u64;
        r.error_code = g[libc::REG_ERR as usize] as u64;
        r.rip = g[libc::REG_RIP as usize] as u64;
        r.cs = (g[libc::REG_CSGSFS as usize] as u64 & 0xFFFF) as u32;
        r.eflags = g[libc::REG_EFL as usize] as u32;
        let order = [
            libc::REG_RAX,
            libc::REG_RCX,
            libc::REG_RDX,
            libc::REG_RBX,
            libc::REG_RSP,
            libc::REG_RBP,
            libc::REG_RSI,
            libc::REG_RDI,
        ];
        for (i, reg) in order.into_iter().enumerate() {
            r.gpr[i] = g[reg as usize] as u32;
        }
        let fp = uc.uc_mcontext.fpregs;
        if !fp.is_null() {
            // The kernel's signal frame holds the FXSAVE image of the state at the fault.
            ptr::copy_nonoverlapping(fp.cast::<u8>(), r.fx.as_mut_ptr(), 512);
        }
        copy_data_out(report);
        r.state = STATE_SIGNAL;
        libc::_exit(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;

    fn asm(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
        let mut a = CodeAssembler::new(32).unwrap();
        f(&mut a).unwrap();
        a.assemble(u64::from(CODE_ADDR)).unwrap()
    }

    /// The x87/SSE state after FNINIT, with MXCSR at its reset value.
    fn init_fx() -> FxImage {
        let mut fx = FxImage::default();
        fx.0[0..2].copy_from_slice(&0x037Fu16.to_le_bytes());
        fx.0[24..28].copy_from_slice(&0x1F80u32.to_le_bytes());
        fx
    }

    /// Runs natively, or returns None (after saying why) on a host without compat mode.
    fn run(code: &[u8], gpr: [u32; 8], eflags: u32, data: &[u8]) -> Option<NativeResult> {
        match run_native(code, gpr, eflags, &init_fx(), data) {
            Ok(r) => Some(r),
            Err(e @ NativeError::NoCompatMode { .. }) => {
                println!("SKIPPED native test: {e}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    const CF: u32 = 1;
    const ZF: u32 = 1 << 6;
    const OF: u32 = 1 << 11;

    #[test]
    fn add_gives_the_host_cpus_result_and_flags() {
        let code = asm(|a| a.add(eax, ebx));
        let mut gpr = [0u32; 8];
        gpr[0] = 0xFFFF_FFFF;
        gpr[3] = 1;
        gpr[1] = 0x1234_5678;
        let Some(r) = run(&code, gpr, OF, &[]) else {
            return;
        };
        assert_eq!(r.end, NativeEnd::Completed);
        assert_eq!(r.gpr[0], 0);
        assert_eq!(r.gpr[1], 0x1234_5678, "other registers are kept");
        assert_eq!(r.gpr[3], 1);
        assert_eq!(
            r.eflags & (CF | ZF | OF),
            CF | ZF,
            "add sets CF and ZF, clears OF"
        );
        assert_eq!(r.eflags & FIXED_USER_FLAGS, FIXED_USER_FLAGS);
        assert_eq!(r.eip, CODE_ADDR + code.len() as u32);
        assert!(r.fault.is_none());
    }

    #[test]
    fn initial_flags_reach_the_snippet() {
        // ADC adds the carry that came in; PUSHFD shows DF and the arithmetic flags as given.
        let code = asm(|a| {
            a.pushfd()?;
            a.pop(edx)?;
            a.adc(eax, 0)
        });
        let mut gpr = [0u32; 8];
        gpr[4] = DATA_ADDR + 0x100;
        let df = 1 << 10;
        let Some(r) = run(
            &code,
            gpr,
            CF | df | 0x100, /* TF: ignored */
            &[0; 0x100],
        ) else {
            return;
        };
        assert_eq!(r.end, NativeEnd::Completed);
        assert_eq!(r.gpr[0], 1);
        assert_eq!(r.gpr[2] & (USER_FLAGS | 0x100), CF | df);
        assert_eq!(r.gpr[4], DATA_ADDR + 0x100);
    }

    #[test]
    fn divide_by_zero_reports_de_at_the_faulting_instruction() {
        let code = asm(|a| {
            a.inc(eax)?;
            a.div(ecx)
        });
        let Some(r) = run(&code, [0; 8], 0, &[]) else {
            return;
        };
        assert_eq!(r.end, NativeEnd::Exception(0));
        assert_eq!(r.eip, CODE_ADDR + 1, "EIP of the DIV");
        assert_eq!(r.gpr[0], 1, "state at the fault");
        assert_eq!(r.fault.map(|f| f.signal), Some(libc::SIGFPE));
    }

    #[test]
    fn memory_writes_land_in_the_returned_data_buffer() {
        let code = asm(|a| {
            a.mov(dword_ptr(DATA_ADDR + 8), eax)?;
            a.push(ecx)?;
            a.mov(byte_ptr(ebx + 1), 0x5Au32)
        });
        let mut gpr = [0u32; 8];
        gpr[0] = 0xDEAD_BEEF;
        gpr[1] = 0xCAFE_F00D;
        gpr[3] = DATA_ADDR + 0x20;
        gpr[4] = DATA_ADDR + 0x40;
        let data: Vec<u8> = (0..0x40).collect();
        let Some(r) = run(&code, gpr, 0, &data) else {
            return;
        };
        assert_eq!(r.end, NativeEnd::Completed);
        let mut want = data.clone();
        want[8..12].copy_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
        want[0x3C..0x40].copy_from_slice(&0xCAFE_F00Du32.to_le_bytes());
        want[0x21] = 0x5A;
        assert_eq!(r.data, want);
        assert_eq!(r.gpr[4], DATA_ADDR + 0x3C);
    }

    #[test]
    fn a_write_outside_the_buffer_is_a_page_fault() {
        let code = asm(|a| {
            a.nop()?;
            a.mov(dword_ptr(DATA_ADDR + 0x1000), eax)
        });
        let Some(r) = run(&code, [0; 8], 0, &[0; 16]) else {
            return;
        };
        assert_eq!(r.end, NativeEnd::Exception(14));
        assert_eq!(r.eip, CODE_ADDR + 1);
        assert_eq!(
            r.fault.map(|f| f.address),
            Some(u64::from(DATA_ADDR) + 0x1000)
        );
    }

    #[test]
    fn ud2_int3_into_and_privileged_instructions_map_to_their_vectors() {
        let cases: [(Vec<u8>, u8, u32); 4] = [
            (asm(|a| a.ud2()), 6, 0),
            (asm(|a| a.int3()), 3, 1), // a trap: EIP after it
            (asm(|a| a.hlt()), 13, 0), // privileged at CPL 3
            (asm(|a| a.into()), 4, 1), // with OF = 1 below; a trap too
        ];
        for (code, vector, eip_after) in cases {
            let Some(r) = run(&code, [0; 8], OF, &[]) else {
                return;
            };
            assert_eq!(r.end, NativeEnd::Exception(vector), "{code:02x?}: {r:?}");
            assert_eq!(r.eip, CODE_ADDR + eip_after, "{code:02x?}");
        }
    }

    #[test]
    fn the_fpu_state_goes_in_and_comes_out() {
        // fld1; fadd st0, st0; fistp dword [DATA_ADDR]; movd mm0... : the image comes back.
        let code = asm(|a| {
            a.fld1()?;
            a.fadd_2(st0, st0)?;
            a.fistp(dword_ptr(DATA_ADDR))?;
            a.addps(xmm1, xmm1)
        });
        let mut fx = init_fx();
        fx.0[160 + 16..160 + 20].copy_from_slice(&1.5f32.to_le_bytes()); // XMM1[0]
        let Some(r) = run_native_fx(&code, &fx) else {
            return;
        };
        assert_eq!(r.end, NativeEnd::Completed);
        assert_eq!(&r.data[..4], &2u32.to_le_bytes());
        assert_eq!(&r.fx.0[176..180], &3.0f32.to_le_bytes());
        assert_eq!(r.fx.0[4], 0, "the stack is empty again");
    }

    #[test]
    fn unmasked_fp_exceptions_arrive_as_mf_and_xm() {
        // x87: 1/0 with ZE unmasked is #MF at the next waiting instruction (the FWAIT).
        let code = asm(|a| {
            a.fld1()?;
            a.fldz()?;
            a.fdivp(st1, st0)?;
            a.nop()?;
            a.wait()
        });
        let mut fx = init_fx();
        fx.0[0..2].copy_from_slice(&0x037Bu16.to_le_bytes());
        let Some(r) = run_native_fx(&code, &fx) else {
            return;
        };
        assert_eq!(r.end, NativeEnd::Exception(16), "{r:?}");
        assert_eq!(r.eip, CODE_ADDR + code.len() as u32 - 1, "at the FWAIT");
        assert_eq!(r.fx.0[2] & 0x84, 0x84, "ZE and ES in the saved status word");
        // SSE: 0/0 with IM unmasked is #XM at the instruction.
        let code = asm(|a| a.divps(xmm0, xmm1));
        let mut fx = init_fx();
        fx.0[24..28].copy_from_slice(&0x1F00u32.to_le_bytes());
        let Some(r) = run_native_fx(&code, &fx) else {
            return;
        };
        assert_eq!(r.end, NativeEnd::Exception(19), "{r:?}");
        assert_eq!(r.eip, CODE_ADDR);
    }

    fn run_native_fx(code: &[u8], fx: &FxImage) -> Option<NativeResult> {
        match run_native(code, [0; 8], 0, fx, &[0; 16]) {
            Ok(r) => Some(r),
            Err(e @ NativeError::NoCompatMode { .. }) => {
                println!("SKIPPED native test: {e}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_runaway_loop_is_killed_and_reported() {
        let mut a = CodeAssembler::new(32).unwrap();
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.jmp(l).unwrap();
        let code = a.assemble(u64::from(CODE_ADDR)).unwrap();
        let Some(r) = run(&code, [0; 8], 0, &[1, 2, 3]) else {
            return;
        };
        assert_eq!(r.end, NativeEnd::Runaway);
        assert_eq!(r.data, [1, 2, 3]);
    }

    #[test]
    fn a_host_without_compat_mode_is_reported_as_such() {
        // The user data segment is no code segment: the far return faults as it would on a host
        // whose 32-bit code segment is missing.
        let code = asm(|a| a.nop());
        let r = run_in(&code, [0; 8], 0, &init_fx(), &[], USER_DS);
        assert!(matches!(r, Err(NativeError::NoCompatMode { .. })), "{r:?}");
    }

    #[test]
    fn a_system_call_kills_the_sandbox_instead_of_reaching_the_host() {
        // getpid through the 32-bit system call gate.
        let code = asm(|a| {
            a.mov(eax, 20u32)?;
            a.int(0x80)
        });
        match run_native(&code, [0; 8], 0, &init_fx(), &[]) {
            Err(NativeError::NoCompatMode { .. }) => {}
            other => assert!(matches!(other, Err(NativeError::SystemCall)), "{other:?}"),
        }
    }

    #[test]
    fn oversized_inputs_are_refused() {
        assert!(matches!(
            run_native(&[], [0; 8], 0, &init_fx(), &vec![0; DATA_MAX + 1]),
            Err(NativeError::DataTooLarge { .. })
        ));
        assert!(matches!(
            run_native(
                &vec![0x90; (DATA_ADDR - CODE_ADDR) as usize],
                [0; 8],
                0,
                &init_fx(),
                &[]
            ),
            Err(NativeError::CodeTooLarge { .. })
        ));
    }

    #[test]
    fn signals_map_to_vectors_when_the_trap_number_is_missing() {
        let f = |signal, si_code| NativeFault {
            signal,
            si_code,
            trapno: 99,
            error_code: 0,
            address: 0,
        };
        assert_eq!(f(libc::SIGFPE, 1).vector(), 0);
        assert_eq!(f(libc::SIGILL, 2).vector(), 6);
        assert_eq!(f(libc::SIGSEGV, SEGV_MAPERR).vector(), 14);
        assert_eq!(f(libc::SIGSEGV, SEGV_ACCERR).vector(), 14);
        assert_eq!(f(libc::SIGSEGV, SI_KERNEL).vector(), 13);
        assert_eq!(f(libc::SIGTRAP, SI_KERNEL).vector(), 3);
        assert_eq!(f(libc::SIGBUS, 1).vector(), 17);
        let of = NativeFault {
            trapno: 4,
            ..f(libc::SIGSEGV, SI_KERNEL)
        };
        assert_eq!(of.vector(), 4);
    }
}
