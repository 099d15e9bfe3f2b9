//! The packet command set of an ATAPI CD-ROM drive (MMC-3 / SPC-3 commands carried in 12-byte
//! packets): what each command answers and the drive's sense, tray and media-event state. The
//! transport (the PACKET command, DRQ blocks, byte counts, DMA) is [`super::ide`]'s business;
//! reading the medium is the I/O thread's.
//!
//! Implemented: TEST UNIT READY, REQUEST SENSE, INQUIRY, READ CAPACITY, READ(10), READ(12),
//! SEEK(10), READ TOC/PMA/ATIP (formats 0, 1, 2), MODE SENSE(10) (pages 01h, 0Dh, 2Ah, 3Fh),
//! GET EVENT STATUS NOTIFICATION (media class), GET CONFIGURATION (profile list, core,
//! removable medium, random readable, CD read), START STOP UNIT (eject / load), PREVENT ALLOW
//! MEDIUM REMOVAL, SET CD SPEED. Anything else fails with ILLEGAL REQUEST / INVALID COMMAND
//! OPERATION CODE, as a real drive answers opcodes it does not know.

/// Bytes in a CD-ROM logical block.
pub const CD_BLOCK: u64 = 2048;

/// SCSI sense keys.
pub mod key {
    /// No error.
    pub const NO_SENSE: u8 = 0x0;
    /// The unit cannot answer now (no medium).
    pub const NOT_READY: u8 = 0x2;
    /// The medium could not be read.
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// A field of the command is wrong.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// The medium changed or the unit was reset.
    pub const UNIT_ATTENTION: u8 = 0x6;
}

/// Sense data: key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

impl Sense {
    const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Self { key, asc, ascq }
    }
}

/// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0);
/// ILLEGAL REQUEST, INVALID FIELD IN CDB.
pub const INVALID_FIELD: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0);
/// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0);
/// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED.
pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0);
/// ILLEGAL REQUEST, MEDIUM REMOVAL PREVENTED.
pub const REMOVAL_PREVENTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x53, 0x02);
/// NOT READY, MEDIUM NOT PRESENT - TRAY OPEN.
pub const TRAY_OPEN: Sense = Sense::new(key::NOT_READY, 0x3A, 0x02);
/// UNIT ATTENTION, POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
pub const POWER_ON: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0);
/// UNIT ATTENTION, NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED.
pub const MEDIUM_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x28, 0);
/// MEDIUM ERROR, UNRECOVERED READ ERROR.
pub const READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0);

/// Media event codes of GET EVENT STATUS NOTIFICATION.
pub mod event {
    /// Nothing changed.
    pub const NONE: u8 = 0;
    /// A medium was inserted (or found at power-on).
    pub const NEW_MEDIA: u8 = 2;
    /// The medium was removed.
    pub const MEDIA_REMOVAL: u8 = 3;
}

/// What the transport must do for a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Complete without data.
    Done,
    /// Send these bytes to the host, then complete.
    Data(Vec<u8>),
    /// Read `blocks` 2048-byte blocks from `lba` and send them.
    Read {
        /// First block.
        lba: u64,
        /// Blocks (at least 1).
        blocks: u64,
    },
    /// Fail with the sense now in [`Atapi::sense`].
    Error,
}

/// The drive's state.
#[derive(Debug, Clone)]
pub struct Atapi {
    blocks: u64,
    tray_open: bool,
    locked: bool,
    /// A unit attention waiting to be reported.
    attention: Option<Sense>,
    /// The media event waiting for GET EVENT STATUS NOTIFICATION.
    media_event: u8,
    /// Sense of the last command.
    sense: Sense,
}

impl Atapi {
    /// A drive at power-on holding a medium of `bytes` bytes: it reports the power-on unit
    /// attention first, and a new-media event.
    pub fn new(bytes: u64) -> Self {
        Self {
            blocks: bytes / CD_BLOCK,
            tray_open: false,
            locked: false,
            attention: Some(POWER_ON),
            media_event: event::NEW_MEDIA,
            sense: Sense::default(),
        }
    }

