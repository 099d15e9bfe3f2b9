//! Encoding a unit's host instructions in one pass with iced's plain `Encoder`, the fast path
//! in front of `BlockEncoder`.
//!
//! `BlockEncoder` lays out a block whose branches may change size: it allocates an object per
//! instruction and iterates until the layout is stable, which made it most of the cost of
//! translating a unit (tens of µs for a unit of ~60 host instructions). A unit's code needs none
//! of that: its only branches are to labels inside the unit, in forms whose size is fixed
//! (`jrcxz`/`loop` rel8, `jcc`/`jmp` rel32), and every other instruction is position-independent
//! (translated code addresses guest memory through GS and the context through R15, never
//! RIP-relative). So each instruction is encoded once, in order, with its branch aimed at
//! itself, and the branch fields are patched once every label's offset is known.
//!
//! Anything outside that shape — a branch to an address that is not one of the block's labels,
//! a rel8 target out of range, an instruction the encoder rejects — makes [`encode`] return
//! `None`, and the caller hands the block to `BlockEncoder` as before.

use iced_x86::{Code, Encoder, Instruction, OpCodeOperandKind, OpKind};

use crate::translate::RawSpan;

/// Host code and, for each instruction, its offset from the start of the code (what
/// `BlockEncoder` returns with `RETURN_NEW_INSTRUCTION_OFFSETS`).
pub(crate) struct Block {
    /// The encoded bytes.
    pub code: Vec<u8>,
    /// Offset of each instruction, in the order given.
    pub offsets: Vec<u32>,
}

/// A branch to patch once the layout is known.
struct Fixup {
    /// Offset of the branch field.
    field: usize,
    /// Its size in bytes (1 or 4).
    size: usize,
    /// Offset of the end of the branch instruction.
    end: usize,
    /// The label (instruction IP) it branches to.
    target: u64,
}

/// Encodes `instructions` for host address `rip`: each instruction's IP is its label, and a
/// near branch's target is the label of the instruction it goes to. The instruction at each
/// raw span's index is a placeholder for that span of `raw_bytes`, copied as it is (it must
/// not depend on where it is placed). None if the block has any shape
/// [the module documentation](self) lists as unsupported.
pub(crate) fn encode(
    instructions: &[Instruction],
    raw: &[RawSpan],
    raw_bytes: &[u8],
    rip: u64,
) -> Option<Block> {
    let mut encoder =
        Encoder::try_with_capacity(64, instructions.len() * 8 + raw_bytes.len()).ok()?;
    let mut offsets = Vec::with_capacity(instructions.len());
    let mut fixups = Vec::new();
    let mut labels: Vec<(u64, u32)> = Vec::with_capacity(instructions.len());
    let mut sorted = true;
    let mut at = 0usize;
    let mut spans = raw.iter().peekable();
    for (i, ins) in instructions.iter().enumerate() {
        offsets.push(at as u32);
        if let Some(&(last, _)) = labels.last() {
            sorted &= last < ins.ip();
        }
        labels.push((ins.ip(), at as u32));
        let here = rip.wrapping_add(at as u64);
        let len = if let Some(span) = spans.next_if(|s| s.index == i) {
            let bytes = raw_bytes
                .get(span.start as usize..)?
                .get(..span.len as usize)?;
            let mut buffer = encoder.take_buffer();
            buffer.extend_from_slice(bytes);
            encoder.set_buffer(buffer);
            bytes.len()
        } else if ins.op0_kind() == OpKind::NearBranch64 {
            let size = branch_size(ins.code())?;
            let mut aimed = *ins;
            aimed.set_near_branch64(here);
            let len = encoder.encode(&aimed, here).ok()?;
            fixups.push(Fixup {
                field: at + len - size,
                size,
                end: at + len,
                target: ins.near_branch64(),
            });
            len
        } else if is_relative(ins) {
            return None;
        } else {
            encoder.encode(ins, here).ok()?
        };
        at += len;
    }
    let mut code = encoder.take_buffer();
    if !fixups.is_empty() {
        if !sorted {
            labels.sort_unstable_by_key(|l| l.0);
        }
        for f in &fixups {
            let i = labels.binary_search_by_key(&f.target, |l| l.0).ok()?;
            let rel = i64::from(labels[i].1) - f.end as i64;
            match f.size {
                1 => code[f.field] = i8::try_from(rel).ok()? as u8,
                _ => code[f.field..f.field + 4]
                    .copy_from_slice(&i32::try_from(rel).ok()?.to_le_bytes()),
            }
        }
    }
    Some(Block { code, offsets })
}

/// Size of the relative field of a near-branch instruction with a fixed form: 1 for the rel8
/// forms, 4 for rel32; None for anything else.
fn branch_size(code: Code) -> Option<usize> {
    match code.op_code().op_kind(0) {
        OpCodeOperandKind::br64_1 => Some(1),
        OpCodeOperandKind::br64_4 => Some(4),
        _ => None,
    }
}

