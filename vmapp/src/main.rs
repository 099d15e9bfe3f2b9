//! `bt86`: runs unmodified 32-bit x86 guests by binary translation, interpretation, or KVM.

mod bench;
mod config;
mod console;
mod disk;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// Process exit statuses bt86 itself chooses. Guest debug-exit statuses are always odd
/// (`(value << 1) | 1`), so bt86's own are even and never collide with them.
pub mod status {
    /// The guest powered off.
    pub const POWER_OFF: u8 = 0;
    /// The command line or an input file is wrong.
    pub const USAGE: u8 = 2;
    /// The guest triple-faulted.
    pub const TRIPLE_FAULT: u8 = 4;
    /// The guest halted with nothing able to wake it.
    pub const HALTED: u8 = 6;
    /// bt86 or the host failed (not the guest's doing).
    pub const INTERNAL: u8 = 8;
    /// The user stopped the VM (the console's Ctrl-A X, or a signal).
    pub const STOPPED: u8 = 10;
    /// Lockstep mode found bt and the interpreter in different states (a translator bug).
    pub const DIVERGED: u8 = 12;
}

/// bt86 runs unmodified 32-bit x86 operating systems on x86-64 Linux, by binary translation
/// (no VT-x/AMD-V needed), by interpretation, or on KVM for comparison.
#[derive(Debug, Parser)]
#[command(name = "bt86", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a guest and run it until it stops.
    ///
    /// Exit status: the guest's isa-debug-exit status ((value << 1) | 1, as QEMU), 0 when the
    /// guest powers off, 2 for a bad command line or input file, 4 when the guest triple-faults,
    /// 6 when it halts with nothing able to wake it, 8 when bt86 or the host fails, 10 when the
    /// user stops it (Ctrl-A X on the console, or a signal), 12 when --lockstep finds bt and the
    /// interpreter in different states. A guest reboot ends the run with 0 unless --on-reboot
    /// restart.
    Run(RunArgs),
    /// Compare engines: run the same guest workloads under each engine in one run and report
    /// per-operation times and ratios to a baseline.
    ///
    /// Examples: bt86 bench --suite nano --engines bt,interp,kvm,qemu-tcg --runs 5 --json out.json;
    /// bt86 bench --suite linux --engines bt,qemu-tcg,native (the Debian guest from
    /// scripts/fetch-guest.sh); scripts/bench-docs.sh regenerates docs/performance.md.
    Bench(bench::BenchArgs),
}

/// The reference engine of --lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LockstepArg {
    /// The IA-32 interpreter.
    Interp,
}

/// Which engine runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EngineArg {
    /// KVM (needs /dev/kvm; hardware-assisted on hosts with VT-x or AMD-V).
    Kvm,
    /// The IA-32 interpreter: every mode and instruction, one at a time (slow; needs nothing
    /// from the host).
    Interp,
    /// The binary translator: 32-bit protected-mode code as translated host code, the
    /// interpreter for every other mode.
    Bt,
}

/// What a guest reboot does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnReboot {
    /// End the run (exit status 0), like QEMU's -no-reboot.
    Stop,
    /// Boot the same guest again in a fresh machine.
    Restart,
}

