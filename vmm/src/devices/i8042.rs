//! The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command), with a keyboard
//! on its first port (IRQ 1) and its output port's CPU reset line.
//!
//! Modelled on the IBM PC/AT technical reference and the 8042 command set: the command byte
//! (interrupt enables, system flag, port disables, translation), self test (0xAA -> 0x55),
//! interface tests, the output port (0xD0/0xD1: bit 0 low resets the CPU), pulsing output lines
//! (0xF0-0xFF: 0xFE is how OSes reboot), writing the output buffer as the keyboard (0xD2) or the
//! auxiliary port (0xD3, raising IRQ 12). The auxiliary port has no mouse attached: bytes sent
//! to it (0xD4) go nowhere, which a PS/2 driver sees as an absent mouse.
//!
//! The keyboard answers the commands Linux's atkbd sends while probing: reset (0xFF -> ACK, BAT
//! passed), identify (0xF2 -> ACK, 0xAB 0x83: an MF2 keyboard), echo, LEDs, typematic rate,
//! scan code set, enable/disable; there are no keys to press (input arrives on the serial port).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::IrqLine;
use crate::bus::BusDevice;
use crate::control::{StopRequest, VmControl};

/// Data port; the status/command port is 0x64.
pub const I8042_DATA_PORT: u16 = 0x60;
/// Status (read) and command (write) port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// ISA IRQ of the keyboard.
pub const KEYBOARD_IRQ: u8 = 1;
/// ISA IRQ of the auxiliary (mouse) port.
pub const AUX_IRQ: u8 = 12;

const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;
const STATUS_AUX: u8 = 0x20;

const CMD_KBD_INT: u8 = 0x01;
const CMD_AUX_INT: u8 = 0x02;
const CMD_SYS: u8 = 0x04;
const CMD_KBD_DISABLE: u8 = 0x10;
const CMD_AUX_DISABLE: u8 = 0x20;
const CMD_XLATE: u8 = 0x40;

const KBD_ACK: u8 = 0xFA;

/// What the next byte written to the data port is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataFor {
    Keyboard,
    CommandByte,
    OutputPort,
    KeyboardBuffer,
    AuxBuffer,
    AuxDevice,
    /// A parameter of a keyboard command (0xED LEDs, 0xF0 scan set, 0xF3 typematic).
    KeyboardParameter(u8),
}

/// The controller and its keyboard.
#[derive(Debug, Clone)]
pub struct I8042 {
    command_byte: u8,
    status_cmd: bool,
    data_for: DataFor,
    /// Bytes waiting for the CPU; `true` for bytes from the auxiliary port.
    output: VecDeque<(u8, bool)>,
    output_port: u8,
    scan_set: u8,
    keyboard_enabled: bool,
    /// The last byte read, which the data port returns again while the buffer is empty.
    last: Option<u8>,
}