/// Whether an instruction other than a near branch depends on where it is placed (a
/// RIP-relative memory operand, or a far or 16/32-bit branch).
fn is_relative(ins: &Instruction) -> bool {
    ins.is_ip_rel_memory_operand()
        || (0..ins.op_count()).any(|i| {
            matches!(
                ins.op_kind(i),
                OpKind::NearBranch16
                    | OpKind::NearBranch32
                    | OpKind::FarBranch16
                    | OpKind::FarBranch32
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{
        BlockEncoder, BlockEncoderOptions, Decoder, DecoderOptions, InstructionBlock, Register,
    };

    /// Decodes `code` (64-bit) back into instructions.
    fn decode(code: &[u8], rip: u64) -> Vec<Instruction> {
        let mut d = Decoder::with_ip(64, code, rip, DecoderOptions::NONE);
        let mut out = Vec::new();
        while d.can_decode() {
            out.push(d.decode());
        }
        out
    }

    fn labelled(list: Vec<Instruction>) -> Vec<Instruction> {
        list.into_iter()
            .enumerate()
            .map(|(i, mut ins)| {
                ins.set_ip(0x1001 + i as u64);
                ins
            })
            .collect()
    }

    #[test]
    fn forward_and_backward_branches_reach_their_labels() {
        // 0: mov ecx, 3; 1: jrcxz ->5; 2: dec ecx; 3: jne rel32 ->1; 4: jmp rel32 ->5; 5: nop
        let mut list = vec![
            Instruction::with2(Code::Mov_r32_imm32, Register::ECX, 3u32).unwrap(),
            Instruction::with_branch(Code::Jrcxz_rel8_64, 0x1006).unwrap(),
            Instruction::with1(Code::Dec_rm32, Register::ECX).unwrap(),
            Instruction::with_branch(Code::Jne_rel32_64, 0x1002).unwrap(),
            Instruction::with_branch(Code::Jmp_rel32_64, 0x1006).unwrap(),
            Instruction::with(Code::Nopd),
        ];
        list = labelled(list);
        let rip = 0x7f00_0000_1000;
        let block = encode(&list, &[], &[], rip).expect("fixed-form branches to labels");
        let host = decode(&block.code, rip);
        assert_eq!(host.len(), list.len());
        let at = |i: usize| rip + u64::from(block.offsets[i]);
        for (i, h) in host.iter().enumerate() {
            assert_eq!(h.ip(), at(i), "instruction {i} starts at its offset");
        }
        assert_eq!(host[1].code(), Code::Jrcxz_rel8_64);
        assert_eq!(host[1].near_branch64(), at(5));
        assert_eq!(host[3].code(), Code::Jne_rel32_64);
        assert_eq!(host[3].near_branch64(), at(1));
        assert_eq!(host[4].near_branch64(), at(5));
    }

    #[test]
    fn matches_block_encoder_for_straight_line_code() {
        let list = labelled(vec![
            Instruction::with2(
                Code::Mov_r32_rm32,
                Register::R11D,
                iced_x86::MemoryOperand::with_base_displ(Register::R15, 0x40),
            )
            .unwrap(),
            Instruction::with2(
                Code::Add_rm32_r32,
                iced_x86::MemoryOperand::new(
                    Register::R12D,
                    Register::None,
                    1,
                    -8,
                    4,
                    false,
                    Register::GS,
                ),
                Register::EAX,
            )
            .unwrap(),
            Instruction::with_declare_byte_5(0xE9, 0, 0, 0, 0),
        ]);
        let rip = 0x7f00_0000_2000;
        let ours = encode(&list, &[], &[], rip).unwrap();
        let theirs = BlockEncoder::encode(
            64,
            InstructionBlock::new(&list, rip),
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .unwrap();
        assert_eq!(ours.code, theirs.code_buffer);
        assert_eq!(ours.offsets, theirs.new_instruction_offsets);
    }

    #[test]
    fn raw_spans_are_copied_in_place_and_branched_over() {
        // 0: jmp rel32 ->2; 1: raw (int3 x 3); 2: nop, then 3: raw (ud2) at the end.
        let list = labelled(vec![
            Instruction::with_branch(Code::Jmp_rel32_64, 0x1003).unwrap(),
            Instruction::default(),
            Instruction::with(Code::Nopd),
            Instruction::default(),
        ]);
        let raw = [
            RawSpan {
                index: 1,
                start: 0,
                len: 3,
            },
            RawSpan {
                index: 3,
                start: 3,
                len: 2,
            },
        ];
        let bytes = [0xCC, 0xCC, 0xCC, 0x0F, 0x0B];
        let rip = 0x7f00_0000_3000;
        let block = encode(&list, &raw, &bytes, rip).expect("raw spans are position-independent");
        assert_eq!(block.offsets, [0, 5, 8, 9]);
        assert_eq!(&block.code[5..8], &[0xCC; 3]);
        assert_eq!(&block.code[9..], &[0x0F, 0x0B]);
        let host = decode(&block.code, rip);
        assert_eq!(
            host[0].near_branch64(),
            rip + 8,
            "the jump lands past the span"
        );
    }

    #[test]
    fn out_of_range_or_unknown_targets_fall_back() {
        // A rel8 branch over 200 bytes of code cannot be encoded in place.
        let mut list = vec![Instruction::with_branch(Code::Jrcxz_rel8_64, 0).unwrap()];
        for _ in 0..40 {
            list.push(
                Instruction::with2(Code::Mov_r64_imm64, Register::RAX, 0x1122_3344_5566_7788u64)
                    .unwrap(),
            );
        }
        list = labelled(list);
        let last = list.last().unwrap().ip();
        list[0].set_near_branch64(last);
        assert!(
            encode(&list, &[], &[], 0x1000).is_none(),
            "rel8 out of range"
        );
        // A branch to an address that is no label.
        let list = labelled(vec![
            Instruction::with_branch(Code::Jmp_rel32_64, 0xdead_0000).unwrap(),
        ]);
        assert!(
            encode(&list, &[], &[], 0x1000).is_none(),
            "target outside the block"
        );
    }
}
