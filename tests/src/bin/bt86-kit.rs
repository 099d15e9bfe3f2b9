//! `bt86-kit`: writes the kit's test kernels to files, for running them by hand under bt86 or QEMU.

use anyhow::{Context, bail};
use bt86_tests::kernels::{CATALOG, find};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["list"] => {
            for e in CATALOG {
                let kind = if e.firmware { "firmware" } else { "kernel" };
                println!("{:<14} {kind:<8} {}", e.name, e.about);
            }
            Ok(())
        }
        ["build", name, out] => {
            let entry = find(name)
                .with_context(|| format!("no kit kernel named '{name}' (see `bt86-kit list`)"))?;
            let image = (entry.build)().map_err(|e| anyhow::anyhow!("assembling {name}: {e}"))?;
            std::fs::write(out, image).with_context(|| format!("writing {out}"))?;
            Ok(())
        }
        _ => bail!("usage: bt86-kit list | bt86-kit build NAME OUTPUT-FILE"),
    }
}
