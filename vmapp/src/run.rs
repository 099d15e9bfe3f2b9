//! `bt86 run`: builds the VM from the command line, runs it, and turns the outcome into an exit
//! status and a one-line reason.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use vmm::chipset::{DriveSlot, DriveSpec, IdeSlot, MAX_VIRTIO_DISKS};
use vmm::devices::ide::Media;
use vmm::{
    BootModule, BootSource, EngineError, EngineKind, RunOutcome, Vm, VmConfig, VmError, VmStats,
};

use crate::disk::{self, DiskSpec, Interface};
use crate::{ClockArg, EngineArg, OnReboot, RunArgs};
use crate::{console, status};

/// Where COM1's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialSpec {
    /// bt86's standard output.
    Stdio,
    /// A file, created or truncated.
    File(PathBuf),
    /// Discarded.
    None,
}

/// Parses `--serial`.
pub fn parse_serial(s: &str) -> Result<SerialSpec, String> {
    match s {
        "stdio" => Ok(SerialSpec::Stdio),
        "none" => Ok(SerialSpec::None),
        _ => match s.strip_prefix("file:") {
            Some("") => Err("file: needs a path, as in file:serial.log".into()),
            Some(path) => Ok(SerialSpec::File(path.into())),
            None => Err(format!(
                "'{s}' is not a serial backend: use stdio, file:PATH or none"
            )),
        },
    }
}

/// Parses `--disk`.
pub fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    DiskSpec::parse(s).map_err(|e| match e {
        disk::DiskError::BadSpec { reason, .. } => reason,
        other => other.to_string(),
    })
}

/// Opens the images and assigns slots: IDE disks in order on primary master, primary slave,
/// secondary master; the CD-ROM on the secondary channel (master if free); virtio disks on
/// PCI devices 3, 4, ... in order.
fn drives(disks: &[DiskSpec], cdrom: Option<&Path>) -> Result<Vec<DriveSpec>, Failure> {
    let virtio = disks
        .iter()
        .filter(|d| d.interface == Interface::Virtio)
        .count();
    let total = disks.len() - virtio + usize::from(cdrom.is_some());
    if total > IdeSlot::ALL.len() {
        return Err(usage(anyhow::anyhow!(
            "{total} IDE drives given; the IDE controller takes at most 4 (disks and CD-ROM together): give the others if=virtio"
        )));
    }
    if virtio > MAX_VIRTIO_DISKS {
        return Err(usage(anyhow::anyhow!(
            "{virtio} virtio disks given; bt86 has PCI slots for at most {MAX_VIRTIO_DISKS}"
        )));
    }
    let mut slots = IdeSlot::ALL.into_iter();
    let mut out = Vec::new();
    for d in disks {
        let slot = match d.interface {
            Interface::Ide => DriveSlot::Ide(slots.next().unwrap_or(IdeSlot::SecondarySlave)),
            Interface::Virtio => DriveSlot::Virtio,
        };
        out.push(DriveSpec {
            slot,
            media: Media::Disk,
            backend: d.open().map_err(|e| usage(e.into()))?,
        });
    }
    if let Some(path) = cdrom {
        let slot = slots
            .find(|s| matches!(s, IdeSlot::SecondaryMaster | IdeSlot::SecondarySlave))
            .unwrap_or(IdeSlot::SecondarySlave);
        out.push(DriveSpec {
            slot: DriveSlot::Ide(slot),
            media: Media::Cdrom,
            backend: disk::open_cdrom(path).map_err(|e| usage(e.into()))?,
        });
    }
    Ok(out)
}

/// An error with the exit status it should produce.
struct Failure {
    status: u8,
    error: anyhow::Error,
}

fn usage(error: anyhow::Error) -> Failure {
    Failure {
        status: status::USAGE,
        error,
    }
}

/// Runs `bt86 run` and returns the process exit status.
pub fn run(args: RunArgs) -> u8 {
    let stats = args.stats;
    match build_and_run(args) {
        Ok((outcome, vm_stats)) => {
            if stats {
                eprint!("{}", format_stats(&vm_stats));
            }
            report(&outcome)
        }
        Err(f) => {
            eprintln!("bt86: {:#}", f.error);
            f.status
        }
    }
}

fn read_input(what: &str, path: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))
        .map_err(usage)
}

/// A module argument "FILE ARGS...": the file is the first word, the string is the whole text.
fn read_module(spec: &str) -> Result<BootModule, Failure> {
    let file = spec.split_whitespace().next().unwrap_or("");
    if file.is_empty() {
        return Err(usage(anyhow::anyhow!("--module needs a file name")));
    }
    Ok(BootModule {
        data: read_input("module", Path::new(file))?,
        string: spec.to_string(),
    })
}

fn serial_writer(spec: &SerialSpec) -> Result<Box<dyn Write + Send>, Failure> {
    Ok(match spec {
        SerialSpec::Stdio => Box::new(std::io::stdout()),
        SerialSpec::None => Box::new(std::io::sink()),
        SerialSpec::File(path) => Box::new(BufWriter::new(
            File::create(path)
                .with_context(|| format!("cannot create serial output file {}", path.display()))
                .map_err(usage)?,
        )),
    })
}