    /// The medium's size in blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The sense of the last command.
    pub fn sense(&self) -> Sense {
        self.sense
    }

    /// Whether a medium can be read.
    pub fn ready(&self) -> bool {
        !self.tray_open
    }

    /// Records that reading the medium failed.
    pub fn read_failed(&mut self) {
        self.sense = READ_ERROR;
    }

    /// A device or bus reset: it is reported as a unit attention.
    pub fn reset(&mut self) {
        self.attention = Some(POWER_ON);
        self.locked = false;
    }

    fn fail(&mut self, sense: Sense) -> Packet {
        self.sense = sense;
        Packet::Error
    }

    fn ok(&mut self, p: Packet) -> Packet {
        self.sense = Sense::default();
        p
    }

    /// Executes the command in `cdb`.
    pub fn execute(&mut self, cdb: &[u8; 12]) -> Packet {
        let op = cdb[0];
        // Commands that work whatever the unit's state, and never report a unit attention.
        match op {
            0x03 => return self.request_sense(cdb),
            0x12 => return self.inquiry(cdb),
            0x4A => return self.event_status(cdb),
            0x46 => return self.configuration(cdb),
            _ => {}
        }
        if let Some(ua) = self.attention.take() {
            return self.fail(ua);
        }
        match op {
            0x00 => {
                if self.tray_open {
                    return self.fail(TRAY_OPEN);
                }
                self.ok(Packet::Done)
            }
            0x1B => self.start_stop(cdb),
            0x1E => {
                self.locked = cdb[4] & 1 != 0;
                self.ok(Packet::Done)
            }
            0xBB => self.ok(Packet::Done),
            0x5A => self.mode_sense(cdb),
            0x25 => {
                if self.tray_open {
                    return self.fail(TRAY_OPEN);
                }
                let last = self.blocks.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
                let mut d = last.to_be_bytes().to_vec();
                d.extend_from_slice(&(CD_BLOCK as u32).to_be_bytes());
                self.ok(Packet::Data(d))
            }
            0x28 | 0xA8 => {
                let lba = u64::from(u32::from_be_bytes([cdb[2], cdb[3], cdb[4], cdb[5]]));
                let blocks = if op == 0x28 {
                    u64::from(u16::from_be_bytes([cdb[7], cdb[8]]))
                } else {
                    u64::from(u32::from_be_bytes([cdb[6], cdb[7], cdb[8], cdb[9]]))
                };
                self.read(lba, blocks)
            }
            0x2B => {
                let lba = u64::from(u32::from_be_bytes([cdb[2], cdb[3], cdb[4], cdb[5]]));
                if self.tray_open {
                    return self.fail(TRAY_OPEN);
                }
                if lba >= self.blocks {
                    return self.fail(LBA_OUT_OF_RANGE);
                }
                self.ok(Packet::Done)
            }
            0x43 => self.read_toc(cdb),
            _ => self.fail(INVALID_OPCODE),
        }
    }

    fn read(&mut self, lba: u64, blocks: u64) -> Packet {
        if self.tray_open {
            return self.fail(TRAY_OPEN);
        }
        if lba.saturating_add(blocks) > self.blocks {
            return self.fail(LBA_OUT_OF_RANGE);
        }
        if blocks == 0 {
            return self.ok(Packet::Done);
        }
        self.ok(Packet::Read { lba, blocks })
    }

    fn request_sense(&mut self, cdb: &[u8; 12]) -> Packet {
        let sense = if self.sense.key != key::NO_SENSE {
            self.sense
        } else if let Some(ua) = self.attention.take() {
            ua
        } else if self.tray_open {
            TRAY_OPEN
        } else {
            Sense::default()
        };
        let mut d = vec![0u8; 18];
        d[0] = 0x70; // current error, fixed format
        d[2] = sense.key;
        d[7] = 10; // additional sense length
        d[12] = sense.asc;
        d[13] = sense.ascq;
        d.truncate(usize::from(cdb[4]));
        self.sense = Sense::default();
        Packet::Data(d)
    }

