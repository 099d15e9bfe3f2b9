//! `bt86 run --config FILE`: every `bt86 run` setting in a TOML file. Keys are the flags'
//! names without the dashes in front (`on-reboot = "restart"`); flags given on the command line
//! override the file's values (a repeatable flag such as `--disk` replaces the file's whole
//! list). Relative paths in the file are relative to the file's directory. Unknown keys and
//! bad values are errors that name the file and the key.
//!
//! ```toml
//! kernel = "vmlinuz"
//! initrd = "initramfs.gz"
//! append = "console=ttyS0"
//! engine = "bt"
//! memory = 512
//! serial = "file:console.log"
//! disk = ["root.img,cache=writethrough", { file = "data.img", if = "virtio" }]
//! cdrom = "tools.iso"
//! ```

use std::path::{Path, PathBuf};

use clap::ValueEnum;

use crate::disk::DiskSpec;
use crate::run::{SerialSpec, parse_serial};
use crate::{ClockArg, EngineArg, LockstepArg, OnReboot, RunArgs};

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the configuration file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The host error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{path} is not a valid TOML file: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (with the line and column).
        message: String,
    },
    /// A key `bt86 run` does not have.
    #[error("{path}: unknown key '{key}' (the keys are: {known})")]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key, dotted for nested ones.
        key: String,
        /// The keys allowed there.
        known: String,
    },
    /// A key with a value it cannot take.
    #[error("{path}: {key}: {reason}")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// The top-level keys, as the flags are named.
const KEYS: &[&str] = &[
    "kernel",
    "append",
    "module",
    "initrd",
    "bios",
    "memory",
    "engine",
    "serial",
    "on-reboot",
    "clock",
    "trace",
    "lockstep",
    "disk",
    "cdrom",
    "stats",
];

/// The keys of a `disk` table.
const DISK_KEYS: &[&str] = &["file", "format", "readonly", "cache", "overlay", "if"];

/// Reads `path` and fills every setting of `args` that the command line did not give
/// (`given(name)` tells, by the argument's id: the flag's name with '_' for '-').
pub fn apply(
    path: &Path,
    args: &mut RunArgs,
    given: &dyn Fn(&str) -> bool,
) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let f = File { path, base };
    for (key, value) in &table {
        let id = key.replace('-', "_");
        if !KEYS.contains(&key.as_str()) {
            return Err(f.unknown(key, KEYS));
        }
        if given(&id) {
            continue;
        }
        match key.as_str() {
            "kernel" => args.kernel = Some(f.path_of(key, value)?),
            "append" => args.append = f.string(key, value)?.to_string(),
            "module" => {
                args.module = f
                    .list(key, value)?
                    .iter()
                    .map(|v| {
                        // "FILE ARGS...": the file is the first word.
                        let s = f.string(key, v)?;
                        let (file, rest) = s.split_once(' ').unwrap_or((s, ""));
                        let file = f.resolve(file).display().to_string();
                        Ok(if rest.is_empty() {
                            file
                        } else {
                            format!("{file} {rest}")
                        })
                    })
                    .collect::<Result<_, ConfigError>>()?;
            }
            "initrd" => args.initrd = Some(f.path_of(key, value)?.display().to_string()),
            "bios" => args.bios = Some(f.path_of(key, value)?),
            "memory" => {
                let mib = value.as_integer().ok_or_else(|| {
                    f.bad(
                        key,
                        format!("{value} is not a number of MiB (e.g. memory = 512)"),
                    )
                })?;
                args.memory = u64::try_from(mib)
                    .map_err(|_| f.bad(key, format!("{mib} is not a number of MiB")))?;
            }
            "engine" => args.engine = f.choice::<EngineArg>(key, value)?,
            "on-reboot" => args.on_reboot = f.choice::<OnReboot>(key, value)?,
            "clock" => args.clock = f.choice::<ClockArg>(key, value)?,
            "lockstep" => args.lockstep = Some(f.choice::<LockstepArg>(key, value)?),
            "serial" => {
                let s = f.string(key, value)?;
                args.serial = match parse_serial(s).map_err(|reason| f.bad(key, reason))? {
                    SerialSpec::File(p) => SerialSpec::File(f.resolve(&p.display().to_string())),
                    other => other,
                };
            }
            "trace" => args.trace = f.boolean(key, value)?,
            "stats" => args.stats = f.boolean(key, value)?,
            "cdrom" => args.cdrom = Some(f.path_of(key, value)?),
            "disk" => {
                args.disk = f
                    .list(key, value)?
                    .iter()
                    .map(|d| f.disk(key, d))
                    .collect::<Result<_, _>>()?;
            }
            _ => return Err(f.unknown(key, KEYS)),
        }
    }
    Ok(())
}