fn build_and_run(args: RunArgs) -> Result<(RunOutcome, VmStats), Failure> {
    let engine = match args.engine {
        EngineArg::Kvm => EngineKind::Kvm,
        EngineArg::Interp => EngineKind::Interp,
        EngineArg::Bt => EngineKind::Bt,
    };
    let (boot, what, path) = match (&args.kernel, &args.bios) {
        (Some(_), Some(_)) => {
            return Err(usage(anyhow::anyhow!(
                "give either a kernel or a firmware image (--bios), not both"
            )));
        }
        (Some(kernel), _) => {
            let data = read_input("kernel", kernel)?;
            if vmm::loader::linux::is_linux(&data) {
                if !args.module.is_empty() {
                    return Err(usage(anyhow::anyhow!(
                        "kernel {} is a Linux kernel: --module is for multiboot kernels (use --initrd)",
                        kernel.display()
                    )));
                }
                let initrd = match &args.initrd {
                    Some(path) => Some(read_input("initrd", Path::new(path))?),
                    None => None,
                };
                let boot = BootSource::Linux {
                    kernel: data,
                    initrd,
                    cmdline: args.append.clone(),
                };
                (boot, "kernel", kernel.clone())
            } else {
                let mut modules = Vec::new();
                if let Some(initrd) = &args.initrd {
                    modules.push(read_module(initrd)?);
                }
                for m in &args.module {
                    modules.push(read_module(m)?);
                }
                let boot = BootSource::Multiboot {
                    kernel: data,
                    name: kernel.display().to_string(),
                    cmdline: args.append.clone(),
                    modules,
                };
                (boot, "kernel", kernel.clone())
            }
        }
        (None, Some(bios)) => {
            let boot = BootSource::Firmware {
                image: read_input("firmware", bios)?,
            };
            (boot, "firmware", bios.clone())
        }
        (None, None) => {
            return Err(usage(anyhow::anyhow!(
                "give --kernel FILE or --bios FILE (on the command line or in --config)"
            )));
        }
    };
    // One serial backend for every boot of the machine: a reboot continues the same log.
    let serial = SharedWriter(Arc::new(Mutex::new(serial_writer(&args.serial)?)));
    // The terminal (or whatever stdin is) types into COM1 when COM1 prints to stdout.
    let slot: console::ControlSlot = Arc::default();
    console::watch_signals(slot.clone());
    let (_console, mut input) = if args.serial == SerialSpec::Stdio {
        let (console, rx) = console::start(slot.clone());
        (Some(console), Some(rx))
    } else {
        (None, None)
    };
    loop {
        // The drives are opened (and locked) for each boot; the previous boot's VM is gone.
        let drives = drives(&args.disk, args.cdrom.as_deref())?;
        let config = VmConfig {
            drives,
            memory_mib: args.memory,
            engine,
            boot: boot.clone(),
            serial: Box::new(serial.clone()),
            serial_input: input.take(),
            lockstep: args.lockstep.is_some(),
            apparent_time: args.clock == ClockArg::Apparent,
            trace: args.trace.then(|| {
                Box::new(BufWriter::with_capacity(1 << 16, std::io::stderr()))
                    as Box<dyn Write + Send>
            }),
        };
        let mut vm = Vm::new(config).map_err(|e| classify(e, what, &path))?;
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(vm.control());
        let outcome = vm.run().map_err(|e| classify(e, what, &path));
        let _ = serial.clone().flush();
        let outcome = outcome?;
        input = vm.take_serial_input();
        if outcome == RunOutcome::Reset && args.on_reboot == OnReboot::Restart {
            tracing::info!("the guest rebooted; starting it again (--on-reboot restart)");
            continue;
        }
        return Ok((outcome, vm.stats()));
    }
}

/// A writer several owners share (the serial backend across reboots).
#[derive(Clone)]
struct SharedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

/// Chooses the exit status for a VM error and words it for the user.
fn classify(e: VmError, what: &str, path: &Path) -> Failure {
    let status = match &e {
        VmError::Kernel(_) | VmError::Linux(_) | VmError::Firmware(_) => status::USAGE,
        VmError::Memory(vmdriver_err) if is_config_error(vmdriver_err) => status::USAGE,
        VmError::Engine(EngineError::NoTrace(_) | EngineError::NoLockstep(_)) => status::USAGE,
        VmError::Engine(EngineError::Diverged(_)) => status::DIVERGED,
        _ => status::INTERNAL,
    };
    let error = match e {
        VmError::Kernel(_) | VmError::Linux(_) | VmError::Firmware(_) => {
            anyhow::Error::new(e).context(format!("{what} {}", path.display()))
        }
        _ => anyhow::Error::new(e),
    };
    Failure { status, error }
}

fn is_config_error(e: &vmdriver::MemoryError) -> bool {
    matches!(e, vmdriver::MemoryError::UnsupportedSize { .. })
}