/// Interrupt lines to pulse after an access.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pulses {
    /// IRQ 1.
    pub keyboard: bool,
    /// IRQ 12.
    pub aux: bool,
    /// The output port's reset line went low: the CPU resets.
    pub reset: bool,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    /// The controller as a PC BIOS leaves it: keyboard interrupt on, translation on, system flag
    /// set (POST passed), the reset line high (output port bit 0) and A20 enabled (bit 1).
    pub fn new() -> Self {
        Self {
            command_byte: CMD_KBD_INT | CMD_SYS | CMD_XLATE,
            status_cmd: false,
            data_for: DataFor::Keyboard,
            output: VecDeque::new(),
            output_port: 0x03,
            scan_set: 2,
            keyboard_enabled: true,
            last: None,
        }
    }

    /// The status register.
    pub fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if self.command_byte & CMD_SYS != 0 {
            s |= STATUS_SYS;
        }
        if self.status_cmd {
            s |= STATUS_CMD;
        }
        if let Some((_, aux)) = self.output.front() {
            s |= STATUS_OBF;
            if *aux {
                s |= STATUS_AUX;
            }
        }
        s
    }

    /// Queues a byte for the CPU; returns the interrupt to raise for it if it is now at the
    /// head of the buffer.
    fn push(&mut self, byte: u8, aux: bool) -> Pulses {
        self.output.push_back((byte, aux));
        if self.output.len() == 1 {
            self.head_interrupt()
        } else {
            Pulses::default()
        }
    }

    fn head_interrupt(&self) -> Pulses {
        match self.output.front() {
            Some((_, false)) if self.command_byte & CMD_KBD_INT != 0 => Pulses {
                keyboard: true,
                ..Pulses::default()
            },
            Some((_, true)) if self.command_byte & CMD_AUX_INT != 0 => Pulses {
                aux: true,
                ..Pulses::default()
            },
            _ => Pulses::default(),
        }
    }

    /// A read of the data port: the head of the output buffer (the last byte again if empty,
    /// as the controller's buffer register keeps it).
    pub fn read_data(&mut self) -> (u8, Pulses) {
        match self.output.pop_front() {
            Some((b, _)) => {
                self.last = Some(b);
                (b, self.head_interrupt())
            }
            None => (self.last.unwrap_or(0), Pulses::default()),
        }
    }

    /// A write to the command port.
    pub fn write_command(&mut self, cmd: u8) -> Pulses {
        self.status_cmd = true;
        self.data_for = DataFor::Keyboard;
        match cmd {
            0x20 => return self.push(self.command_byte, false),
            0x60 => self.data_for = DataFor::CommandByte,
            0xA7 => self.command_byte |= CMD_AUX_DISABLE,
            0xA8 => self.command_byte &= !CMD_AUX_DISABLE,
            0xA9 | 0xAB => return self.push(0x00, false), // interface test: no error
            0xAA => {
                // Self test: passes, and leaves the controller as after power-on (the system
                // flag is set by a passing test).
                self.command_byte |= CMD_SYS;
                return self.push(0x55, false);
            }
            0xAD => self.command_byte |= CMD_KBD_DISABLE,
            0xAE => self.command_byte &= !CMD_KBD_DISABLE,
            0xC0 => return self.push(0x80, false), // input port: keyboard not inhibited
            0xD0 => return self.push(self.output_port, false),
            0xD1 => self.data_for = DataFor::OutputPort,
            0xD2 => self.data_for = DataFor::KeyboardBuffer,
            0xD3 => self.data_for = DataFor::AuxBuffer,
            0xD4 => self.data_for = DataFor::AuxDevice,
            0xF0..=0xFF => {
                // Pulse the output lines whose bits are clear in the low nibble; bit 0 is the
                // CPU reset line.
                if cmd & 1 == 0 {
                    return Pulses {
                        reset: true,
                        ..Pulses::default()
                    };
                }
            }
            _ => tracing::debug!("i8042: command {cmd:#04x} is not modelled; ignored"),
        }
        Pulses::default()
    }

    /// A write to the data port.
    pub fn write_data(&mut self, v: u8) -> Pulses {
        self.status_cmd = false;
        let target = std::mem::replace(&mut self.data_for, DataFor::Keyboard);
        match target {
            DataFor::CommandByte => {
                self.command_byte = v;
                // Newly enabled interrupts fire for a byte already waiting.
                return self.head_interrupt();
            }
            DataFor::OutputPort => {
                self.output_port = v;
                if v & 1 == 0 {
                    return Pulses {
                        reset: true,
                        ..Pulses::default()
                    };
                }
            }
            DataFor::KeyboardBuffer => return self.push(v, false),
            DataFor::AuxBuffer => return self.push(v, true),
            DataFor::AuxDevice => {
                tracing::trace!("i8042: byte {v:#04x} to the absent auxiliary device");
            }
            DataFor::KeyboardParameter(cmd) => {
                if cmd == 0xF0 && v == 0 {
                    let mut p = self.push(KBD_ACK, false);
                    let q = self.push(self.scan_set, false);
                    p.keyboard |= q.keyboard;
                    return p;
                }
                if cmd == 0xF0 && (1..=3).contains(&v) {
                    self.scan_set = v;
                }
                return self.push(KBD_ACK, false);
            }
            DataFor::Keyboard => {
                // Writing to the keyboard re-enables its interface, as on the 8042.
                self.command_byte &= !CMD_KBD_DISABLE;
                return self.keyboard_command(v);
            }
        }
        Pulses::default()
    }

    fn keyboard_command(&mut self, v: u8) -> Pulses {
        let replies: &[u8] = match v {
            0xED | 0xF0 | 0xF3 => {
                self.data_for = DataFor::KeyboardParameter(v);
                &[KBD_ACK]
            }
            0xEE => &[0xEE],
            0xF2 => &[KBD_ACK, 0xAB, 0x83],
            0xF4 => {
                self.keyboard_enabled = true;
                &[KBD_ACK]
            }
            0xF5 => {
                self.keyboard_enabled = false;
                &[KBD_ACK]
            }
            0xF6 => {
                self.keyboard_enabled = true;
                self.scan_set = 2;
                &[KBD_ACK]
            }
            0xFF => {
                self.keyboard_enabled = true;
                self.scan_set = 2;
                &[KBD_ACK, 0xAA]
            }
            0xF7..=0xFD => &[KBD_ACK],
            _ => &[0xFE], // resend: not a command
        };
        let mut pulses = Pulses::default();
        for b in replies {
            pulses.keyboard |= self.push(*b, false).keyboard;
        }
        pulses
    }
}

