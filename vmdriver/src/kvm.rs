//! The KVM engine: the guest's CPU is the host's, through `/dev/kvm`.
//!
//! On a host with VT-x or AMD-V this runs guests at near-native speed and is the comparison bt86's
//! users make. (On bt86's own build machines `/dev/kvm` is the PVM module, a software
//! virtualizer: flat 32-bit code, port I/O and real mode work there; most 32-bit protected-mode
//! corners do not.)
//!
//! One VM with one vCPU. The same [`GuestMemory`] file backs the KVM memory slots, so loaders and
//! devices see what the guest sees. No in-kernel interrupt controller: devices are bt86's own.

use std::sync::Arc;

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY, kvm_regs, kvm_segment, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};

use crate::exit::{GuestRegisters, IoHandler, VmExit};
use crate::kick::Kicker;
use crate::memory::{GuestMemory, RegionKind};

/// How often a running guest is brought back to the VM's run loop so device timers and pending
/// interrupts are serviced even if it never exits on its own.
const KICK_PERIOD: std::time::Duration = std::time::Duration::from_millis(1);

/// KVM_INTERRUPT: `_IOW(KVMIO, 0x86, struct kvm_interrupt)` (kvm-ioctls has no wrapper).
const KVM_INTERRUPT: libc::c_ulong = 0x4004_AE86;

/// Where KVM may put the three pages it needs for real-mode emulation on VMX (KVM_SET_TSS_ADDR):
/// just below the firmware area, inside the MMIO hole, where no RAM or device lives.
const KVM_TSS_ADDRESS: usize = 0xFFF9_D000;

/// Errors from the KVM engine.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm could not be opened.
    #[error(
        "the kvm engine needs /dev/kvm (a host with VT-x or AMD-V, and permission to open it); \
         choose another engine with --engine"
    )]
    Open(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed while setting the VM up.
    #[error("KVM refused to {what}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_RUN itself failed.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
    /// KVM could not enter the guest with the state it was given.
    #[error("KVM could not enter the guest (hardware entry failure reason {0:#x})")]
    FailEntry(u64),
    /// KVM gave up on an instruction it had to emulate (or another internal error).
    #[error(
        "KVM could not execute or emulate the guest's next instruction (is the guest running \
         code from device memory?) at {0}"
    )]
    Internal(GuestRegisters),
    /// KVM refused an interrupt (KVM_INTERRUPT failed).
    #[error("KVM refused to inject interrupt vector {vector:#x}")]
    Inject {
        /// The vector.
        vector: u8,
        /// The ioctl's error.
        #[source]
        source: std::io::Error,
    },
    /// An exit bt86 does not expect from a guest without in-kernel devices.
    #[error("unexpected KVM exit {what} at {regs}")]
    Unexpected {
        /// The exit's name.
        what: String,
        /// The guest state at the exit.
        regs: GuestRegisters,
    },
}

/// Initial CPU state for the KVM engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialCpu {
    /// The x86 power-on/reset state: real mode, CS=F000 with base FFFF0000, IP=FFF0.
    Reset,
    /// Flat 32-bit protected mode, paging off, interrupts off: the multiboot entry state, and the
    /// Linux 32-bit boot protocol's.
    Flat32 {
        /// EIP.
        eip: u32,
        /// EAX (the multiboot magic).
        eax: u32,
        /// EBX (the multiboot information address).
        ebx: u32,
        /// ESI (the Linux boot protocol's `boot_params` address).
        esi: u32,
        /// Base of the GDT holding the flat descriptors.
        gdt_base: u32,
        /// GDT limit.
        gdt_limit: u16,
        /// Selector of the flat 4 GiB code segment (DPL 0, 32-bit, accessed).
        code_selector: u16,
        /// Selector of the flat 4 GiB data segment (DPL 0, 32-bit, accessed).
        data_selector: u16,
    },
}

/// A KVM virtual machine with one vCPU, backed by a [`GuestMemory`].
pub struct KvmVm {
    // Field order is drop order: the vCPU and VM descriptors close before the memory they map
    // can be unmapped.
    vcpu: VcpuFd,
    /// Brings KVM_RUN back periodically while the guest runs (not while it is halted); created
    /// on the thread that runs the vCPU.
    kicker: Option<Kicker>,
    /// Whether an interrupt can be injected now (valid after an exit).
    window: bool,
    _vm: VmFd,
    _kvm: Kvm,
    _memory: Arc<GuestMemory>,
}