    fn inquiry(&mut self, cdb: &[u8; 12]) -> Packet {
        if cdb[1] & 1 != 0 {
            return self.fail(INVALID_FIELD);
        }
        let mut d = vec![0x05, 0x80, 0x00, 0x21, 31, 0, 0, 0];
        d.extend_from_slice(b"BT86    ");
        d.extend_from_slice(b"BT86 CD-ROM     ");
        d.extend_from_slice(b"0.1 ");
        d.truncate(usize::from(cdb[4]));
        self.ok(Packet::Data(d))
    }

    fn event_status(&mut self, cdb: &[u8; 12]) -> Packet {
        if cdb[1] & 1 == 0 {
            // Only polled operation is supported (as on every ATAPI drive).
            return self.fail(INVALID_FIELD);
        }
        let alloc = usize::from(u16::from_be_bytes([cdb[7], cdb[8]]));
        let mut d = if cdb[4] & 0x10 != 0 {
            let code = std::mem::replace(&mut self.media_event, event::NONE);
            let status = if self.tray_open { 0x01 } else { 0x02 };
            vec![0, 6, 0x04, 0x10, code, status, 0, 0]
        } else {
            // No event of a requested class is supported: NEA.
            vec![0, 2, 0x80, 0x10]
        };
        d.truncate(alloc);
        self.ok(Packet::Data(d))
    }

    fn configuration(&mut self, cdb: &[u8; 12]) -> Packet {
        let rt = cdb[1] & 3;
        let start = u16::from_be_bytes([cdb[2], cdb[3]]);
        let alloc = usize::from(u16::from_be_bytes([cdb[7], cdb[8]]));
        let present = !self.tray_open;
        let current = u8::from(present);
        let features: [(u16, u8, Vec<u8>); 5] = [
            // Profile list: CD-ROM.
            (0x0000, 0x03, vec![0x00, 0x08, current, 0]),
            // Core: ATAPI interface.
            (0x0001, 0x0B, vec![0, 0, 0, 2, 0, 0, 0, 0]),
            // Removable medium: tray, eject, lock.
            (0x0003, 0x03, vec![0x29, 0, 0, 0]),
            // Random readable: 2048-byte blocks, blocking 1.
            (0x0010, current, vec![0, 0, 8, 0, 0, 1, 0, 0]),
            // CD read.
            (0x001E, 0x08 | current, vec![0, 0, 0, 0]),
        ];
        let mut body = Vec::new();
        for (code, flags, data) in features {
            let wanted = match rt {
                0 => code >= start,
                1 => code >= start && flags & 1 != 0,
                2 => code == start,
                _ => return self.fail(INVALID_FIELD),
            };
            if wanted {
                body.extend_from_slice(&code.to_be_bytes());
                body.push(flags);
                body.push(data.len() as u8);
                body.extend_from_slice(&data);
            }
        }
        let profile: u16 = if present { 0x0008 } else { 0 };
        let mut d = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        d.extend_from_slice(&[0, 0]);
        d.extend_from_slice(&profile.to_be_bytes());
        d.extend_from_slice(&body);
        d.truncate(alloc);
        self.ok(Packet::Data(d))
    }

    fn start_stop(&mut self, cdb: &[u8; 12]) -> Packet {
        let start = cdb[4] & 1 != 0;
        let load_eject = cdb[4] & 2 != 0;
        if load_eject {
            if start {
                if self.tray_open {
                    self.tray_open = false;
                    self.media_event = event::NEW_MEDIA;
                    self.attention = Some(MEDIUM_CHANGED);
                }
            } else {
                if self.locked {
                    return self.fail(REMOVAL_PREVENTED);
                }
                if !self.tray_open {
                    self.tray_open = true;
                    self.media_event = event::MEDIA_REMOVAL;
                }
            }
        }
        self.ok(Packet::Done)
    }