/// Prints the reason a run ended (when it is not the guest's own choice) and returns the status.
fn report(outcome: &RunOutcome) -> u8 {
    match outcome {
        RunOutcome::DebugExit { value } => ((value << 1) | 1) as u8,
        RunOutcome::PowerOff => status::POWER_OFF,
        RunOutcome::Stopped => {
            eprintln!("bt86: stopped at the user's request");
            status::STOPPED
        }
        RunOutcome::Reset => {
            eprintln!("bt86: the guest rebooted; the VM is stopped (--on-reboot stop)");
            status::POWER_OFF
        }
        RunOutcome::TripleFault { regs } => {
            let at = regs.map(|r| format!(" ({r})")).unwrap_or_default();
            eprintln!("bt86: the guest triple-faulted (CPU shutdown); the VM is stopped{at}");
            status::TRIPLE_FAULT
        }
        RunOutcome::Halted {
            interrupts_enabled,
            regs,
        } => {
            let at = regs.map(|r| format!(" ({r})")).unwrap_or_default();
            let why = if *interrupts_enabled {
                "no device of this VM can interrupt it yet"
            } else {
                "interrupts are disabled"
            };
            eprintln!(
                "bt86: the guest halted and nothing can wake it ({why}); the VM is stopped{at}"
            );
            status::HALTED
        }
    }
}

/// The `--stats` report.
fn format_stats(s: &VmStats) -> String {
    let mut out = String::new();
    let engine = s.engine.map_or("none", EngineKind::name);
    out += &format!("bt86 statistics (engine {engine})\n");
    out += &format!(
        "  run time             {:.3} ms\n",
        s.run_time.as_secs_f64() * 1e3
    );
    out += &format!(
        "  exits                io {}, halt {}, shutdown {}, interrupted {}\n",
        s.io_exits, s.halt_exits, s.shutdown_exits, s.interrupted_exits
    );
    out += &format!(
        "  interrupts           {} injected, {} timer ticks, {:.3} ms halted\n",
        s.interrupts_injected,
        s.timer_ticks,
        s.halted_time.as_secs_f64() * 1e3
    );
    out += &format!("  halted sleeps        {}\n", s.halt_sleeps);
    out += &format!("  host switches vol    {}\n", s.host_switches.0);
    out += &format!("  host switches invol  {}\n", s.host_switches.1);
    match s.tsc_hz {
        Some(hz) => out += &format!("  guest TSC rate       {hz} Hz\n"),
        None => out += "  guest TSC rate       unknown\n",
    }
    for (name, value) in &s.engine_counters {
        out += &format!("  {name:<20} {value}\n");
    }
    if let (Some(n), secs) = (
        s.engine_counters
            .iter()
            .find(|(name, _)| *name == "guest instructions")
            .map(|(_, v)| *v),
        s.run_time.as_secs_f64(),
    ) && secs > 0.0
    {
        out += &format!("  instructions/s       {:.0}\n", n as f64 / secs);
    }
    out += "  port devices         reads / writes\n";
    for d in &s.pio_devices {
        out += &format!(
            "    {:<18} {:#06x} {} / {}\n",
            d.name, d.base, d.reads, d.writes
        );
    }
    out += &format!(
        "  unclaimed ports      {} / {}\n  unclaimed MMIO       {} / {}\n",
        s.pio_unclaimed.0, s.pio_unclaimed.1, s.mmio_unclaimed.0, s.mmio_unclaimed.1
    );
    for (irq, n) in &s.irqs {
        out += &format!("  irq {irq:<16} raised {n}\n");
    }
    if !s.drives.is_empty() {
        out += &format!("  io wakeups           {}\n", s.io_wakeups);
    }
    for d in &s.drives {
        out += &format!(
            "  drive {}: {} reads ({} bytes), {} writes ({} bytes), {} flushes\n",
            d.name, d.reads, d.bytes_read, d.writes, d.bytes_written, d.flushes
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_specs_parse() {
        assert_eq!(parse_serial("stdio"), Ok(SerialSpec::Stdio));
        assert_eq!(parse_serial("none"), Ok(SerialSpec::None));
        assert_eq!(
            parse_serial("file:/tmp/x"),
            Ok(SerialSpec::File("/tmp/x".into()))
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp:1234").unwrap_err().contains("stdio"));
    }

    #[test]
    fn debug_exit_status_is_odd_and_wraps_like_qemu() {
        assert_eq!(report(&RunOutcome::DebugExit { value: 3 }), 7);
        assert_eq!(report(&RunOutcome::DebugExit { value: 0 }), 1);
        assert_eq!(report(&RunOutcome::DebugExit { value: 0x80 }), 1);
        assert_eq!(report(&RunOutcome::PowerOff), 0);
    }

    #[test]
    fn stats_report_names_every_counter() {
        let s = VmStats {
            engine: Some(EngineKind::Kvm),
            io_exits: 42,
            irqs: vec![(4, 2)],
            ..Default::default()
        };
        let text = format_stats(&s);
        assert!(text.contains("engine kvm"), "{text}");
        assert!(text.contains("io 42"), "{text}");
        assert!(text.contains("irq 4"), "{text}");
    }
}
