//! Translation cost: how long `bt::translate::translate` takes per unit for code shaped like
//! a kernel's (prologues, loads and stores through the stack and through pointers, compares
//! and branches, calls, an indirect return). Booting Linux translates ~84K units, so this is
//! what a boot pays before it runs any of them.
//!
//! `cargo bench -p bt --bench translate`

use criterion::{Criterion, Throughput};
use iced_x86::code_asm::*;

use bt::translate::{CodeSource, Mode, translate};

/// Where the corpus is assembled and where its units are "placed" on the host.
const BASE: u32 = 0xC100_0000;
const RIP: u64 = 0x4000_0000;

/// Guest code: one 4 KiB page holding the corpus.
struct Page(Vec<u8>);

impl CodeSource for Page {
    fn read_code(&self, eip: u32, buf: &mut [u8]) -> usize {
        let at = eip.wrapping_sub(BASE) as usize;
        let Some(rest) = self.0.get(at..) else {
            return 0;
        };
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        n
    }
}

/// A kernel-like function body: a frame, field loads and stores, a compare and branch, a call
/// and an epilogue. Returns the guest EIPs where units start (each function, and each
/// instruction after a branch or call).
fn corpus() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).expect("32-bit assembler");
    for i in 0..24u32 {
        let mut skip = a.create_label();
        a.push(ebp).unwrap();
        a.mov(ebp, esp).unwrap();
        a.push(edi).unwrap();
        a.push(esi).unwrap();
        a.push(ebx).unwrap();
        a.sub(esp, 0x10).unwrap();
        a.mov(ebx, dword_ptr(ebp + 8)).unwrap();
        a.mov(eax, dword_ptr(ebx + 4 * i)).unwrap();
        a.mov(edx, dword_ptr(ebx + eax * 4 + 0x20)).unwrap();
        a.test(edx, edx).unwrap();
        a.je(skip).unwrap();
        a.mov(dword_ptr(esp + 4), edx).unwrap();
        a.lea(ecx, dword_ptr(ebx + 0x40)).unwrap();
        a.and(eax, 0xFF).unwrap();
        a.movzx(esi, byte_ptr(ecx + eax)).unwrap();
        a.call(u64::from(BASE) + 0x10).unwrap();
        a.set_label(&mut skip).unwrap();
        a.add(dword_ptr(ebx), 1).unwrap();
        a.cmp(eax, 0x1000).unwrap();
        a.setne(cl).unwrap();
        a.add(esp, 0x10).unwrap();
        a.pop(ebx).unwrap();
        a.pop(esi).unwrap();
        a.pop(edi).unwrap();
        a.pop(ebp).unwrap();
        a.ret().unwrap();
    }
    a.assemble(u64::from(BASE)).expect("assembles")
}

/// The unit starts: the first instruction and every one after a unit-ending branch, call or
/// return, as the monitor would find them running the code.
fn unit_starts(code: &[u8]) -> Vec<u32> {
    let mut starts = vec![BASE];
    let mut d = iced_x86::Decoder::with_ip(32, code, u64::from(BASE), 0);
    for ins in &mut d {
        if ins.flow_control() != iced_x86::FlowControl::Next {
            starts.push(ins.next_ip32());
        }
    }
    starts.pop();
    starts
}

fn bench(c: &mut Criterion) {
    let code = corpus();
    let starts = unit_starts(&code);
    let page = Page(code);
    for s in &starts {
        translate(&page, *s, 1, RIP, Mode(Mode::CPL0)).expect("the corpus translates");
    }
    let mut g = c.benchmark_group("translate");
    g.throughput(Throughput::Elements(starts.len() as u64));
    g.bench_function("kernel-like units", |b| {
        b.iter(|| {
            for (i, s) in starts.iter().enumerate() {
                let e = translate(&page, *s, i as u32, RIP, Mode(Mode::CPL0))
                    .expect("the corpus translates");
                std::hint::black_box(e);
            }
        })
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