/// One of the controller's two ports on the bus (they are not adjacent: port B sits between),
/// raising IRQ 1 and 12 and asking the VM to reset.
pub struct I8042Port {
    chip: Arc<Mutex<I8042>>,
    command_port: bool,
    keyboard_irq: IrqLine,
    aux_irq: IrqLine,
    control: VmControl,
}

impl I8042Port {
    /// The data port (0x60) and the status/command port (0x64) of one controller, wired to its
    /// interrupt lines and to the VM's reset request.
    pub fn pair(keyboard_irq: IrqLine, aux_irq: IrqLine, control: VmControl) -> (Self, Self) {
        let chip = Arc::new(Mutex::new(I8042::new()));
        let port = |command_port| Self {
            chip: chip.clone(),
            command_port,
            keyboard_irq: keyboard_irq.clone(),
            aux_irq: aux_irq.clone(),
            control: control.clone(),
        };
        (port(false), port(true))
    }

    fn apply(&self, p: Pulses) {
        if p.keyboard {
            self.keyboard_irq.raise();
        }
        if p.aux {
            self.aux_irq.raise();
        }
        if p.reset {
            self.control.request_stop(StopRequest::Reset);
        }
    }
}

impl BusDevice for I8042Port {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let (v, p) = {
            let mut chip = self.chip.lock().unwrap_or_else(|e| e.into_inner());
            if self.command_port {
                (chip.status(), Pulses::default())
            } else {
                chip.read_data()
            }
        };
        data.fill(0xFF);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
        self.apply(p);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(v) = data.first().copied() else {
            return;
        };
        let p = {
            let mut chip = self.chip.lock().unwrap_or_else(|e| e.into_inner());
            if self.command_port {
                chip.write_command(v)
            } else {
                chip.write_data(v)
            }
        };
        self.apply(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(c: &mut I8042) -> Vec<u8> {
        let mut out = Vec::new();
        while c.status() & STATUS_OBF != 0 {
            out.push(c.read_data().0);
        }
        out
    }

    #[test]
    fn self_test_and_interface_tests_pass() {
        let mut c = I8042::new();
        c.write_command(0xAA);
        assert_eq!(
            c.status() & (STATUS_OBF | STATUS_CMD),
            STATUS_OBF | STATUS_CMD
        );
        assert_eq!(drain(&mut c), [0x55]);
        c.write_command(0xAB);
        c.write_command(0xA9);
        assert_eq!(drain(&mut c), [0x00, 0x00]);
        assert_ne!(c.status() & STATUS_SYS, 0);
    }

    #[test]
    fn command_byte_reads_back_and_controls_interrupts() {
        let mut c = I8042::new();
        c.write_command(0x20);
        assert_eq!(drain(&mut c), [0x45]);
        c.write_command(0x60);
        assert_eq!(c.write_data(0x00), Pulses::default());
        // Keyboard interrupts off: replies queue silently.
        assert_eq!(c.write_data(0xF2), Pulses::default());
        assert_eq!(drain(&mut c), [KBD_ACK, 0xAB, 0x83]);
        c.write_command(0x60);
        c.write_data(CMD_KBD_INT);
        assert!(c.write_data(0xEE).keyboard);
        assert_eq!(c.status() & STATUS_CMD, 0, "last write was data");
        // Each byte read with another behind it re-raises IRQ 1.
        assert!(
            !c.write_data(0xF2).keyboard,
            "buffer not empty: no new edge"
        );
        let (b, p) = c.read_data();
        assert_eq!((b, p.keyboard), (0xEE, true));
    }

    #[test]
    fn keyboard_reset_and_parameters() {
        let mut c = I8042::new();
        c.write_data(0xFF);
        assert_eq!(drain(&mut c), [KBD_ACK, 0xAA]);
        c.write_data(0xED);
        c.write_data(0x07);
        assert_eq!(drain(&mut c), [KBD_ACK, KBD_ACK]);
        c.write_data(0xF0);
        c.write_data(0x00);
        assert_eq!(drain(&mut c), [KBD_ACK, KBD_ACK, 2]);
        c.write_data(0xF0);
        c.write_data(0x01);
        c.write_data(0xF0);
        c.write_data(0x00);
        assert_eq!(drain(&mut c), [KBD_ACK, KBD_ACK, KBD_ACK, KBD_ACK, 1]);
        c.write_data(0x12);
        assert_eq!(drain(&mut c), [0xFE], "not a command: resend");
    }

    #[test]
    fn aux_loopback_raises_irq12_only_when_enabled() {
        let mut c = I8042::new();
        c.write_command(0xD3);
        assert_eq!(c.write_data(0x5A), Pulses::default(), "aux interrupt off");
        assert_eq!(c.status() & STATUS_AUX, STATUS_AUX);
        assert_eq!(drain(&mut c), [0x5A]);
        c.write_command(0x60);
        c.write_data(CMD_KBD_INT | CMD_AUX_INT);
        c.write_command(0xD3);
        assert!(c.write_data(0xA5).aux);
        c.write_command(0xD4);
        c.write_data(0xF2);
        assert_eq!(
            drain(&mut c),
            [0xA5],
            "nothing answers for the absent mouse"
        );
        c.write_command(0xA7);
        c.write_command(0x20);
        assert_ne!(drain(&mut c)[0] & CMD_AUX_DISABLE, 0);
    }

    #[test]
    fn reset_line_pulses_and_output_port_writes_reset() {
        let mut c = I8042::new();
        assert!(c.write_command(0xFE).reset);
        assert!(!c.write_command(0xFF).reset, "0xFF pulses nothing");
        c.write_command(0xD0);
        assert_eq!(drain(&mut c), [0x03]);
        c.write_command(0xD1);
        assert!(!c.write_data(0x03).reset, "reset line kept high");
        c.write_command(0xD1);
        assert!(c.write_data(0x02).reset);

        let control = VmControl::new();
        let (_, mut cmd) = I8042Port::pair(
            IrqLine::new(KEYBOARD_IRQ),
            IrqLine::new(AUX_IRQ),
            control.clone(),
        );
        cmd.write(0, &[0xFE]);
        assert_eq!(control.pending(), Some(StopRequest::Reset));
    }

    #[test]
    fn ports_raise_irq1_for_keyboard_replies() {
        let kbd = IrqLine::new(KEYBOARD_IRQ);
        let (mut data, mut cmd) =
            I8042Port::pair(kbd.clone(), IrqLine::new(AUX_IRQ), VmControl::new());
        data.write(0, &[0xF2]);
        assert_eq!(kbd.raised(), 1);
        let mut b = [0u8];
        cmd.read(0, &mut b);
        assert_eq!(b[0] & STATUS_OBF, STATUS_OBF);
        data.read(0, &mut b);
        assert_eq!(b[0], KBD_ACK);
        assert_eq!(kbd.raised(), 2, "the next byte raises it again");
    }
}