    fn mode_sense(&mut self, cdb: &[u8; 12]) -> Packet {
        let page = cdb[2] & 0x3F;
        let control = cdb[2] >> 6;
        if control == 3 {
            return self.fail(SAVING_NOT_SUPPORTED);
        }
        let alloc = usize::from(u16::from_be_bytes([cdb[7], cdb[8]]));
        let changeable = control == 1;
        let error_recovery = {
            let mut p = vec![0x01, 0x0A, 0x00, 0x05, 0, 0, 0, 0, 0x05, 0, 0, 0];
            if changeable {
                p[2..].fill(0);
            }
            p
        };
        let cd_parameters = {
            let mut p = vec![0x0D, 0x06, 0x00, 0x00, 0x00, 60, 0x00, 75];
            if changeable {
                p[2..].fill(0);
            }
            p
        };
        let capabilities = {
            let mut p = vec![0u8; 22];
            p[0] = 0x2A;
            p[1] = 0x14;
            p[4] = 0x70; // mode 2 form 1 and 2, multi-session
            p[6] = 0x29 | if self.locked { 0x02 } else { 0 }; // tray, eject, lock (state)
            p[8..10].copy_from_slice(&706u16.to_be_bytes()); // max speed (KB/s): 4x
            p[12..14].copy_from_slice(&512u16.to_be_bytes()); // buffer KiB
            p[14..16].copy_from_slice(&706u16.to_be_bytes()); // current speed
            if changeable {
                p[2..].fill(0);
            }
            p
        };
        let pages: Vec<u8> = match page {
            0x01 => error_recovery,
            0x0D => cd_parameters,
            0x2A => capabilities,
            0x3F => [error_recovery, cd_parameters, capabilities].concat(),
            _ => return self.fail(INVALID_FIELD),
        };
        let medium = if self.tray_open { 0x71 } else { 0x01 };
        let len = (pages.len() + 6) as u16;
        let mut d = len.to_be_bytes().to_vec();
        d.extend_from_slice(&[medium, 0, 0, 0, 0, 0]);
        d.extend_from_slice(&pages);
        d.truncate(alloc);
        self.ok(Packet::Data(d))
    }

    fn read_toc(&mut self, cdb: &[u8; 12]) -> Packet {
        if self.tray_open {
            return self.fail(TRAY_OPEN);
        }
        let msf = cdb[1] & 2 != 0;
        // The format is in byte 2 (MMC); old ATAPI drivers put it in bits 7-6 of byte 9.
        let format = match cdb[2] & 0x0F {
            0 => cdb[9] >> 6,
            f => f,
        };
        let track = cdb[6];
        let alloc = usize::from(u16::from_be_bytes([cdb[7], cdb[8]]));
        let addr = |lba: u64, msf: bool| -> [u8; 4] {
            if msf {
                let (m, s, f) = lba_to_msf(lba);
                [0, m, s, f]
            } else {
                (lba as u32).to_be_bytes()
            }
        };
        let mut d = match format {
            0 => {
                if track > 1 && track != 0xAA {
                    return self.fail(INVALID_FIELD);
                }
                let mut d = vec![0, 0, 1, 1];
                if track <= 1 {
                    d.extend_from_slice(&[0, 0x14, 1, 0]);
                    d.extend_from_slice(&addr(0, msf));
                }
                d.extend_from_slice(&[0, 0x14, 0xAA, 0]);
                d.extend_from_slice(&addr(self.blocks, msf));
                d
            }
            1 => {
                let mut d = vec![0, 0, 1, 1, 0, 0x14, 1, 0];
                d.extend_from_slice(&addr(0, msf));
                d
            }
            2 => {
                let mut d = vec![0, 0, 1, 1];
                let (m, s, f) = lba_to_msf(self.blocks);
                for (point, pm, ps, pf) in [
                    (0xA0u8, 1u8, 0u8, 0u8), // first track 1, CD-ROM disc type
                    (0xA1, 1, 0, 0),         // last track 1
                    (0xA2, m, s, f),         // lead-out
                    (1, 0, 2, 0),            // track 1 at 00:02:00
                ] {
                    d.extend_from_slice(&[1, 0x14, 0, point, 0, 0, 0, 0, pm, ps, pf]);
                }
                d
            }
            _ => return self.fail(INVALID_FIELD),
        };
        let len = (d.len() - 2) as u16;
        d[..2].copy_from_slice(&len.to_be_bytes());
        d.truncate(alloc);
        self.ok(Packet::Data(d))
    }
}

