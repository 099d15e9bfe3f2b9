//! The `modes` kernel: down from 32-bit protected mode into 16-bit protected mode (a 16-bit code
//! segment, a 286 interrupt gate, a task switch to and back from a 286 TSS), then to real mode
//! (an IVT interrupt, big real mode through a 4 GiB segment cache kept from protected mode), and
//! back up to 32-bit protected mode.

use iced_x86::code_asm::*;

use crate::kit::{AsmResult, Kit, STACK_TOP};

/// Where the 16-bit code is copied (below 64 KiB, so real mode and 16-bit segments reach it).
const LOW: u32 = 0x8000;
/// The 32-bit stub that takes the CPU back into the kit's code.
const STUB32: u32 = 0x9000;
/// Strings the 16-bit code prints, and the real-mode IDTR.
const STRINGS: u32 = 0xA000;
/// The two 286 TSSs.
const TSS_A: u32 = 0xB000;
const TSS_B: u32 = 0xB100;
/// The 16-bit protected-mode IDT.
const IDT16: u32 = 0xB800;
/// How many bytes from LOW are copied.
const LOW_LEN: u32 = 0x4000;
/// Task A's and task B's 16-bit stacks.
const STACK_A: u32 = 0x7000;
const STACK_B: u32 = 0x6000;
/// A marker above 1 MiB that big real mode reads.
const MARK_VALUE: u32 = 0xB16_EA1;

/// GDT selectors.
const CODE32: u32 = 0x08;
const DATA32: u32 = 0x10;
const CODE16: u32 = 0x18;
const DATA16: u32 = 0x20;
const SEL_TSS_A: u32 = 0x28;
const SEL_TSS_B: u32 = 0x30;

/// A byte-granular 16-bit system or segment descriptor: base, limit, access byte.
fn descriptor(base: u32, limit: u32, access: u8) -> u64 {
    u64::from(limit & 0xFFFF)
        | (u64::from(base & 0xFF_FFFF) << 16)
        | (u64::from(access) << 40)
        | (u64::from(base >> 24) << 56)
}

/// Strings placed at STRINGS: returns each one's address.
struct Strings {
    bytes: Vec<u8>,
}

impl Strings {
    fn raw(&mut self, bytes: &[u8]) -> u32 {
        let addr = STRINGS + self.bytes.len() as u32;
        self.bytes.extend_from_slice(bytes);
        addr
    }

    fn add(&mut self, s: &str) -> u32 {
        let addr = self.raw(s.as_bytes());
        self.bytes.push(0);
        addr
    }
}

/// Emits `mov si, text; call puts`.
fn puts(a: &mut CodeAssembler, strings: &mut Strings, puts: CodeLabel, text: &str) -> AsmResult {
    a.mov(si, strings.add(text))?;
    Ok(a.call(puts)?)
}

/// Emits the start of an interrupt handler that prints `what` and the CS and FLAGS of its 16-bit
/// frame; it leaves BP pushed (the handler pops it before IRET).
fn frame(
    a: &mut CodeAssembler,
    strings: &mut Strings,
    (puts_l, hex16): (CodeLabel, CodeLabel),
    what: &str,
) -> AsmResult {
    a.push(bp)?;
    a.mov(bp, sp)?;
    puts(a, strings, puts_l, &format!("{what}: cs="))?;
    a.mov(ax, word_ptr(bp + 4))?;
    a.call(hex16)?;
    puts(a, strings, puts_l, " flags=")?;
    a.mov(ax, word_ptr(bp + 6))?;
    Ok(a.call(hex16)?)
}

