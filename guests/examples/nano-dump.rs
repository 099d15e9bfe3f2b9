//! Writes every nano kernel to DIR (for trying them by hand).
fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: nano-dump DIR [ITERATIONS]");
    let n: Option<u32> = std::env::args()
        .nth(2)
        .map(|s| s.parse().expect("iterations"));
    for w in bt86_guests::nano::WORKLOADS {
        let image = bt86_guests::nano::build(w, n.unwrap_or(w.iterations)).expect("build");
        std::fs::write(format!("{dir}/{}.elf", w.name), image).expect("write");
    }
}