impl KvmVm {
    /// Opens /dev/kvm, creates a VM whose memory slots are `memory`'s regions, and one vCPU with the
    /// host's supported CPUID.
    pub fn new(memory: Arc<GuestMemory>) -> Result<Self, KvmError> {
        let setup = |what| move |source| KvmError::Setup { what, source };
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let vm = kvm.create_vm().map_err(setup("create a VM"))?;
        // VMX needs three pages for real-mode emulation; other implementations may not support
        // the call at all, which is harmless.
        if let Err(e) = vm.set_tss_address(KVM_TSS_ADDRESS) {
            tracing::debug!("KVM_SET_TSS_ADDR not accepted ({e}); continuing without it");
        }
        let readonly = vm.check_extension(Cap::ReadonlyMem);
        for (slot, region) in memory.layout().regions().iter().enumerate() {
            let flags = if region.kind == RegionKind::Firmware && readonly {
                KVM_MEM_READONLY
            } else {
                0
            };
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.guest_addr,
                memory_size: region.size,
                userspace_addr: memory.host_address(region.file_offset) as u64,
            };
            // SAFETY: the host range lies inside `memory`'s mapping (regions are within the memory
            // file), and `self._memory` keeps that mapping alive for as long as the VM exists.
            unsafe { vm.set_user_memory_region(mem_region) }.map_err(setup("map guest memory"))?;
        }
        let vcpu = vm.create_vcpu(0).map_err(setup("create a vCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(setup("report its CPUID"))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(setup("set the vCPU's CPUID"))?;
        Ok(Self {
            vcpu,
            kicker: None,
            window: false,
            _vm: vm,
            _kvm: kvm,
            _memory: memory,
        })
    }

    /// Puts the vCPU in `state`.
    pub fn set_initial_state(&mut self, state: InitialCpu) -> Result<(), KvmError> {
        let setup = |what| move |source| KvmError::Setup { what, source };
        let mut sregs = self
            .vcpu
            .get_sregs()
            .map_err(setup("read special registers"))?;
        let mut regs = kvm_regs {
            rflags: 0x2,
            ..Default::default()
        };
        match state {
            InitialCpu::Reset => {
                let data = |selector: u16, base: u64| real_mode_segment(selector, base, 3);
                sregs.cs = real_mode_segment(0xF000, 0xFFFF_0000, 0xB);
                sregs.ds = data(0, 0);
                sregs.es = data(0, 0);
                sregs.fs = data(0, 0);
                sregs.gs = data(0, 0);
                sregs.ss = data(0, 0);
                sregs.cr0 = 0x6000_0010; // CD | NW | ET
                regs.rip = 0xFFF0;
                regs.rdx = 0x600; // family 6: the P6 reset signature in EDX
            }
            InitialCpu::Flat32 {
                eip,
                eax,
                ebx,
                esi,
                gdt_base,
                gdt_limit,
                code_selector,
                data_selector,
            } => {
                sregs.gdt.base = u64::from(gdt_base);
                sregs.gdt.limit = gdt_limit;
                sregs.cs = flat_segment(code_selector, 0xB);
                let data = flat_segment(data_selector, 0x3);
                sregs.ds = data;
                sregs.es = data;
                sregs.fs = data;
                sregs.gs = data;
                sregs.ss = data;
                sregs.cr0 = 0x11; // PE | ET
                regs.rip = u64::from(eip);
                regs.rax = u64::from(eax);
                regs.rbx = u64::from(ebx);
                regs.rsi = u64::from(esi);
            }
        }
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
        sregs.tr = kvm_segment {
            base: 0,
            limit: 0xFFFF,
            selector: 0,
            type_: 0xB, // busy 32-bit TSS: what VMX requires of TR on entry
            present: 1,
            ..Default::default()
        };
        sregs.ldt = kvm_segment {
            limit: 0xFFFF,
            type_: 0x2,
            present: 1,
            ..Default::default()
        };
        self.vcpu
            .set_sregs(&sregs)
            .map_err(setup("set special registers"))?;
        self.vcpu.set_regs(&regs).map_err(setup("set registers"))?;
        Ok(())
    }

    /// Runs the guest until it does something the VM's run loop must see.
    ///
    /// Port and MMIO accesses are completed through `io` before this returns [`VmExit::Io`].
    pub fn run(&mut self, io: &mut dyn IoHandler) -> Result<VmExit, KvmError> {
        if !self.kicker.as_ref().is_some_and(Kicker::is_current_thread) {
            self.kicker = match Kicker::for_current_thread(KICK_PERIOD) {
                Ok(k) => Some(k),
                Err(e) => {
                    tracing::warn!(
                        "no periodic kick for the kvm vCPU ({e}): timers are serviced only when \
                         the guest exits"
                    );
                    None
                }
            };
        }
        if let Some(kicker) = &mut self.kicker
            && let Err(e) = kicker.arm()
        {
            tracing::warn!("the kvm vCPU's periodic kick did not start ({e})");
        }
        let exit = self.run_once(io);
        if let (Ok(VmExit::Halt { .. }), Some(kicker)) = (&exit, &mut self.kicker) {
            // The VM sleeps until an event: no kicks while the guest is halted.
            kicker.disarm();
        }
        let run = self.vcpu.get_kvm_run();
        self.window = run.ready_for_interrupt_injection != 0 && run.if_flag != 0;
        exit
    }

    fn run_once(&mut self, io: &mut dyn IoHandler) -> Result<VmExit, KvmError> {
        loop {
            let exit = match self.vcpu.run() {
                Ok(exit) => exit,
                // A kick (or another signal): let the run loop look at its timers.
                Err(e) if e.errno() == libc::EINTR => return Ok(VmExit::Interrupted),
                Err(e) if e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(KvmError::Run(e)),
            };
            return match exit {
                VcpuExit::IoIn(port, data) => {
                    io.pio_read(port, data);
                    Ok(VmExit::Io)
                }
                VcpuExit::IoOut(port, data) => {
                    io.pio_write(port, data);
                    Ok(VmExit::Io)
                }
                VcpuExit::MmioRead(addr, data) => {
                    io.mmio_read(addr, data);
                    Ok(VmExit::Io)
                }
                VcpuExit::MmioWrite(addr, data) => {
                    io.mmio_write(addr, data);
                    Ok(VmExit::Io)
                }
                VcpuExit::Hlt => {
                    let regs = self.registers()?;
                    Ok(VmExit::Halt {
                        interrupts_enabled: regs.eflags & 0x200 != 0,
                    })
                }
                VcpuExit::Shutdown => Ok(VmExit::Shutdown),
                VcpuExit::IrqWindowOpen => Ok(VmExit::Interrupted),
                VcpuExit::FailEntry(reason, _cpu) => Err(KvmError::FailEntry(reason)),
                VcpuExit::InternalError => Err(KvmError::Internal(self.registers()?)),
                other => {
                    let what = format!("{other:?}");
                    Err(KvmError::Unexpected {
                        what,
                        regs: self.registers()?,
                    })
                }
            };
        }
    }

    /// Whether an external interrupt can be injected now: the guest has IF set and is not in an
    /// interrupt shadow (as KVM reported at the last exit).
    pub fn interrupt_window(&self) -> bool {
        self.window
    }

    /// Asks KVM to exit as soon as the guest can take an interrupt.
    pub fn request_interrupt_window(&mut self) {
        self.vcpu.get_kvm_run().request_interrupt_window = 1;
    }

    /// Queues external interrupt `vector` for delivery at the next entry.
    pub fn inject_interrupt(&mut self, vector: u8) -> Result<(), KvmError> {
        use std::os::fd::AsRawFd;
        let irq = kvm_bindings::kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT reads one `struct kvm_interrupt` from the pointer, which is a
        // live local of that type; the fd is this VM's vCPU.
        let rc = unsafe { libc::ioctl(self.vcpu.as_raw_fd(), KVM_INTERRUPT, &irq) };
        if rc != 0 {
            return Err(KvmError::Inject {
                vector,
                source: std::io::Error::last_os_error(),
            });
        }
        self.window = false;
        self.vcpu.get_kvm_run().request_interrupt_window = 0;
        Ok(())
    }

    /// The rate of the guest's TSC in Hz, as KVM reports it (None if KVM cannot say).
    pub fn tsc_hz(&self) -> Option<u64> {
        self.vcpu
            .get_tsc_khz()
            .ok()
            .map(|khz| u64::from(khz) * 1000)
    }

    /// The vCPU's current registers.
    pub fn registers(&self) -> Result<GuestRegisters, KvmError> {
        let setup = |what| move |source| KvmError::Setup { what, source };
        let r = self.vcpu.get_regs().map_err(setup("read registers"))?;
        let s = self
            .vcpu
            .get_sregs()
            .map_err(setup("read special registers"))?;
        Ok(GuestRegisters {
            gpr: [r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi].map(|v| v as u32),
            eip: r.rip as u32,
            eflags: r.rflags as u32,
            cs: s.cs.selector,
            cs_base: s.cs.base as u32,
            cr0: s.cr0 as u32,
            cr3: s.cr3 as u32,
        })
    }
}

/// A 4 GiB, base-0, 32-bit segment at DPL 0 with `type_` (0xB code, 0x3 data).
fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// A real-mode segment as the CPU leaves it after reset (64 KiB limit, 16-bit).
fn real_mode_segment(selector: u16, base: u64, type_: u8) -> kvm_segment {
    kvm_segment {
        base,
        limit: 0xFFFF,
        selector,
        type_,
        present: 1,
        s: 1,
        ..Default::default()
    }
}
