//! The initrd the runner packs: two concatenated cpio "newc" archives.
//! The first holds only `testbed.conf` (the run's configuration); the
//! second is the guest's root file system, handed to the client core as
//! is. Keeping them apart keeps the configuration out of the guest's view.
//!
//! `testbed.conf` is a list of NUL-terminated `key=value` records
//! (argv entries may hold any byte but NUL): `mode=`, `arch=`, `arg=`
//! (repeated, argv[0] first), `env=` (repeated), `out=` (repeated guest
//! paths to send back), `time_limit_ms=`, `epoch_ns=` (host time),
//! `switch_every=` (the client core's `LinuxConfig::switch_every`),
//! `exec_fuzz=N,SEED` (monitor mode: fuzz.rs).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

const NEWC_MAGIC: &[u8] = b"070701";
const HEADER_LEN: usize = 110;
/// Field indices of the 13 eight-digit hex fields after the magic.
const FIELD_FILESIZE: usize = 6;
const FIELD_NAMESIZE: usize = 11;
const TRAILER: &[u8] = b"TRAILER!!!";
const CONFIG_NAME: &[u8] = b"testbed.conf";

pub enum InitrdError {
    Malformed(usize),
    NoConfig,
    BadConfig(&'static str),
}

impl fmt::Display for InitrdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitrdError::Malformed(at) => write!(f, "malformed cpio member at offset {at}"),
            InitrdError::NoConfig => write!(f, "the first archive has no testbed.conf"),
            InitrdError::BadConfig(why) => write!(f, "testbed.conf: {why}"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Native,
    Monitor,
    Kld,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum GuestArch {
    Amd64,
    I386,
}

pub struct Config {
    pub mode: Mode,
    pub arch: GuestArch,
    pub argv: Vec<String>,
    pub envp: Vec<String>,
    pub outs: Vec<String>,
    pub time_limit_ms: u64,
    /// Host wall-clock time when the runner packed the initrd.
    pub epoch_ns: u64,
    /// Monitor mode: the paging format of the guest OS (`paging=` record,
    /// from the runner's --guest-paging); `None`: the arch's default.
    pub guest_paging: Option<kqemu_client::PagingFormat>,
    /// Switch to the next runnable process every this many system calls
    /// (`switch_every=` record, from the runner's --switch-every; 0: off).
    pub switch_every: u32,
    /// Native mode: after every trap, load the kernel's own CR3 before the
    /// client core runs, so each round trip writes CR3 twice as a monitor
    /// exit does (`cr3_exits=1` record, from the runner's --cr3-exits).
    pub cr3_exits: bool,
    /// Monitor mode: after the program's first EXECs, this many hostile
    /// EXECs (`exec_fuzz=N,SEED` record, from the runner's --exec-fuzz;
    /// fuzz.rs).
    pub exec_fuzz: Option<crate::fuzz::Plan>,
}

/// The guest may run this long when the runner does not say.
const DEFAULT_TIME_LIMIT_MS: u64 = 600_000;

fn hex_field(header: &[u8], index: usize, at: usize) -> Result<usize, InitrdError> {
    let digits = header
        .get(6 + index * 8..14 + index * 8)
        .ok_or(InitrdError::Malformed(at))?;
    let text = core::str::from_utf8(digits).map_err(|_| InitrdError::Malformed(at))?;
    usize::from_str_radix(text, 16).map_err(|_| InitrdError::Malformed(at))
}

/// Splits the initrd into the configuration file's bytes and the guest
/// archive that follows the first archive's trailer.
pub fn split(initrd: &[u8]) -> Result<(&[u8], &[u8]), InitrdError> {
    let mut pos = 0;
    let mut config = None;
    // Each member takes at least a header, so this visits every member.
    for _ in 0..=initrd.len() / HEADER_LEN {
        let header = initrd
            .get(pos..pos + HEADER_LEN)
            .ok_or(InitrdError::Malformed(pos))?;
        if &header[..6] != NEWC_MAGIC {
            return Err(InitrdError::Malformed(pos));
        }
        let filesize = hex_field(header, FIELD_FILESIZE, pos)?;
        let namesize = hex_field(header, FIELD_NAMESIZE, pos)?;
        let name_start = pos + HEADER_LEN;
        let name_end = name_start
            .checked_add(namesize)
            .ok_or(InitrdError::Malformed(pos))?;
        let name = initrd
            .get(name_start..name_end.saturating_sub(1))
            .ok_or(InitrdError::Malformed(pos))?;
        let data_start = name_end.next_multiple_of(4);
        let data_end = data_start
            .checked_add(filesize)
            .ok_or(InitrdError::Malformed(pos))?;
        let data = initrd
            .get(data_start..data_end)
            .ok_or(InitrdError::Malformed(pos))?;
        pos = data_end.next_multiple_of(4);
        if name == TRAILER {
            let guest = initrd.get(pos.min(initrd.len())..).unwrap_or(&[]);
            return Ok((config.ok_or(InitrdError::NoConfig)?, guest));
        }
        if name == CONFIG_NAME {
            config = Some(data);
        }
    }
    Err(InitrdError::Malformed(pos))
}

impl Config {
    pub fn parse(bytes: &[u8]) -> Result<Config, InitrdError> {
        let mut config = Config {
            mode: Mode::Native,
            arch: GuestArch::Amd64,
            argv: Vec::new(),
            envp: Vec::new(),
            outs: Vec::new(),
            time_limit_ms: DEFAULT_TIME_LIMIT_MS,
            epoch_ns: 0,
            guest_paging: None,
            switch_every: 0,
            cr3_exits: false,
            exec_fuzz: None,
        };
        for record in bytes.split(|&b| b == 0).filter(|r| !r.is_empty()) {
            let record =
                core::str::from_utf8(record).map_err(|_| InitrdError::BadConfig("not UTF-8"))?;
            let (key, value) = record
                .split_once('=')
                .ok_or(InitrdError::BadConfig("record without '='"))?;
            match key {
                "mode" => {
                    config.mode = match value {
                        "native" => Mode::Native,
                        "monitor" => Mode::Monitor,
                        "kld" => Mode::Kld,
                        _ => return Err(InitrdError::BadConfig("unknown mode")),
                    }
                }
                "arch" => {
                    config.arch = match value {
                        "amd64" => GuestArch::Amd64,
                        "i386" => GuestArch::I386,
                        _ => return Err(InitrdError::BadConfig("unknown arch")),
                    }
                }
                "arg" => config.argv.push(String::from(value)),
                "env" => config.envp.push(String::from(value)),
                "out" => config.outs.push(String::from(value)),
                "time_limit_ms" => {
                    config.time_limit_ms = value
                        .parse()
                        .map_err(|_| InitrdError::BadConfig("bad time_limit_ms"))?
                }
                "epoch_ns" => {
                    config.epoch_ns = value
                        .parse()
                        .map_err(|_| InitrdError::BadConfig("bad epoch_ns"))?
                }
                "paging" => {
                    config.guest_paging = Some(match value {
                        "long4" => kqemu_client::PagingFormat::Long4,
                        "pae" => kqemu_client::PagingFormat::Pae,
                        "legacy32" => kqemu_client::PagingFormat::Legacy32,
                        _ => return Err(InitrdError::BadConfig("unknown paging")),
                    })
                }
                "switch_every" => {
                    config.switch_every = value
                        .parse()
                        .map_err(|_| InitrdError::BadConfig("bad switch_every"))?
                }
                "cr3_exits" => {
                    config.cr3_exits = match value {
                        "1" => true,
                        "0" => false,
                        _ => return Err(InitrdError::BadConfig("bad cr3_exits")),
                    }
                }
                "exec_fuzz" => {
                    let (calls, seed) = value
                        .split_once(',')
                        .and_then(|(n, s)| Some((n.parse().ok()?, s.parse().ok()?)))
                        .ok_or(InitrdError::BadConfig("bad exec_fuzz"))?;
                    config.exec_fuzz = Some(crate::fuzz::Plan { calls, seed });
                }
                _ => return Err(InitrdError::BadConfig("unknown key")),
            }
        }
        if config.argv.is_empty() {
            return Err(InitrdError::BadConfig("no program"));
        }
        Ok(config)
    }
}