/// What the guest's clocks count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ClockArg {
    /// Host monotonic time: the guest's timers and TSC keep pace with the host's clock.
    Host,
    /// Apparent time (bt and interp): time the host did not run the vCPU is left out, so
    /// measurements the guest makes (Linux's TSC calibrations) are not disturbed by host load;
    /// the guest's clock then falls behind the host's by that time.
    Apparent,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Kernel to boot, recognised by its contents: a Linux bzImage (32-bit boot protocol), or a
    /// multiboot v1 kernel (ELF32, or a flat image with the a.out kludge).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present_any = ["bios", "config"],
        conflicts_with = "bios"
    )]
    kernel: Option<PathBuf>,

    /// Kernel command line. A multiboot kernel sees "FILE TEXT", its file name first, as under
    /// QEMU and GRUB; Linux sees TEXT.
    #[arg(long, value_name = "TEXT", default_value = "")]
    append: String,

    /// Multiboot module: a file, optionally followed by arguments ("FILE ARGS..."); the whole
    /// text is the module's string. Repeat for more modules, in order.
    #[arg(long, value_name = "FILE[ ARGS]")]
    module: Vec<String>,

    /// Initial ramdisk. Linux gets it through the boot protocol; for a multiboot kernel it
    /// becomes the first module, as with QEMU.
    #[arg(long, value_name = "FILE")]
    initrd: Option<String>,

    /// Firmware image (at most 256 KiB) to start at the x86 reset vector, instead of a kernel.
    #[arg(long, value_name = "FILE")]
    bios: Option<PathBuf>,

    /// Guest RAM in MiB (2 to 3072).
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    memory: u64,

    /// Engine that runs guest code. The binary translator is the default: it runs any guest
    /// the interpreter runs (it hands the interpreter what it does not translate), much faster.
    #[arg(long, value_enum, default_value_t = EngineArg::Bt)]
    engine: EngineArg,

    /// Where the guest's COM1 output goes: "stdio", "file:PATH", or "none". With stdio, what is
    /// typed on stdin goes to COM1 (a terminal is put in raw mode; Ctrl-A X quits).
    #[arg(long, value_name = "stdio|file:PATH|none", default_value = "stdio", value_parser = run::parse_serial)]
    serial: run::SerialSpec,

    /// What happens when the guest reboots (the keyboard controller's reset line).
    #[arg(long, value_enum, default_value_t = OnReboot::Stop)]
    on_reboot: OnReboot,

    /// What the guest's clocks (PIT, RTC, PM timer, local APIC timer, TSC) count.
    #[arg(long, value_enum, default_value_t = ClockArg::Host)]
    clock: ClockArg,

    /// Log every instruction the interpreter executes to stderr: address, disassembly, and the
    /// registers it changed (interp engine only; slow).
    #[arg(long)]
    trace: bool,

    /// Run the interpreter side by side with bt (--engine bt only; slow): every translated unit,
    /// and every instruction bt interprets, is checked against the interpreter on its own copy
    /// of guest memory, and the run stops at the first step after which their states differ,
    /// printing both (exit status 12). Devices run once; the interpreter gets the same inputs.
    #[arg(long, value_enum, value_name = "ENGINE")]
    lockstep: Option<LockstepArg>,

    /// A hard disk image:
    /// FILE[,format=raw|qcow2][,readonly][,cache=writeback|writethrough][,overlay=FILE]
    /// [,if=ide|virtio]. if=ide (the default) attaches it to the IDE controller: repeat for
    /// more disks, primary master, primary slave, then secondary master. if=virtio makes it a
    /// virtio block device on the PCI bus (Linux: /dev/vda, vdb, ...), faster for guests with
    /// the virtio_blk driver. The image
    /// is locked while bt86 runs. cache=writeback (the default) makes writes durable when the
    /// guest flushes its disk cache; cache=writethrough after every write. overlay=FILE keeps
    /// the guest's writes in FILE (created if missing) and never modifies the image.
    #[arg(long, value_name = "FILE[,OPTIONS]", value_parser = run::parse_disk)]
    disk: Vec<disk::DiskSpec>,

    /// An ISO 9660 image in an ATAPI CD-ROM drive on the secondary IDE channel (read-only).
    #[arg(long, value_name = "FILE")]
    cdrom: Option<PathBuf>,

    /// Print counters that explain the run (exits, device accesses, interrupts) to stderr at
    /// the end.
    #[arg(long)]
    stats: bool,

    /// Read settings from a TOML file: the keys are these flags' names (kernel, append,
    /// initrd, memory, engine, disk, cdrom, serial, on-reboot, ...; see the user guide); flags
    /// given on the command line override the file; relative paths are relative to the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BT86_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let code = match cli.command {
        Command::Run(mut args) => {
            let run_matches = matches.subcommand_matches("run");
            let given = |id: &str| {
                run_matches.and_then(|m| m.value_source(id)) == Some(ValueSource::CommandLine)
            };
            match args.config.clone() {
                Some(path) => match config::apply(&path, &mut args, &given) {
                    Ok(()) => run::run(args),
                    Err(e) => {
                        eprintln!("bt86: {e}");
                        status::USAGE
                    }
                },
                None => run::run(args),
            }
        }
        Command::Bench(args) => match bench::bench(args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("bt86 bench: {e:#}");
                status::USAGE
            }
        },
    };
    ExitCode::from(code)
}
