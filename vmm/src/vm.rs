//! The virtual machine: guest memory, the device buses, the stop control and an engine, and the
//! run loop that ties them together.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmdriver::kvm::InitialCpu;
use vmdriver::{GuestMemory, GuestRegisters, IoHandler, MemoryError, MemoryLayout, VmExit};

use crate::acpi::{self, AcpiConfig, RSDP_ADDR};
use crate::bus::{Bus, BusError, DeviceStats};
use crate::chipset::{Chipset, ChipsetError, DriveSpec, DriveStats};
use crate::control::{StopRequest, VmControl};
use crate::devices::acpi_pm::{
    AcpiPm, AcpiPmBlock, AcpiPmPorts, PM_TMR_PORT, PM1A_CNT_PORT, PM1A_CNT_PORT_BOCHS,
    PM1A_EVT_PORT, SCI_IRQ,
};
use crate::devices::clock::VmClock;
use crate::devices::coprocessor::{COPROCESSOR_PORT, CoprocessorPort};
use crate::devices::debug_exit::{DEBUG_EXIT_PORT, DEBUG_EXIT_PORTS, DebugExit};
use crate::devices::fw_cfg::{FW_CFG_PORT, FW_CFG_PORTS, FwCfg};
use crate::devices::i8042::{
    AUX_IRQ, I8042_COMMAND_PORT, I8042_DATA_PORT, I8042Port, KEYBOARD_IRQ,
};
use crate::devices::lapic::MSR_APIC_BASE;
use crate::devices::pic::{Pic, PicPortKind, PicPorts};
use crate::devices::pit::{Clock, PIT_PORT, PORT_B, Pit, PitPorts};
use crate::devices::post::{POST_PORT, PostCode};
use crate::devices::rtc::{RTC_IRQ, RTC_PORT, Rtc, RtcPorts};
use crate::devices::serial::{COM1_BASE, COM1_IRQ, SharedUart, Uart};
use crate::devices::{Apics, IoApicMmio, IrqChips, IrqLine};
use crate::engine::{self, Engine, EngineError, EngineKind};
use crate::loader::linux::{self, LinuxError, LinuxImage};
use crate::loader::multiboot::{self, BOOTLOADER_MAGIC, BootModule, MultibootError};
use crate::platform::{FIRMWARE_TABLES_SIZE, IOAPIC_BASE, IOAPIC_ID, e820_map};

/// Guest-physical address of the GDT bt86 provides for a multiboot entry: the start of the
/// firmware area's alias below 1 MiB (read-only, outside usable RAM, like QEMU's option ROM).
pub const BOOT_GDT_ADDR: u32 = 0xE_0000;
/// Flat code selector at multiboot entry (QEMU's value).
pub const BOOT_CODE_SELECTOR: u16 = 0x08;
/// Flat data selector at multiboot entry (QEMU's value).
pub const BOOT_DATA_SELECTOR: u16 = 0x10;
/// Null, flat 32-bit code (0x08), flat 32-bit data (0x10); accessed bits preset so the CPU never
/// writes the read-only table.
const BOOT_GDT: [u64; 3] = [0, 0x00CF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF];
/// The Linux 32-bit boot protocol's GDT: flat code at `__BOOT_CS` (0x10), flat data at
/// `__BOOT_DS` (0x18), accessed bits preset.
const LINUX_BOOT_GDT: [u64; 4] = [0, 0, 0x00CF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF];

