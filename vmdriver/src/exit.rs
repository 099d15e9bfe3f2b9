//! What an engine reports back to the virtual machine when it stops running guest code.

/// Why an engine returned control to the VM's run loop.
///
/// Every engine (kvm, interp, bt) returns this one enum, so the run loop in `vmm` is the same for
/// all of them. Port and MMIO accesses are completed *inside* the engine through an [`IoHandler`]
/// (the engine needs the value of a read before it can continue); the engine still returns
/// [`VmExit::Io`] afterwards so the run loop can act on what the device did (a stop request, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest performed a port or MMIO access, already completed through the [`IoHandler`].
    Io,
    /// The guest executed HLT. `interrupts_enabled` is EFLAGS.IF at that point: with IF=0 and no
    /// NMI source the CPU can never wake up again.
    Halt {
        /// EFLAGS.IF when HLT executed.
        interrupts_enabled: bool,
    },
    /// The CPU shut down: a triple fault (an exception while delivering a double fault), or a
    /// shutdown cycle. On a PC this resets the machine.
    Shutdown,
    /// The engine stopped so the VM can service timers and interrupts (it ran its time slice,
    /// or an interrupt window opened).
    Interrupted,
}

/// The platform side of port and MMIO accesses, implemented by the VM's device bus.
///
/// Data is little-endian, `data.len()` is the access size (1, 2 or 4 bytes for ports; up to 8 for
/// MMIO). Reads must fill all of `data`.
pub trait IoHandler {
    /// A port read (IN / INS).
    fn pio_read(&mut self, port: u16, data: &mut [u8]);
    /// A port write (OUT / OUTS).
    fn pio_write(&mut self, port: u16, data: &[u8]);
    /// A read from guest-physical `addr` that is not backed by RAM or ROM.
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]);
    /// A write to guest-physical `addr` that is not backed by RAM (or is ROM).
    fn mmio_write(&mut self, addr: u64, data: &[u8]);
    /// RDMSR of a model-specific register that belongs to a platform device rather than the
    /// CPU core (IA32_APIC_BASE: the local APIC). `None` if the platform has no such register.
    fn msr_read(&mut self, index: u32) -> Option<u64> {
        let _ = index;
        None
    }
    /// WRMSR of such a register: `Some(true)` if taken, `Some(false)` if the value is invalid
    /// (the WRMSR raises #GP), `None` if the platform has no such register.
    fn msr_write(&mut self, index: u32, value: u64) -> Option<bool> {
        let _ = (index, value);
        None
    }
}

/// The general registers and the few system registers that explain where a guest is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestRegisters {
    /// EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI (in encoding order).
    pub gpr: [u32; 8],
    /// Instruction pointer (offset in CS).
    pub eip: u32,
    /// EFLAGS.
    pub eflags: u32,
    /// CS selector.
    pub cs: u16,
    /// CS base.
    pub cs_base: u32,
    /// CR0.
    pub cr0: u32,
    /// CR3.
    pub cr3: u32,
}

impl std::fmt::Display for GuestRegisters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.gpr;
        write!(
            f,
            "CS:EIP={:04x}:{:08x} (linear {:08x}) EFLAGS={:08x} CR0={:08x} CR3={:08x} \
             EAX={:08x} ECX={:08x} EDX={:08x} EBX={:08x} ESP={:08x} EBP={:08x} ESI={:08x} EDI={:08x}",
            self.cs,
            self.eip,
            self.cs_base.wrapping_add(self.eip),
            self.eflags,
            self.cr0,
            self.cr3,
            g[0],
            g[1],
            g[2],
            g[3],
            g[4],
            g[5],
            g[6],
            g[7]
        )
    }
}