/// A logical block address as minutes, seconds and frames (75 per second), counting the
/// 2-second pre-gap: LBA 0 is 00:02:00.
pub fn lba_to_msf(lba: u64) -> (u8, u8, u8) {
    let f = lba + 150;
    (
        (f / (60 * 75)).min(255) as u8,
        ((f / 75) % 60) as u8,
        (f % 75) as u8,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdb(bytes: &[u8]) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    fn ready_drive() -> Atapi {
        let mut a = Atapi::new(100 * CD_BLOCK);
        assert_eq!(a.execute(&cdb(&[0x00])), Packet::Error);
        assert_eq!(a.sense(), POWER_ON);
        a
    }

    #[test]
    fn power_on_attention_then_ready() {
        let mut a = ready_drive();
        assert_eq!(a.execute(&cdb(&[0x00])), Packet::Done);
        assert_eq!(a.sense(), Sense::default());
    }

    #[test]
    fn request_sense_reports_and_clears_the_last_error() {
        let mut a = ready_drive();
        let Packet::Data(d) = a.execute(&cdb(&[0x03, 0, 0, 0, 18])) else {
            panic!()
        };
        assert_eq!((d[0], d[2], d[12], d[13]), (0x70, 6, 0x29, 0));
        let Packet::Data(d) = a.execute(&cdb(&[0x03, 0, 0, 0, 18])) else {
            panic!()
        };
        assert_eq!(d[2], 0);
    }

    #[test]
    fn capacity_reads_and_range_checks() {
        let mut a = ready_drive();
        assert_eq!(
            a.execute(&cdb(&[0x25])),
            Packet::Data(vec![0, 0, 0, 99, 0, 0, 8, 0])
        );
        assert_eq!(
            a.execute(&cdb(&[0x28, 0, 0, 0, 0, 98, 0, 0, 2])),
            Packet::Read { lba: 98, blocks: 2 }
        );
        assert_eq!(
            a.execute(&cdb(&[0x28, 0, 0, 0, 0, 99, 0, 0, 2])),
            Packet::Error
        );
        assert_eq!(a.sense(), LBA_OUT_OF_RANGE);
        assert_eq!(
            a.execute(&cdb(&[0xA8, 0, 0, 0, 0, 5, 0, 0, 0, 3])),
            Packet::Read { lba: 5, blocks: 3 }
        );
        assert_eq!(a.execute(&cdb(&[0x28])), Packet::Done);
    }

    #[test]
    fn toc_in_lba_and_msf() {
        let mut a = ready_drive();
        let Packet::Data(d) = a.execute(&cdb(&[0x43, 0, 0, 0, 0, 0, 0, 0, 100])) else {
            panic!()
        };
        assert_eq!(
            d,
            [
                0, 18, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0, 0, 0x14, 0xAA, 0, 0, 0, 0, 100
            ]
        );
        let Packet::Data(d) = a.execute(&cdb(&[0x43, 2, 0, 0, 0, 0, 0, 0, 100])) else {
            panic!()
        };
        // Track 1 at 00:02:00, lead-out at LBA 100 + 150 = 250 frames = 00:03:25.
        assert_eq!(&d[8..12], &[0, 0, 2, 0]);
        assert_eq!(&d[16..20], &[0, 0, 3, 25]);
        // Allocation length truncates.
        let Packet::Data(d) = a.execute(&cdb(&[0x43, 0, 0, 0, 0, 0, 0, 0, 4])) else {
            panic!()
        };
        assert_eq!(d, [0, 18, 1, 1]);
        assert_eq!(
            a.execute(&cdb(&[0x43, 0, 0, 0, 0, 0, 2, 0, 100])),
            Packet::Error
        );
    }

    #[test]
    fn eject_load_and_media_events() {
        let mut a = ready_drive();
        let gesn = cdb(&[0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8]);
        assert_eq!(
            a.execute(&gesn),
            Packet::Data(vec![0, 6, 4, 0x10, 2, 2, 0, 0])
        );
        assert_eq!(
            a.execute(&gesn),
            Packet::Data(vec![0, 6, 4, 0x10, 0, 2, 0, 0])
        );
        // Locked: eject refused.
        assert_eq!(a.execute(&cdb(&[0x1E, 0, 0, 0, 1])), Packet::Done);
        assert_eq!(a.execute(&cdb(&[0x1B, 0, 0, 0, 2])), Packet::Error);
        assert_eq!(a.sense(), REMOVAL_PREVENTED);
        assert_eq!(a.execute(&cdb(&[0x1E, 0, 0, 0, 0])), Packet::Done);
        assert_eq!(a.execute(&cdb(&[0x1B, 0, 0, 0, 2])), Packet::Done);
        assert_eq!(
            a.execute(&gesn),
            Packet::Data(vec![0, 6, 4, 0x10, 3, 1, 0, 0])
        );
        assert_eq!(a.execute(&cdb(&[0x00])), Packet::Error);
        assert_eq!(a.sense(), TRAY_OPEN);
        assert_eq!(
            a.execute(&cdb(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1])),
            Packet::Error
        );
        // Load: new media, and a unit attention for the next command.
        assert_eq!(a.execute(&cdb(&[0x1B, 0, 0, 0, 3])), Packet::Done);
        assert_eq!(
            a.execute(&gesn),
            Packet::Data(vec![0, 6, 4, 0x10, 2, 2, 0, 0])
        );
        assert_eq!(a.execute(&cdb(&[0x00])), Packet::Error);
        assert_eq!(a.sense(), MEDIUM_CHANGED);
        assert_eq!(a.execute(&cdb(&[0x00])), Packet::Done);
    }

    #[test]
    fn inquiry_mode_sense_and_unknown_commands() {
        let mut a = ready_drive();
        let Packet::Data(d) = a.execute(&cdb(&[0x12, 0, 0, 0, 36])) else {
            panic!()
        };
        assert_eq!((d.len(), d[0], d[1]), (36, 5, 0x80));
        let Packet::Data(d) = a.execute(&cdb(&[0x5A, 0, 0x2A, 0, 0, 0, 0, 0, 200])) else {
            panic!()
        };
        assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, d.len() - 2);
        assert_eq!((d[8], d[9]), (0x2A, 0x14));
        assert_eq!(
            a.execute(&cdb(&[0x5A, 0, 0xEA, 0, 0, 0, 0, 0, 200])),
            Packet::Error
        );
        assert_eq!(a.sense(), SAVING_NOT_SUPPORTED);
        assert_eq!(a.execute(&cdb(&[0xFF])), Packet::Error);
        assert_eq!(a.sense(), INVALID_OPCODE);
        let Packet::Data(d) = a.execute(&cdb(&[0x46, 0, 0, 0, 0, 0, 0, 0, 255])) else {
            panic!()
        };
        assert_eq!(&d[6..8], &[0, 8], "current profile CD-ROM");
        assert_eq!(
            u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize,
            d.len() - 4
        );
    }

    #[test]
    fn msf_conversion() {
        assert_eq!(lba_to_msf(0), (0, 2, 0));
        assert_eq!(lba_to_msf(4350), (1, 0, 0));
        assert_eq!(lba_to_msf(74), (0, 2, 74));
    }
}