/// Builds the kernel. Exits with value 0x1A.
pub fn modes() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let resume_slot = k.address_slot();
    let mark = k.data(&MARK_VALUE.to_le_bytes());
    let mut strings = Strings { bytes: Vec::new() };
    // The real-mode IDTR: the IVT at 0.
    let ivt_ptr = strings.raw(&[0xFF, 0x03, 0, 0, 0, 0]);

    let mut a = CodeAssembler::new(16)?;
    let mut puts_l = a.create_label();
    let mut hex16 = a.create_label();
    let mut pm16_entry = a.create_label();
    let mut real_entry = a.create_label();
    let mut int40 = a.create_label();
    let mut int41 = a.create_label();
    let mut task_b = a.create_label();

    // 16-bit protected mode, CS = CODE16 (base 0).
    a.set_label(&mut pm16_entry)?;
    a.mov(ax, DATA16)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(sp, STACK_A)?;
    puts(&mut a, &mut strings, puts_l, "16-bit protected mode: cs=")?;
    a.mov(ax, cs)?;
    a.call(hex16)?;
    puts(&mut a, &mut strings, puts_l, "\n")?;
    a.int(0x40)?;
    puts(&mut a, &mut strings, puts_l, "back from int 0x40: sp=")?;
    a.mov(ax, sp)?;
    a.call(hex16)?;
    puts(&mut a, &mut strings, puts_l, "\n")?;
    a.mov(ax, 0xA1A1u32)?;
    a.call_far(SEL_TSS_B as u16, 0)?;
    puts(&mut a, &mut strings, puts_l, "back in task A: ax=")?;
    a.call(hex16)?;
    puts(&mut a, &mut strings, puts_l, " nt=")?;
    a.pushf()?;
    a.pop(ax)?;
    a.and(ax, 0x4000u32)?;
    a.call(hex16)?;
    puts(&mut a, &mut strings, puts_l, " tr=")?;
    a.str(ax)?;
    a.call(hex16)?;
    puts(&mut a, &mut strings, puts_l, "\n")?;
    // Down to real mode: FS keeps a 4 GiB limit (big real mode), the rest 64 KiB.
    a.mov(ax, DATA32)?;
    a.mov(fs, ax)?;
    a.mov(ax, DATA16)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(gs, ax)?;
    a.mov(ss, ax)?;
    a.mov(eax, cr0)?;
    a.and(eax, 0xFFFF_FFFEu32)?;
    a.mov(cr0, eax)?;
    a.jmp_far(0, 0)?; // patched below to 0000:real_entry
    let far_jmp_index = a.instructions().len() - 1;

    // Real mode.
    a.set_label(&mut real_entry)?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(sp, STACK_A)?;
    a.lidt(ptr(ivt_ptr))?;
    puts(&mut a, &mut strings, puts_l, "real mode: cs=")?;
    a.mov(ax, cs)?;
    a.call(hex16)?;
    puts(&mut a, &mut strings, puts_l, "\n")?;
    a.int(0x41)?;
    puts(
        &mut a,
        &mut strings,
        puts_l,
        "big real mode read above 1 MiB: ",
    )?;
    // mov eax, fs:[mark] with a 32-bit address (iced's 16-bit assembler keeps displacements to
    // 16 bits): FS, operand-size and address-size prefixes, then A1 moffs32.
    a.db(&[0x64, 0x66, 0x67, 0xA1])?;
    a.db(&mark.to_le_bytes())?;
    a.ror(eax, 16u32)?;
    a.call(hex16)?;
    a.ror(eax, 16u32)?;
    a.call(hex16)?;
    puts(&mut a, &mut strings, puts_l, "\n")?;
    // Back up to 32-bit protected mode through the stub.
    a.mov(eax, cr0)?;
    a.or(eax, 1u32)?;
    a.mov(cr0, eax)?;
    // jmp dword CODE32:STUB32
    a.db(&[0x66, 0xEA])?;
    a.db(&STUB32.to_le_bytes())?;
    a.db(&(CODE32 as u16).to_le_bytes())?;

    // INT 0x41 in real mode: shows the pushed CS and FLAGS.
    a.set_label(&mut int41)?;
    frame(
        &mut a,
        &mut strings,
        (puts_l, hex16),
        "int 0x41 through the IVT",
    )?;
    puts(&mut a, &mut strings, puts_l, "\n")?;
    a.pop(bp)?;
    a.iret()?;

    // INT 0x40 through a 286 interrupt gate: a 16-bit frame (IP, CS, FLAGS).
    a.set_label(&mut int40)?;
    frame(
        &mut a,
        &mut strings,
        (puts_l, hex16),
        "int 0x40 through a 16-bit gate",
    )?;
    puts(&mut a, &mut strings, puts_l, " sp=")?;
    a.mov(ax, sp)?;
    a.call(hex16)?;
    puts(&mut a, &mut strings, puts_l, "\n")?;
    a.pop(bp)?;
    a.iret()?;

    // Task B, entered through CALL to a 286 TSS: NT is set and the link names task A.
    // (The upper halves of the registers a 286 TSS loads are not printed: QEMU zero-extends,
    // Bochs — which documents what hardware does, the manuals are silent — and bt86 set them
    // to ones.)
    a.set_label(&mut task_b)?;
    puts(&mut a, &mut strings, puts_l, "task B: cs=")?;
    a.mov(ax, cs)?;
    a.call(hex16)?;
    puts(&mut a, &mut strings, puts_l, " ax=")?;
    a.mov(ax, word_ptr(TSS_B + 0x12))?;
    a.call(hex16)?;
    puts(&mut a, &mut strings, puts_l, " sp=")?;
    a.mov(ax, sp)?;
    a.call(hex16)?;
    puts(&mut a, &mut strings, puts_l, " nt=")?;
    a.pushf()?;
    a.pop(ax)?;
    a.and(ax, 0x4000u32)?;
    a.call(hex16)?;
    puts(&mut a, &mut strings, puts_l, " link=")?;
    a.mov(ax, word_ptr(TSS_B))?;
    a.call(hex16)?;
    puts(&mut a, &mut strings, puts_l, " saved-a-ax=")?;
    a.mov(ax, word_ptr(TSS_A + 0x12))?;
    a.call(hex16)?;
    puts(&mut a, &mut strings, puts_l, " tr=")?;
    a.str(ax)?;
    a.call(hex16)?;
    puts(&mut a, &mut strings, puts_l, "\n")?;
    a.mov(ax, 0xB2B2u32)?;
    a.iret()?;

    // puts: DS:SI, NUL-terminated. Keeps every register.
    a.set_label(&mut puts_l)?;
    a.push(ax)?;
    a.push(dx)?;
    a.push(si)?;
    a.mov(dx, 0x3F8u32)?;
    let mut next = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut next)?;
    a.lodsb()?;
    a.test(al, al)?;
    a.jz(done)?;
    a.out(dx, al)?;
    a.jmp(next)?;
    a.set_label(&mut done)?;
    a.pop(si)?;
    a.pop(dx)?;
    a.pop(ax)?;
    a.ret()?;

    // hex16: AX as four hex digits. Keeps every register.
    a.set_label(&mut hex16)?;
    a.push(ax)?;
    a.push(bx)?;
    a.push(cx)?;
    a.push(dx)?;
    a.mov(bx, ax)?;
    a.mov(cx, 4u32)?;
    a.mov(dx, 0x3F8u32)?;
    let mut digit = a.create_label();
    let mut decimal = a.create_label();
    a.set_label(&mut digit)?;
    a.rol(bx, 4u32)?;
    a.mov(al, bl)?;
    a.and(al, 0xFu32)?;
    a.cmp(al, 10u32)?;
    a.jb(decimal)?;
    a.add(al, u32::from(b'a' - b'0' - 10))?;
    a.set_label(&mut decimal)?;
    a.add(al, u32::from(b'0'))?;
    a.out(dx, al)?;
    a.dec(cx)?;
    a.jnz(digit)?;
    a.pop(dx)?;
    a.pop(cx)?;
    a.pop(bx)?;
    a.pop(ax)?;
    a.ret()?;

    // Assemble once to learn the label addresses, patch the far jump, assemble again.
    let result = a.assemble_options(
        u64::from(LOW),
        iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let ip = |l: &CodeLabel| result.label_ip(l).map(|v| v as u32);
    let (pm16_ip, real_ip, int40_ip, int41_ip, task_b_ip) = (
        ip(&pm16_entry)?,
        ip(&real_entry)?,
        ip(&int40)?,
        ip(&int41)?,
        ip(&task_b)?,
    );
    let mut instructions = a.take_instructions();
    let far = &mut instructions[far_jmp_index];
    far.set_far_branch16(real_ip as u16);
    far.set_far_branch_selector(0);
    let code16 = iced_x86::BlockEncoder::encode(
        16,
        iced_x86::InstructionBlock::new(&instructions, u64::from(LOW)),
        iced_x86::BlockEncoderOptions::NONE,
    )?
    .code_buffer;
    assert!(
        code16.len() <= (STUB32 - LOW) as usize,
        "16-bit code too long"
    );

    // The 32-bit stub: flat segments, the kit's stack, then back into the kit's code.
    let mut s32 = CodeAssembler::new(32)?;
    s32.mov(eax, DATA32)?;
    s32.mov(ds, eax)?;
    s32.mov(es, eax)?;
    s32.mov(fs, eax)?;
    s32.mov(gs, eax)?;
    s32.mov(ss, eax)?;
    s32.mov(esp, STACK_TOP)?;
    s32.jmp(dword_ptr(resume_slot))?;
    let stub = s32.assemble(u64::from(STUB32))?;

    // The low image: code, stub, strings, TSSs, IDT.
    let mut low = vec![0u8; LOW_LEN as usize];
    let at = |addr: u32| (addr - LOW) as usize;
    low[..code16.len()].copy_from_slice(&code16);
    low[at(STUB32)..at(STUB32) + stub.len()].copy_from_slice(&stub);
    low[at(STRINGS)..at(STRINGS) + strings.bytes.len()].copy_from_slice(&strings.bytes);
    // Task B's 286 TSS: IP, FLAGS, AX..DI, ES, CS, SS, DS, LDT.
    let mut tss_b = [0u16; 22];
    tss_b[7] = task_b_ip as u16; // 0x0E IP
    tss_b[8] = 0x0002; // 0x10 FLAGS
    tss_b[9] = 0x1234; // 0x12 AX
    tss_b[13] = STACK_B as u16; // 0x1A SP
    tss_b[17] = DATA16 as u16; // 0x22 ES
    tss_b[18] = CODE16 as u16; // 0x24 CS
    tss_b[19] = DATA16 as u16; // 0x26 SS
    tss_b[20] = DATA16 as u16; // 0x28 DS
    for (i, w) in tss_b.iter().enumerate() {
        let o = at(TSS_B) + 2 * i;
        low[o..o + 2].copy_from_slice(&w.to_le_bytes());
    }
    // 286 interrupt gate for 0x40 (type 6, present, DPL 0).
    let gate = u64::from(int40_ip & 0xFFFF) | (u64::from(CODE16) << 16) | (0x86u64 << 40);
    let o = at(IDT16) + 0x40 * 8;
    low[o..o + 8].copy_from_slice(&gate.to_le_bytes());
    let low_src = k.data(&low);

    let gdt = [
        0,
        0x00CF_9B00_0000_FFFF,
        0x00CF_9300_0000_FFFF,
        descriptor(0, 0xFFFF, 0x9B),
        descriptor(0, 0xFFFF, 0x93),
        descriptor(TSS_A, 0x2B, 0x81),
        descriptor(TSS_B, 0x2B, 0x81),
    ];
    let (_, gdtr) = k.descriptor_table(&gdt.map(u64::to_le_bytes).concat());
    let mut idtr = vec![];
    idtr.extend_from_slice(&(0x41u16 * 8 - 1).to_le_bytes());
    idtr.extend_from_slice(&IDT16.to_le_bytes());
    let idtr = k.data(&idtr);

    // 32-bit: copy the low image, point IVT entry 0x41 at the real-mode handler, load the
    // tables, take TR = task A, and far-jump into 16-bit protected mode.
    let a = k.asm();
    a.cld()?;
    a.mov(esi, low_src)?;
    a.mov(edi, LOW)?;
    a.mov(ecx, LOW_LEN / 4)?;
    a.rep().movsd()?;
    a.mov(dword_ptr(0x41 * 4), int41_ip & 0xFFFF)?;
    a.lgdt(ptr(gdtr))?;
    a.lidt(ptr(idtr))?;
    a.mov(eax, SEL_TSS_A)?;
    a.ltr(ax)?;
    k.print("32-bit protected mode\n")?;
    k.asm().jmp_far(CODE16 as u16, pm16_ip)?;
    let mut resume = k.asm().create_label();
    k.set_label_at(&mut resume, resume_slot)?;
    k.print("back in 32-bit protected mode: cs=")?;
    k.asm().xor(eax, eax)?;
    k.asm().mov(ax, cs)?;
    k.print_hex(eax)?;
    k.print("\n")?;
    k.exit(0x1A)?;
    k.build()
}