/// What the VM boots.
#[derive(Debug, Clone)]
pub enum BootSource {
    /// A multiboot v1 kernel, entered in flat 32-bit protected mode.
    Multiboot {
        /// The kernel file's contents.
        kernel: Vec<u8>,
        /// The kernel's file name, which starts the command line as QEMU and GRUB pass it.
        name: String,
        /// The rest of the command line.
        cmdline: String,
        /// Modules, in order.
        modules: Vec<BootModule>,
    },
    /// A Linux bzImage, entered by the 32-bit boot protocol.
    Linux {
        /// The bzImage file's contents.
        kernel: Vec<u8>,
        /// The initial ramdisk, if any.
        initrd: Option<Vec<u8>>,
        /// The kernel command line.
        cmdline: String,
    },
    /// A firmware image placed at the top of the 4 GiB space, entered at the reset vector.
    Firmware {
        /// The image (at most 256 KiB).
        image: Vec<u8>,
    },
}

/// Everything needed to build a [`Vm`].
pub struct VmConfig {
    /// RAM size in MiB.
    pub memory_mib: u64,
    /// The engine to run on.
    pub engine: EngineKind,
    /// What to boot.
    pub boot: BootSource,
    /// Where COM1's output goes.
    pub serial: Box<dyn Write + Send>,
    /// Bytes typed at COM1 (from a terminal, a pipe...), if its input is connected.
    pub serial_input: Option<Receiver<Vec<u8>>>,
    /// Where to log every executed instruction (interp only), if anywhere.
    pub trace: Option<Box<dyn Write + Send>>,
    /// Check bt against the interpreter step by step (bt only; see [`crate::lockstep`]).
    pub lockstep: bool,
    /// Drives on the IDE controller and virtio disks.
    pub drives: Vec<DriveSpec>,
    /// Whether the guest's clocks leave out the time the host did not run the vCPU (bt and
    /// interp only; see [`VmClock`]). Off, they count host monotonic time, as DESIGN.md §6 has
    /// it and as a benchmark comparing engines needs.
    pub apparent_time: bool,
}