/// The file being read: for messages and relative paths.
struct File<'a> {
    path: &'a Path,
    base: PathBuf,
}

impl File<'_> {
    fn bad(&self, key: &str, reason: String) -> ConfigError {
        ConfigError::BadValue {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            reason,
        }
    }

    fn unknown(&self, key: &str, known: &[&str]) -> ConfigError {
        ConfigError::UnknownKey {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            known: known.join(", "),
        }
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn string<'v>(&self, key: &str, value: &'v toml::Value) -> Result<&'v str, ConfigError> {
        value
            .as_str()
            .ok_or_else(|| self.bad(key, format!("{value} is not a string (put it in quotes)")))
    }

    fn boolean(&self, key: &str, value: &toml::Value) -> Result<bool, ConfigError> {
        value
            .as_bool()
            .ok_or_else(|| self.bad(key, format!("{value} is not true or false")))
    }

    fn path_of(&self, key: &str, value: &toml::Value) -> Result<PathBuf, ConfigError> {
        let s = self.string(key, value)?;
        if s.is_empty() {
            return Err(self.bad(key, "needs a file name".into()));
        }
        Ok(self.resolve(s))
    }

    /// A list, or one value standing for a list of one.
    fn list<'v>(
        &self,
        _key: &str,
        value: &'v toml::Value,
    ) -> Result<Vec<&'v toml::Value>, ConfigError> {
        Ok(match value.as_array() {
            Some(items) => items.iter().collect(),
            None => vec![value],
        })
    }

    fn choice<T: ValueEnum>(&self, key: &str, value: &toml::Value) -> Result<T, ConfigError> {
        let s = self.string(key, value)?;
        T::from_str(s, false).map_err(|_| {
            let names: Vec<String> = T::value_variants()
                .iter()
                .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
                .collect();
            self.bad(key, format!("'{s}' is not one of {}", names.join(", ")))
        })
    }

    /// A disk: the `--disk` syntax as a string, or a table with the same options as keys.
    fn disk(&self, key: &str, value: &toml::Value) -> Result<DiskSpec, ConfigError> {
        let spec = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Table(t) => {
                let mut file = None;
                let mut opts = Vec::new();
                for (k, v) in t {
                    let dotted = format!("{key}.{k}");
                    match k.as_str() {
                        "file" => file = Some(self.string(&dotted, v)?.to_string()),
                        "readonly" => {
                            if self.boolean(&dotted, v)? {
                                opts.push("readonly".to_string());
                            }
                        }
                        "format" | "cache" | "overlay" | "if" => {
                            opts.push(format!("{k}={}", self.string(&dotted, v)?));
                        }
                        _ => return Err(self.unknown(&dotted, DISK_KEYS)),
                    }
                }
                let file = file.ok_or_else(|| {
                    self.bad(key, "a disk table needs file = \"IMAGE\"".to_string())
                })?;
                std::iter::once(file)
                    .chain(opts)
                    .collect::<Vec<_>>()
                    .join(",")
            }
            other => {
                return Err(self.bad(
                    key,
                    format!("{other} is neither a --disk string nor a table"),
                ));
            }
        };
        let mut d = DiskSpec::parse(&spec).map_err(|e| self.bad(key, e.to_string()))?;
        d.path = self.resolve(&d.path.display().to_string());
        if let Some(o) = &d.overlay {
            d.overlay = Some(self.resolve(&o.display().to_string()));
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{Cache, Interface};
    use clap::{CommandFactory, FromArgMatches};

    /// Parses a `bt86 run` command line and applies the config file `text` as main() does.
    fn run_with(cmdline: &[&str], text: &str) -> (Result<RunArgs, ConfigError>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(&path, text).unwrap();
        let mut argv = vec!["bt86", "run", "--config", path.to_str().unwrap()];
        argv.extend_from_slice(cmdline);
        let matches = crate::Cli::command().try_get_matches_from(argv).unwrap();
        let crate::Command::Run(mut args) = crate::Cli::from_arg_matches(&matches).unwrap().command
        else {
            panic!("not a run command");
        };
        let sub = matches.subcommand_matches("run").unwrap();
        let given = |id: &str| sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        let r = apply(&path, &mut args, &given).map(|()| args);
        (r, dir)
    }

    #[test]
    fn file_values_fill_the_flags_and_paths_are_relative_to_the_file() {
        let (args, dir) = run_with(
            &[],
            r#"
kernel = "vmlinuz"
initrd = "/abs/initrd.gz"
append = "console=ttyS0"
engine = "interp"
memory = 512
on-reboot = "restart"
clock = "apparent"
serial = "file:console.log"
stats = true
cdrom = "cd.iso"
disk = ["a.img,readonly", { file = "b.img", cache = "writethrough", overlay = "b.cow" }, { file = "c.img", if = "virtio" }]
"#,
        );
        let a = args.unwrap();
        assert_eq!(a.kernel, Some(dir.path().join("vmlinuz")));
        assert_eq!(a.initrd.as_deref(), Some("/abs/initrd.gz"));
        assert_eq!(a.append, "console=ttyS0");
        assert_eq!(a.engine, EngineArg::Interp);
        assert_eq!(a.memory, 512);
        assert_eq!(a.on_reboot, OnReboot::Restart);
        assert_eq!(a.clock, ClockArg::Apparent);
        assert_eq!(a.serial, SerialSpec::File(dir.path().join("console.log")));
        assert!(a.stats);
        assert_eq!(a.cdrom, Some(dir.path().join("cd.iso")));
        assert_eq!(a.disk.len(), 3);
        assert_eq!(a.disk[0].path, dir.path().join("a.img"));
        assert!(a.disk[0].readonly);
        assert_eq!(a.disk[1].cache, Cache::Writethrough);
        assert_eq!(a.disk[1].overlay, Some(dir.path().join("b.cow")));
        assert_eq!(a.disk[1].interface, Interface::Ide);
        assert_eq!(a.disk[2].path, dir.path().join("c.img"));
        assert_eq!(a.disk[2].interface, Interface::Virtio);
    }

    #[test]
    fn the_binary_translator_and_host_time_are_the_defaults() {
        let (args, _dir) = run_with(&[], "kernel = \"k\"\n");
        let a = args.unwrap();
        assert_eq!((a.engine, a.clock), (EngineArg::Bt, ClockArg::Host));
    }

    #[test]
    fn command_line_flags_override_the_file() {
        let (args, _dir) = run_with(
            &["--engine", "interp", "--memory", "64", "--disk", "c.img"],
            "kernel = \"k\"\nengine = \"bt\"\nmemory = 512\ndisk = [\"a.img\", \"b.img\"]\n",
        );
        let a = args.unwrap();
        assert_eq!(a.engine, EngineArg::Interp);
        assert_eq!(a.memory, 64);
        assert_eq!(a.disk.len(), 1);
        assert_eq!(a.disk[0].path, PathBuf::from("c.img"));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_file_and_the_key() {
        let (r, _d) = run_with(&[], "kernel = \"k\"\nmemroy = 64\n");
        let e = r.err().unwrap().to_string();
        assert!(
            e.contains("vm.toml") && e.contains("unknown key 'memroy'"),
            "{e}"
        );

        let (r, _d) = run_with(&[], "kernel = \"k\"\nengine = \"fast\"\n");
        let e = r.err().unwrap().to_string();
        assert!(
            e.contains("vm.toml: engine: 'fast' is not one of kvm, interp, bt"),
            "{e}"
        );

        let (r, _d) = run_with(&[], "kernel = \"k\"\nmemory = \"lots\"\n");
        let e = r.err().unwrap().to_string();
        assert!(e.contains("memory:"), "{e}");

        let (r, _d) = run_with(&[], "kernel = \"k\"\ndisk = [{ file = \"a\", size = 3 }]\n");
        let e = r.err().unwrap().to_string();
        assert!(e.contains("unknown key 'disk.size'"), "{e}");

        let (r, _d) = run_with(&[], "kernel = \"k\"\ndisk = \"a.img,cache=maybe\"\n");
        let e = r.err().unwrap().to_string();
        assert!(e.contains("disk:") && e.contains("cache=maybe"), "{e}");

        let (r, _d) = run_with(&[], "kernel = \n");
        let e = r.err().unwrap().to_string();
        assert!(
            e.contains("not a valid TOML file") && e.contains("line 1"),
            "{e}"
        );
    }
}
