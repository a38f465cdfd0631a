//! Debian's architectures as data: qemu's name for each, and the ELF header binfmt_misc
//! recognises its programs by (from qemu's `binfmt.d` files). Adding an architecture is a row.

/// One Debian architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arch {
    /// Debian's name (`arm64`).
    pub debian: &'static str,
    /// Rust's `std::env::consts::ARCH` on such a machine.
    pub rust: &'static str,
    /// qemu's name (`aarch64`: `qemu-aarch64`).
    pub qemu: &'static str,
    /// binfmt_misc's magic and mask for its ELF executables, hex.
    pub magic: &'static str,
    pub mask: &'static str,
    /// Architectures whose programs this machine runs natively (amd64 runs i386).
    pub runs: &'static [&'static str],
}

const COMMON_MASK: &str = "ffffffffffffff00fffffffffffffffffeffffff";

pub const ARCHES: &[Arch] = &[
    Arch {
        debian: "amd64",
        rust: "x86_64",
        qemu: "x86_64",
        magic: "7f454c4602010100000000000000000002003e00",
        mask: "fffffffffffefe00fffffffffffffffffeffffff",
        runs: &["amd64", "i386"],
    },
    Arch {
        debian: "i386",
        rust: "x86",
        qemu: "i386",
        magic: "7f454c4601010100000000000000000002000300",
        mask: "fffffffffffefe00fffffffffffffffffeffffff",
        runs: &["i386"],
    },
    Arch {
        debian: "arm64",
        rust: "aarch64",
        qemu: "aarch64",
        magic: "7f454c460201010000000000000000000200b700",
        mask: COMMON_MASK,
        runs: &["arm64"],
    },
    Arch {
        debian: "armhf",
        rust: "arm",
        qemu: "arm",
        magic: "7f454c4601010100000000000000000002002800",
        mask: COMMON_MASK,
        runs: &["armhf"],
    },
    Arch {
        debian: "ppc64el",
        rust: "powerpc64",
        qemu: "ppc64le",
        magic: "7f454c4602010100000000000000000002001500",
        mask: "fffffffffffffffcfffffffffffffffffeffff00",
        runs: &["ppc64el"],
    },
    Arch {
        debian: "riscv64",
        rust: "riscv64",
        qemu: "riscv64",
        magic: "7f454c460201010000000000000000000200f300",
        mask: COMMON_MASK,
        runs: &["riscv64"],
    },
    Arch {
        debian: "s390x",
        rust: "s390x",
        qemu: "s390x",
        magic: "7f454c4602020100000000000000000000020016",
        mask: "fffffffffffffffcfffffffffffffffffffeffff",
        runs: &["s390x"],
    },
];

/// The row of Debian architecture `name`.
pub fn by_name(name: &str) -> Option<&'static Arch> {
    ARCHES.iter().find(|a| a.debian == name)
}

/// The Debian architecture of the machine running rbuild.
pub fn host() -> Option<&'static Arch> {
    ARCHES.iter().find(|a| a.rust == std::env::consts::ARCH)
}

/// Whether programs of `target` need an emulator on a `host` machine.
pub fn needs_emulator(host: &Arch, target: &str) -> bool {
    !host.runs.contains(&target)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows agree with qemu's own binfmt.d files as Debian's qemu-user-static ships them:
    /// the masks leave the ELF class, data and machine bytes significant.
    #[test]
    fn magic_and_mask_are_elf_headers() {
        for a in ARCHES {
            assert_eq!(a.magic.len(), 40, "{}", a.debian);
            assert_eq!(a.mask.len(), 40, "{}", a.debian);
            assert!(a.magic.starts_with("7f454c46"), "{}", a.debian);
            assert!(a.runs.contains(&a.debian));
        }
        let arm64 = by_name("arm64").unwrap();
        assert_eq!(arm64.qemu, "aarch64");
        let amd64 = by_name("amd64").unwrap();
        assert!(needs_emulator(amd64, "arm64"));
        assert!(!needs_emulator(amd64, "i386"));
        assert!(!needs_emulator(arm64, "arm64"));
    }
}