/// Errors creating or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel could not be loaded.
    #[error(transparent)]
    Kernel(#[from] MultibootError),
    /// The Linux kernel could not be loaded.
    #[error(transparent)]
    Linux(#[from] LinuxError),
    /// The firmware image could not be installed.
    #[error(transparent)]
    Firmware(MemoryError),
    /// Two devices were mapped over each other (a bt86 bug).
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The engine failed to start or to run.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The PCI devices or the drives could not be set up.
    #[error(transparent)]
    Chipset(#[from] ChipsetError),
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest wrote `value` to the isa-debug-exit port.
    DebugExit {
        /// The value written.
        value: u32,
    },
    /// The guest powered the machine off.
    PowerOff,
    /// The guest reset the machine (a reboot).
    Reset,
    /// The host asked the VM to stop (the console's quit key, a signal).
    Stopped,
    /// The CPU shut down (triple fault).
    TripleFault {
        /// Registers after the shutdown, if the engine could report them.
        regs: Option<GuestRegisters>,
    },
    /// The CPU halted with nothing that could ever wake it.
    Halted {
        /// EFLAGS.IF at the HLT.
        interrupts_enabled: bool,
        /// Registers at the HLT.
        regs: Option<GuestRegisters>,
    },
}

/// Counters that explain a run, printed by `bt86 run --stats`.
#[derive(Debug, Clone, Default)]
pub struct VmStats {
    /// Engine used.
    pub engine: Option<EngineKind>,
    /// Exits for completed port/MMIO accesses.
    pub io_exits: u64,
    /// Returns from the engine to service timers (time slices, interrupt windows).
    pub interrupted_exits: u64,
    /// External interrupts injected into the engine.
    pub interrupts_injected: u64,
    /// Timer ticks (IRQ 0 edges) the PIT delivered.
    pub timer_ticks: u64,
    /// Time the CPU spent halted, waiting for an interrupt.
    pub halted_time: Duration,
    /// HLT exits.
    pub halt_exits: u64,
    /// Shutdown exits.
    pub shutdown_exits: u64,
    /// Wall time spent in the run loop.
    pub run_time: Duration,
    /// Port devices and their access counts.
    pub pio_devices: Vec<DeviceStats>,
    /// Port reads/writes no device claimed.
    pub pio_unclaimed: (u64, u64),
    /// MMIO reads/writes no device claimed.
    pub mmio_unclaimed: (u64, u64),
    /// Interrupt lines and how often each was raised.
    pub irqs: Vec<(u8, u64)>,
    /// The engine's own counters (name, value).
    pub engine_counters: Vec<(&'static str, u64)>,
    /// The rate of the guest's TSC in Hz, if the engine states one.
    pub tsc_hz: Option<u64>,
    /// Drives and their I/O counters.
    pub drives: Vec<DriveStats>,
    /// Disk completions that made the running engine return early to deliver them.
    pub io_wakeups: u64,
    /// Times the halted CPU went to sleep on the host (each ends in one wake-up).
    pub halt_sleeps: u64,
    /// Host context switches of the thread that ran the VM: (voluntary, involuntary). A
    /// voluntary one is a sleep; an idle guest should cost about one per [`VmStats::halt_sleeps`].
    pub host_switches: (u64, u64),
}

/// The calling thread's context switches so far, (voluntary, involuntary), from
/// /proc/thread-self/status; zeros where that is unavailable.
fn thread_switches() -> (u64, u64) {
    let Ok(status) = std::fs::read_to_string("/proc/thread-self/status") else {
        return (0, 0);
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (
        field("voluntary_ctxt_switches:"),
        field("nonvoluntary_ctxt_switches:"),
    )
}

/// The port and MMIO buses and the local APIC, as the engines see them.
struct Buses<'a> {
    pio: &'a mut Bus,
    mmio: &'a mut Bus,
    apics: &'a Mutex<Apics>,
    clock: &'a VmClock,
}

impl Buses<'_> {
    fn apics(&self) -> std::sync::MutexGuard<'_, Apics> {
        self.apics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The offset in the local APIC's register page, if `addr` is in it while it is enabled
    /// (the page moves with IA32_APIC_BASE and goes away with its global enable).
    fn lapic_offset(&self, addr: u64) -> Option<u64> {
        let base = self.apics().lapic.mmio_base()?;
        (addr & !0xFFF == base).then_some(addr & 0xFFF)
    }
}

impl IoHandler for Buses<'_> {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.pio.read(u64::from(port), data);
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.pio.write(u64::from(port), data);
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        if let Some(offset) = self.lapic_offset(addr) {
            let now = self.clock.now_ns();
            self.apics().lapic_read(offset, data, now);
            return;
        }
        self.mmio.read(addr, data);
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        if let Some(offset) = self.lapic_offset(addr) {
            let now = self.clock.now_ns();
            self.apics().lapic_write_bytes(offset, data, now);
            return;
        }
        self.mmio.write(addr, data);
    }
    fn msr_read(&mut self, index: u32) -> Option<u64> {
        (index == MSR_APIC_BASE).then(|| self.apics().lapic.base_msr())
    }
    fn msr_write(&mut self, index: u32, value: u64) -> Option<bool> {
        (index == MSR_APIC_BASE).then(|| self.apics().lapic.write_base_msr(value))
    }
}

/// A virtual PC with one CPU.
pub struct Vm {
    memory: Arc<GuestMemory>,
    pio: Bus,
    mmio: Bus,
    control: VmControl,
    irqs: Vec<IrqLine>,
    pic: Arc<Mutex<Pic>>,
    apics: Arc<Mutex<Apics>>,
    chips: IrqChips,
    pit: Arc<Mutex<Pit>>,
    rtc: Arc<Mutex<Rtc>>,
    rtc_irq: IrqLine,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    sci: IrqLine,
    clock: Arc<VmClock>,
    chipset: Chipset,
    uart: Arc<Mutex<Uart<Box<dyn Write + Send>>>>,
    serial_input: Option<Receiver<Vec<u8>>>,
    /// Input received but not yet taken by the UART's FIFO.
    serial_pending: VecDeque<u8>,
    engine: Box<dyn Engine>,
    stats: VmStats,
    /// IGNNE#, latched by a write to port 0xF0.
    ignne: Arc<std::sync::atomic::AtomicBool>,
    /// The level IRQ 13 (FERR#) is driven at.
    irq13: bool,
}

