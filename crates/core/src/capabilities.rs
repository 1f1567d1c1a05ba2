//! `cryptblk --print-capabilities`: what the vhost-user backend program
//! conventions (QEMU's docs/interop/vhost-user.rst, "Backend program
//! conventions") ask a backend to print, as QEMU's
//! docs/interop/vhost-user.json schema describes it
//! (`VHostUserBackendCapabilities`): the device type and, for "block", the
//! `VHostUserBackendBlockFeature`s the program supports. Management tools
//! find the program through a description file (configs/50-cryptblk.json)
//! and run it with this flag.
//!
//! Each feature is a promise about the command line: "read-only" means
//! `--read-only` works, "blk-file" means `--blk-file=PATH` names the image.
//! Both are accepted by `cryptblk` itself (without a subcommand, as the
//! conventions start a backend) and by `cryptblk serve`.

use serde_json::{json, Value};

/// The flag, as the conventions spell it.
pub const FLAG: &str = "--print-capabilities";

/// The block features cryptblk supports; every one is a member of the
/// schema's VHostUserBackendBlockFeature enum.
pub const BLOCK_FEATURES: [&str; 2] = ["read-only", "blk-file"];

/// The JSON document `--print-capabilities` prints.
pub fn document() -> Value {
    json!({ "type": "block", "features": BLOCK_FEATURES })
}

/// True when `args` (without the program name) ask for the capabilities.
/// The conventions say every other option and argument is then ignored,
/// so this looks before any parsing that could refuse them; arguments
/// after `--` are values, not options.
pub fn requested<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> bool {
    args.iter()
        .map(AsRef::as_ref)
        .take_while(|a| *a != "--")
        .any(|a| a == FLAG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_is_found_anywhere_before_a_double_dash() {
        assert!(requested(&["--print-capabilities"]));
        assert!(requested(&["serve", "--bogus", "--print-capabilities"]));
        assert!(!requested(&["serve", "--", "--print-capabilities"]));
        assert!(!requested::<&str>(&[]));
        assert_eq!(document()["type"], "block");
    }
}