/// The longest a halted CPU sleeps before looking again (keeps stop requests responsive).
const MAX_IDLE_SLEEP: Duration = Duration::from_millis(50);

impl Vm {
    /// Builds the machine: memory, devices, the boot image, and the engine.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        let layout = MemoryLayout::new(config.memory_mib)?;
        let memory = Arc::new(GuestMemory::new(layout)?);
        let control = VmControl::new();

        let pic = Arc::new(Mutex::new(Pic::new()));
        let pit = Arc::new(Mutex::new(Pit::new()));
        // One timeline for the devices and the TSC: bt's and interp's TSC is this clock. It is
        // host monotonic time unless the user asked for apparent time (which hides host
        // scheduling gaps); KVM's TSC is the host's, so its devices always count host time.
        let clock = Arc::new(
            if config.apparent_time && config.engine != EngineKind::Kvm {
                VmClock::virtual_time()
            } else {
                VmClock::host()
            },
        );
        let apics = Arc::new(Mutex::new(Apics::new(IOAPIC_ID)));
        let chips = IrqChips {
            pic: pic.clone(),
            apics: apics.clone(),
        };
        let com1_irq = IrqLine::wired(COM1_IRQ, &chips);
        let rtc_irq = IrqLine::wired(RTC_IRQ, &chips);
        let keyboard_irq = IrqLine::wired(KEYBOARD_IRQ, &chips);
        let aux_irq = IrqLine::wired(AUX_IRQ, &chips);
        let sci = IrqLine::wired(SCI_IRQ, &chips);
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let rtc = Arc::new(Mutex::new(Rtc::new(
            unix_now,
            clock.now_ns(),
            layout.ram_bytes(),
        )));
        let mut pio = Bus::new();
        for (base, kind, name) in [
            (0x20, PicPortKind::Master, "pic-master"),
            (0xA0, PicPortKind::Slave, "pic-slave"),
            (0x4D0, PicPortKind::Elcr, "pic-elcr"),
        ] {
            pio.insert(base, 2, name, Box::new(PicPorts::new(pic.clone(), kind)))?;
        }
        let clock_dyn: Arc<dyn Clock> = clock.clone();
        pio.insert(
            u64::from(PIT_PORT),
            4,
            "pit",
            Box::new(PitPorts::counters(pit.clone(), clock_dyn.clone())),
        )?;
        pio.insert(
            u64::from(PORT_B),
            1,
            "port-b",
            Box::new(PitPorts::port_b(pit.clone(), clock_dyn.clone())),
        )?;
        pio.insert(
            u64::from(RTC_PORT),
            2,
            "rtc-cmos",
            Box::new(RtcPorts::new(rtc.clone(), clock_dyn, rtc_irq.clone())),
        )?;
        let (kbd_data, kbd_command) =
            I8042Port::pair(keyboard_irq.clone(), aux_irq.clone(), control.clone());
        pio.insert(
            u64::from(I8042_DATA_PORT),
            1,
            "i8042-data",
            Box::new(kbd_data),
        )?;
        pio.insert(
            u64::from(I8042_COMMAND_PORT),
            1,
            "i8042-command",
            Box::new(kbd_command),
        )?;
        let coprocessor = CoprocessorPort::default();
        let ignne = coprocessor.latch();
        pio.insert(
            u64::from(COPROCESSOR_PORT),
            1,
            "coprocessor",
            Box::new(coprocessor),
        )?;
        pio.insert(
            u64::from(POST_PORT),
            1,
            "post-code",
            Box::new(PostCode::default()),
        )?;
        let uart = Arc::new(Mutex::new(Uart::new(com1_irq.clone(), config.serial)));
        pio.insert(
            u64::from(COM1_BASE),
            8,
            "uart-com1",
            Box::new(SharedUart(uart.clone())),
        )?;
        pio.insert(
            u64::from(DEBUG_EXIT_PORT),
            u64::from(DEBUG_EXIT_PORTS),
            "isa-debug-exit",
            Box::new(DebugExit::new(control.clone())),
        )?;
        pio.insert(
            u64::from(FW_CFG_PORT),
            u64::from(FW_CFG_PORTS),
            "fw_cfg",
            Box::new(FwCfg::new(memory.clone(), 1, layout.ram_bytes())),
        )?;
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(control.clone())));
        for (port, len, block, name) in [
            (PM1A_EVT_PORT, 4, AcpiPmBlock::Event, "acpi-pm1a-evt"),
            (PM1A_CNT_PORT, 2, AcpiPmBlock::Control, "acpi-pm1a-cnt"),
            (PM_TMR_PORT, 4, AcpiPmBlock::Timer, "acpi-pm-tmr"),
            (
                PM1A_CNT_PORT_BOCHS,
                2,
                AcpiPmBlock::Control,
                "acpi-pm1a-cnt-bochs",
            ),
        ] {
            pio.insert(
                u64::from(port),
                len,
                name,
                Box::new(AcpiPmPorts::new(
                    acpi_pm.clone(),
                    clock.clone(),
                    sci.clone(),
                    block,
                )),
            )?;
        }

        let chipset = Chipset::install(&mut pio, memory.clone(), &chips, config.drives)?;
        let mut mmio = Bus::new();
        mmio.insert(
            u64::from(IOAPIC_BASE),
            0x1000,
            "ioapic",
            Box::new(IoApicMmio(apics.clone())),
        )?;
        // BARs the chipset placed, as firmware does.
        chipset.service(&mut pio, &mut mmio);
        chipset
            .pci()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_reset_control(control.clone());
        let mut irqs = vec![
            keyboard_irq,
            com1_irq,
            rtc_irq.clone(),
            aux_irq,
            sci.clone(),
        ];
        irqs.extend(chipset.irq_lines().iter().cloned());

        // The tables a PC's firmware leaves behind, for the boots that have no firmware; a
        // firmware image (--bios) owns the BIOS area and brings its own.
        let install_acpi = || -> Result<(), MemoryError> {
            let tables_base = layout.ram_bytes() - FIRMWARE_TABLES_SIZE;
            let tables = acpi::build(&AcpiConfig {
                ram_bytes: layout.ram_bytes(),
                tables_base: tables_base as u32,
                apic: true,
            });
            memory.write(tables_base, &tables.area)?;
            memory.write(u64::from(RSDP_ADDR), &tables.rsdp)
        };
        let initial = match config.boot {
            BootSource::Multiboot {
                kernel,
                name,
                cmdline,
                modules,
            } => {
                let entry = multiboot::load(
                    &memory,
                    &kernel,
                    &name,
                    &cmdline,
                    &modules,
                    &e820_map(&layout),
                )?;
                let gdt: Vec<u8> = BOOT_GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
                memory.write(u64::from(BOOT_GDT_ADDR), &gdt)?;
                install_acpi()?;
                InitialCpu::Flat32 {
                    eip: entry.entry,
                    eax: BOOTLOADER_MAGIC,
                    ebx: entry.info,
                    esi: 0,
                    gdt_base: BOOT_GDT_ADDR,
                    gdt_limit: (gdt.len() - 1) as u16,
                    code_selector: BOOT_CODE_SELECTOR,
                    data_selector: BOOT_DATA_SELECTOR,
                }
            }
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                let image = LinuxImage {
                    kernel: &kernel,
                    initrd: initrd.as_deref(),
                    cmdline: &cmdline,
                };
                install_acpi()?;
                let entry = linux::load(
                    &memory,
                    &image,
                    &e820_map(&layout),
                    Some(u64::from(RSDP_ADDR)),
                )?;
                let gdt: Vec<u8> = LINUX_BOOT_GDT
                    .iter()
                    .flat_map(|d| d.to_le_bytes())
                    .collect();
                memory.write(u64::from(BOOT_GDT_ADDR), &gdt)?;
                InitialCpu::Flat32 {
                    eip: entry.entry,
                    eax: 0,
                    ebx: 0,
                    esi: entry.boot_params,
                    gdt_base: BOOT_GDT_ADDR,
                    gdt_limit: (gdt.len() - 1) as u16,
                    code_selector: linux::BOOT_CS,
                    data_selector: linux::BOOT_DS,
                }
            }
            BootSource::Firmware { image } => {
                memory.load_firmware(&image).map_err(VmError::Firmware)?;
                InitialCpu::Reset
            }
        };
        let engine = engine::create(
            config.engine,
            memory.clone(),
            initial,
            clock.clone(),
            config.trace,
            config.lockstep,
        )?;
        if let Some(waker) = engine.io_waker() {
            chipset.set_io_waker(waker);
        }
        Ok(Self {
            memory,
            pio,
            mmio,
            control,
            irqs,
            pic,
            apics,
            chips,
            pit,
            rtc,
            rtc_irq,
            acpi_pm,
            sci,
            clock,
            chipset,
            uart,
            serial_input: config.serial_input,
            serial_pending: VecDeque::new(),
            engine,
            stats: VmStats::default(),
            ignne,
            irq13: false,
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Runs the guest until it stops.
    pub fn run(&mut self) -> Result<RunOutcome, VmError> {
        let start = Instant::now();
        let switches = thread_switches();
        self.clock.resume();
        let outcome = self.run_loop();
        self.clock.halt();
        self.stats.run_time += start.elapsed();
        let now = thread_switches();
        self.stats.host_switches.0 += now.0.saturating_sub(switches.0);
        self.stats.host_switches.1 += now.1.saturating_sub(switches.1);
        outcome
    }

    fn run_loop(&mut self) -> Result<RunOutcome, VmError> {
        loop {
            let now = self.clock.now_ns();
            let deadline = self.next_timer_deadline(now);
            self.engine
                .set_timer_deadline(deadline.map(|d| d.saturating_sub(now)));
            let mut buses = Buses {
                pio: &mut self.pio,
                mmio: &mut self.mmio,
                apics: &self.apics,
                clock: &self.clock,
            };
            let exit = self.engine.run(&mut buses)?;
            self.sync_ferr();
            match exit {
                VmExit::Io => self.stats.io_exits += 1,
                VmExit::Interrupted => self.stats.interrupted_exits += 1,
                VmExit::Halt { interrupts_enabled } => {
                    self.stats.halt_exits += 1;
                    let can_wake = interrupts_enabled
                        && self.engine.supports_interrupts()
                        && self.wait_for_interrupt();
                    if !can_wake {
                        return Ok(RunOutcome::Halted {
                            interrupts_enabled,
                            regs: self.engine.registers().ok(),
                        });
                    }
                }
                VmExit::Shutdown => {
                    self.stats.shutdown_exits += 1;
                    return Ok(RunOutcome::TripleFault {
                        regs: self.engine.registers().ok(),
                    });
                }
            }
            self.chipset.service(&mut self.pio, &mut self.mmio);
            match self.control.pending() {
                Some(StopRequest::DebugExit(value)) => {
                    return Ok(RunOutcome::DebugExit { value });
                }
                Some(StopRequest::PowerOff) => return Ok(RunOutcome::PowerOff),
                Some(StopRequest::Reset) => return Ok(RunOutcome::Reset),
                Some(StopRequest::Host) => return Ok(RunOutcome::Stopped),
                None => {}
            }
            self.feed_serial(None);
            if let Some(outcome) = self.service_interrupts()? {
                return Ok(outcome);
            }
        }
    }

    /// The PC's wiring of the x87 error pins: FERR# raises IRQ 13 until a write to port 0xF0
    /// latches IGNNE# (which also drops IRQ 13); IGNNE# is released when FERR# goes away.
    fn sync_ferr(&mut self) {
        use std::sync::atomic::Ordering;
        let ferr = self.engine.ferr();
        if !ferr {
            self.ignne.store(false, Ordering::Relaxed);
        }
        let ignne = self.ignne.load(Ordering::Relaxed);
        let irq = ferr && !ignne;
        if irq != self.irq13 {
            self.irq13 = irq;
            self.chips.set_irq(13, irq);
        }
        self.engine.set_ignne(ignne);
    }

    /// Takes the serial input channel back (to hand it to the next boot after a reboot).
    pub fn take_serial_input(&mut self) -> Option<Receiver<Vec<u8>>> {
        self.serial_input.take()
    }

    /// The handle through which the host (a terminal's quit key, a signal) can stop the VM.
    pub fn control(&self) -> VmControl {
        self.control.clone()
    }

    /// Moves serial input into the UART. With `wait`, blocks up to that long for input to
    /// arrive first (a halted CPU waiting for a key). Returns whether any input arrived.
    fn feed_serial(&mut self, wait: Option<Duration>) -> bool {
        let mut got = false;
        if let Some(rx) = &self.serial_input {
            let first = match wait {
                Some(d) if self.serial_pending.is_empty() => match rx.recv_timeout(d) {
                    Ok(bytes) => Some(bytes),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        self.serial_input = None;
                        std::thread::sleep(d);
                        None
                    }
                },
                _ => None,
            };
            if let Some(bytes) = first {
                got = true;
                self.serial_pending.extend(bytes);
            }
            if let Some(rx) = &self.serial_input {
                loop {
                    match rx.try_recv() {
                        Ok(bytes) => {
                            got = true;
                            self.serial_pending.extend(bytes);
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            self.serial_input = None;
                            break;
                        }
                    }
                }
            }
        } else if let Some(d) = wait {
            std::thread::sleep(d);
        }
        if !self.serial_pending.is_empty() {
            self.uart
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .receive(&mut self.serial_pending);
        }
        got
    }

    /// Advances the timers to now, raising their interrupt lines.
    fn update_timers(&mut self) {
        let now = self.clock.now_ns();
        let fired = self
            .pit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .update(now);
        if fired {
            self.stats.timer_ticks += 1;
            self.chips.pulse_irq(0);
        }
        self.apics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lapic
            .update(now);
        let rtc_fired = self
            .rtc
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .update(now);
        if rtc_fired {
            self.rtc_irq.raise();
        }
        let sci = self
            .acpi_pm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sci_level(now);
        self.sci.set_level(sci);
    }

    /// The earliest time any timer device (PIT, RTC, the PM timer's overflow, the local APIC
    /// timer) can next interrupt, if one is armed; `now` is the VM clock's time.
    fn next_timer_deadline(&self, now: u64) -> Option<u64> {
        let pit = self
            .pit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_deadline();
        let rtc = self
            .rtc
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_deadline();
        let pm = self
            .acpi_pm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_deadline(now);
        let lapic = self
            .apics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lapic
            .next_deadline();
        [pit, rtc, pm, lapic].into_iter().flatten().min()
    }

    /// Services timers and, when the engine can take one, delivers a pending interrupt.
    fn service_interrupts(&mut self) -> Result<Option<RunOutcome>, VmError> {
        if !self.engine.supports_interrupts() {
            return Ok(None);
        }
        self.update_timers();
        if !self.engine.interrupt_window() {
            if self.interrupt_pending() {
                self.engine.request_interrupt_window();
            }
            return Ok(None);
        }
        let Some(vector) = self.acknowledge_interrupt() else {
            return Ok(None);
        };
        self.stats.interrupts_injected += 1;
        let mut buses = Buses {
            pio: &mut self.pio,
            mmio: &mut self.mmio,
            apics: &self.apics,
            clock: &self.clock,
        };
        match self.engine.inject_interrupt(vector, &mut buses)? {
            Some(VmExit::Shutdown) => {
                self.stats.shutdown_exits += 1;
                Ok(Some(RunOutcome::TripleFault {
                    regs: self.engine.registers().ok(),
                }))
            }
            _ => Ok(None),
        }
    }

    /// Whether a maskable interrupt is waiting for the CPU: a deliverable vector in the local
    /// APIC, or the 8259's INTR where it reaches the CPU (LINT0 in ExtINT mode, or the APIC
    /// globally disabled).
    fn interrupt_pending(&self) -> bool {
        let apics = self.apics.lock().unwrap_or_else(|e| e.into_inner());
        apics.lapic.pending().is_some()
            || (apics.lapic.pic_routed()
                && self
                    .pic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .has_interrupt())
    }

    /// The interrupt acknowledge cycle: the local APIC's vector first (QEMU orders them the
    /// same way), else the 8259's through the ExtINT path.
    fn acknowledge_interrupt(&self) -> Option<u8> {
        let mut apics = self.apics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = apics.lapic.acknowledge() {
            return Some(v);
        }
        if !apics.lapic.pic_routed() {
            return None;
        }
        let mut pic = self.pic.lock().unwrap_or_else(|e| e.into_inner());
        pic.has_interrupt().then(|| pic.acknowledge())
    }

    /// Sleeps while the CPU is halted, until an interrupt is pending. Returns false if no
    /// interrupt can ever arrive (no timer armed, no disk I/O under way), so the halt is final.
    fn wait_for_interrupt(&mut self) -> bool {
        let started = Instant::now();
        self.clock.halt();
        let woke = loop {
            self.chipset.service(&mut self.pio, &mut self.mmio);
            self.update_timers();
            if self.interrupt_pending() {
                break true;
            }
            if self.control.pending().is_some() {
                break true;
            }
            let now = self.clock.now_ns();
            let deadline = self.next_timer_deadline(now);
            let io = self.chipset.io_in_flight();
            if deadline.is_none() && !io && !self.serial_can_interrupt() {
                break false;
            }
            let wait = deadline
                .map_or(MAX_IDLE_SLEEP, |d| {
                    Duration::from_nanos(d.saturating_sub(now))
                })
                .min(MAX_IDLE_SLEEP);
            // A disk completion or serial input ends the sleep early (while a disk request is
            // in flight the wait is on the disk, and input is taken right after).
            self.stats.halt_sleeps += 1;
            if io {
                self.chipset.wait_io(wait);
                self.feed_serial(None);
            } else {
                self.feed_serial(Some(wait));
            }
        };
        self.clock.resume();
        self.stats.halted_time += started.elapsed();
        woke
    }

    /// Whether typed input could interrupt the CPU: input is connected and the UART's
    /// received-data interrupt is enabled.
    fn serial_can_interrupt(&self) -> bool {
        if self.serial_input.is_none() {
            return false;
        }
        self.uart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rx_interrupt_enabled()
    }

    /// Counters for the run so far.
    pub fn stats(&self) -> VmStats {
        VmStats {
            engine: Some(self.engine.kind()),
            pio_devices: self.pio.stats(),
            pio_unclaimed: self.pio.unclaimed(),
            mmio_unclaimed: self.mmio.unclaimed(),
            irqs: self.irqs.iter().map(|l| (l.irq(), l.raised())).collect(),
            engine_counters: self.engine.counters(),
            tsc_hz: self.engine.tsc_hz(),
            drives: self.chipset.drive_stats(),
            io_wakeups: self.chipset.io_wakeups(),
            ..self.stats.clone()
        }
    }
}
